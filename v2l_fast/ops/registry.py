"""Backend choice and the one definition of each op: checks, dispatch and the torch.library op.

An op is defined once (`define_op`): its reference twin gives the public signature and docs,
its checker validates the arguments, and each backend registers an implementation that takes
the op's *kernel arguments* positionally (the public arguments after the op has prepared them,
e.g. a layer picked out of a pool). The public function is generated from that definition::

    check(args, values=check)  →  resolve(backend, device)  →  prepare(args, resolved)

`resolve` is the only place that looks at the backend setting, and it returns a `Resolved`:
the chosen backend's name and a callable that runs it with no further checks. A hot loop (the
LoRA patch in a decoder) resolves once and calls the `Resolved` directly.

Backends:
    torch   plain PyTorch; runs anywhere.
    triton  Triton kernels; needs a CUDA GPU, or ``TRITON_INTERPRET=1`` for CPU tensors
            (the interpreter: for tests, never chosen by ``auto``).
    cuda    kernels in the compiled extension `v2l_fast._C` built with CUDA; CUDA tensors.
    cpp     C++ kernels in `v2l_fast._C` for CPU tensors.

The setting: ``backend=`` on a call, else `use_backend` (a context manager over a contextvar,
so it is scoped to a block, a thread or a task), else ``$V2L_BACKEND``, else ``"auto"``: the
op's preference list for the inputs' device (fastest first, from the benchmarks), skipping
any backend whose runtime is missing. A scoped or environment choice applies to the ops that
have that backend; the others keep choosing automatically.

torch.compile: ops with a kernel signature are also registered as ``torch.ops.v2l_fast.<op>``
(with a fake implementation for tracing and an autograd formula), and a `Resolved` called
while dynamo traces goes through that op, so a compiled graph holds one node per call instead
of a graph break at the kernel launch. Eager calls skip the dispatcher and run the backend
directly, with the backend's own autograd.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from v2l_fast._ext import load_extension
from v2l_fast.errors import fail
from v2l_fast.kernels._common import interpreting

BACKENDS = ("torch", "triton", "cuda", "cpp")
ENV_VAR = "V2L_BACKEND"
NAMESPACE = "v2l_fast"

_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("v2l_backend", default=None)
_library = torch.library.Library(NAMESPACE, "DEF")
_ops: dict[str, Op] = {}


def _check_backend_name(name: object, what: str = "backend") -> str:
    if name != "auto" and name not in BACKENDS:
        fail(what, f"'auto' or one of {BACKENDS}", repr(name))
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with ``name`` as every op's backend where the op has it (``"auto"``: choose).

    Scoped (a contextvar): other threads and tasks keep their own setting; nesting restores the
    outer one on exit. An explicit ``backend=`` argument still wins.
    """
    token = _scoped_backend.set(_check_backend_name(name))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def current_backend() -> str:
    """The backend setting in force: the innermost `use_backend`, else ``$V2L_BACKEND``, else auto."""
    scoped = _scoped_backend.get()
    if scoped is not None:
        return scoped
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_backend_name(env, f"${ENV_VAR}") if env else "auto"


@functools.cache
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def runtime_missing(backend: str, device: torch.device | None = None) -> str | None:
    """Why ``backend`` cannot run (on ``device`` if given), or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "the triton package is not installed"
        on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
        if on_cpu and not interpreting():
            return "triton needs CUDA tensors, or TRITON_INTERPRET=1 to interpret kernels on the CPU"
        if device is not None and device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        if on_cpu:
            from v2l_fast.kernels.interpreter_probe import interpreter_defect

            return interpreter_defect()
        return None
    ext = load_extension()
    if ext is None:
        return "the compiled extension v2l_fast._C is not built (pip install --no-build-isolation -e .)"
    if backend == "cuda":
        if not ext.build_info()["cuda"]:
            return "v2l_fast._C was built without CUDA (needs a CUDA torch and nvcc at build time)"
        if device is not None and device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if device is not None and device.type != "cpu":
        return f"the cpp backend needs CPU tensors, got {device.type}"
    return None


def available_backends(op: str | None = None) -> list[str]:
    """Backends that can run here: implemented (by ``op``, or by any op) and with a runtime."""
    ops = [_ops[op]] if op is not None else list(_ops.values())
    implemented = {b for o in ops for b in o.backends}
    return [b for b in BACKENDS if b in implemented and runtime_missing(b) is None]


class Arguments:
    """The bound arguments of one op call, one attribute per parameter (what checks and prepare read)."""

    def __init__(self, **values):
        for name, value in values.items():
            setattr(self, name, value)


@dataclass(frozen=True)
class Resolved:
    """One op's implementation for one backend: call it with the op's kernel arguments.

    No checks run here: the caller validated the arguments (the public op does, a patch does
    at construction). Under torch.compile the call is the op's ``torch.ops.v2l_fast`` node.
    """

    op: str
    backend: str
    fn: Callable
    library_op: Callable | None = None

    def __call__(self, *args):
        if self.library_op is not None and torch.compiler.is_compiling():
            return self.library_op(*args, self.backend)
        return self.fn(*args)


def _load(impl: Callable | str) -> Callable:
    if isinstance(impl, str):
        module, attr = impl.split(":")
        return getattr(importlib.import_module(module), attr)
    return impl


class Op:
    """The definition of one op: backends, auto order, and its torch.library registration."""

    def __init__(self, name: str, auto: dict[str, tuple[str, ...]], schema: str | None, fake: Callable | None):
        self.name, self.auto = name, auto
        self.backends: dict[str, Callable | str] = {}
        self._resolved_cache: dict[str, tuple[Callable | str, Resolved]] = {}
        self.library_op = _define_library_op(self, schema, fake) if schema is not None else None

    def register(self, backend: str, impl: Callable | str) -> None:
        """Register ``impl`` (a callable, or a lazy ``"module:attr"`` path) for ``backend``."""
        if backend not in BACKENDS:
            fail("backend", f"one of {BACKENDS}", repr(backend))
        self.backends[backend] = impl

    def _resolved(self, backend: str) -> Resolved:
        source = self.backends[backend]
        cached = self._resolved_cache.get(backend)
        if cached is None or cached[0] is not source:  # first use, or re-registered
            resolved = Resolved(self.name, backend, _load(source), self.library_op)
            cached = self._resolved_cache[backend] = (source, resolved)
        return cached[1]

    def choose(self, backend: str, device: torch.device) -> str:
        """The backend to run for ``backend`` (``"auto"``: the setting in force) on ``device``.

        A host-side decision: under torch.compile it runs once while tracing and its answer is
        a constant of the graph. Raises ValueError for an unknown backend name and
        RuntimeError naming what is missing when the requested backend cannot run.
        """
        requested = _check_backend_name(backend)
        if requested == "auto":
            setting = current_backend()
            requested = setting if setting in self.backends else "auto"
        if requested == "auto":
            order = self.auto.get("cuda" if device.type == "cuda" else "cpu", ())
            requested = next((name for name in order if name in self.backends
                              and not (name == "triton" and device.type == "cpu")
                              and runtime_missing(name, device) is None), "torch")
        elif requested not in self.backends:
            raise RuntimeError(f"{self.name} has no {requested!r} backend (it has: {', '.join(sorted(self.backends))})")
        else:
            missing = runtime_missing(requested, device)
            if missing:
                raise RuntimeError(f"{self.name}: backend {requested!r} cannot run: {missing}")
        self._resolved(requested)  # loads it now, outside any traced code
        return requested

    # What `torch.compiler.assume_constant_result` sets, without importing torch._dynamo (over a
    # second) with the ops; tests/test_ops_compile.py fails with a graph break if torch renames it.
    choose._dynamo_marked_constant = True

    def resolve(self, backend: str, device: torch.device) -> Resolved:
        """The `Resolved` implementation of `choose`'s answer."""
        return self._resolved(self.choose(backend, device))


def get_op(name: str) -> Op:
    """The definition of op ``name``; an unknown name is the project's ValueError."""
    if name not in _ops:
        fail("op", f"one of {sorted(_ops)}", repr(name))
    return _ops[name]


def resolve(op: str, backend: str, device: torch.device | torch.Tensor) -> Resolved:
    """`Op.resolve` of op ``op``; ``device`` may be a tensor (its device is used)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    return get_op(op).resolve(backend, device)


# --- torch.library registration -------------------------------------------------------------

def kernel_schema(fn: Callable) -> str:
    """The torch.library schema of ``fn``'s signature with every argument positional, no defaults."""
    return re.sub(r"=[^,)]+", "", torch.library.infer_schema(fn, mutates_args=()).replace("*, ", ""))


def _with_backend(schema: str) -> str:
    args, returns = schema.rsplit(") -> ", 1)
    return f"{args}, str backend) -> {returns}"


def _flatten(values) -> tuple[list[torch.Tensor], list]:
    """Tensors of a kernel-argument list (lists of tensors included) and how to put them back."""
    tensors, layout = [], []
    for v in values:
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            layout.append("tensor")
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            tensors.extend(v)
            layout.append(("tensors", len(v)))
        else:
            layout.append(("value", v))
    return tensors, layout


def _unflatten(tensors, layout) -> list:
    it, values = iter(tensors), []
    for item in layout:
        if item == "tensor":
            values.append(next(it))
        elif item[0] == "tensors":
            values.append([next(it) for _ in range(item[1])])
        else:
            values.append(item[1])
    return values


def _define_library_op(op: Op, schema: str, fake: Callable) -> Callable:
    """Register ``v2l_fast::<op>`` and its backward with the dispatcher.

    Forward: the named backend's implementation, without autograd (the dispatcher's autograd
    key handles gradients). Backward: ``v2l_fast::<op>_backward`` recomputes the forward with
    the backend's own differentiable implementation and takes its vector-Jacobian product;
    both are opaque single nodes to the compiler, which is what lets AOTAutograd trace a
    backward that calls compiled-extension or Triton code.
    """
    name = op.name
    backward_schema = _with_backend(schema).replace("(", "(Tensor grad, bool[] needs, ", 1)
    backward_schema = backward_schema.rsplit(" -> ", 1)[0] + " -> Tensor[]"
    _library.define(name + _with_backend(schema))
    _library.define(f"{name}_backward{backward_schema}")

    def forward(*args):
        *inputs, backend = args
        with torch.no_grad():
            return op._resolved(backend).fn(*inputs)

    def backward_kernel(grad, needs, *args):
        *inputs, backend = args
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if need else t for t, need in zip(inputs, needs)]
            out = op._resolved(backend).fn(*leaves)
            wanted = [t for t, need in zip(leaves, needs) if need]
            grads = torch.autograd.grad(out, wanted, grad, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads)]

    def backward_fake(grad, needs, *args):
        return [t.new_empty(t.shape) for t, need in zip(args, needs) if need]

    def setup_context(ctx, inputs, output):
        tensors, ctx.layout = _flatten(inputs)
        ctx.save_for_backward(*tensors)

    def backward(ctx, grad):
        inputs = _unflatten(ctx.saved_tensors, ctx.layout)
        needs = [bool(need) and isinstance(t, torch.Tensor) for t, need in zip(inputs, ctx.needs_input_grad)]
        grads = iter(backward_op(grad, needs, *inputs))
        # One entry per input, shaped like it: a list input (metadata tensors) gets a list of Nones.
        return tuple(next(grads) if need else [None] * len(t) if isinstance(t, list) else None
                     for t, need in zip(inputs, needs))

    _library.impl(name, forward, "CompositeExplicitAutograd")
    _library.impl(f"{name}_backward", backward_kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", lambda *args: fake(*args[:-1]), lib=_library)
    torch.library.register_fake(f"{NAMESPACE}::{name}_backward", backward_fake, lib=_library)
    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=_library)
    backward_op = getattr(torch.ops, NAMESPACE).__getattr__(f"{name}_backward").default
    return getattr(torch.ops, NAMESPACE).__getattr__(name).default


# --- public functions -------------------------------------------------------------------------

def positional(fn: Callable) -> Callable:
    """``fn`` (e.g. a reference with keyword-only arguments) called with its arguments in order."""
    names = list(inspect.signature(fn).parameters)
    return functools.wraps(fn)(lambda *args: fn(**dict(zip(names, args))))


def define_op(reference: Callable, *, check: Callable, device_of: Callable, auto: dict[str, tuple[str, ...]],
              prepare: Callable | None = None, extras: dict | None = None, schema: str | None = None,
              fake: Callable | None = None) -> Callable:
    """The public op generated from its reference twin: one definition per op.

    The public function has the reference's signature and docs, plus ``extras`` (keyword
    arguments with defaults that only the dispatching op takes), ``check=True`` and
    ``backend="auto"``. A call binds the arguments into `Arguments` ``a``, runs
    ``check(a, values=check)``, resolves the backend on ``device_of(a)`` and returns
    ``prepare(a, resolved)``, which calls ``resolved(...)`` with the kernel arguments; without
    ``prepare`` those are the reference's arguments in order. ``schema`` (with ``fake``, both
    over the kernel arguments) registers the op with torch.library. Backends register on
    ``public.op`` afterwards.
    """
    extras = extras or {}
    signature = inspect.signature(reference)
    names = list(signature.parameters)
    kwonly = inspect.Parameter.KEYWORD_ONLY
    added = [inspect.Parameter(k, kwonly, default=v) for k, v in extras.items()]
    added += [inspect.Parameter("check", kwonly, default=True, annotation=bool),
              inspect.Parameter("backend", kwonly, default="auto", annotation=str)]
    public_signature = signature.replace(parameters=[*signature.parameters.values(), *added])
    op = _ops[reference.__name__] = Op(reference.__name__, auto, schema, fake)
    if prepare is None:
        def prepare(a, kernel):
            return kernel(*(getattr(a, name) for name in names))

    @functools.wraps(reference)
    def public(*args, **kwargs):
        bound = public_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = Arguments(**bound.arguments)
        check(a, values=a.check)
        return prepare(a, op.resolve(a.backend, device_of(a)))

    public.__signature__ = public_signature
    public.__doc__ = (f"{reference.__doc__}\n\n    Dispatching op (`v2l_fast.ops`): ``check`` runs the "
                      "data-dependent argument checks (a host sync on GPU); ``backend`` is 'auto' "
                      f"(`use_backend` / ${ENV_VAR} / the fastest) or one of "
                      f"`available_backends({op.name!r})`.")
    public.op = op
    return public
