"""Compile every Triton kernel for sm_80 / sm_90 without a GPU, with the launches its wrapper makes.

The public wrappers (`lora_sgmv`, `perceiver_attention`, `swiglu_mlp`, forward and backward)
run on CPU tensors that report ``cuda:0`` as their device, so they pick their CUDA block sizes,
warps and stages; each kernel launch is recorded instead of run. The recorded arguments go
through triton's own launch-time specialisation (pointer dtypes, ints equal to 1 folded,
divisibility by 16) and triton's NVIDIA backend compiles them down to a cubin with the ptxas
it ships. A compile error fails the test; registers and spills (from the ptxas log) are printed.
Compiling proves the kernels build for the target, not that they are correct or fast on it.

The compile runs in a subprocess: conftest sets ``TRITON_INTERPRET=1`` here, which turns
``@triton.jit`` into interpreter objects. Run as a script for the full table::

    python tests/test_kernels_compile.py --arch 80 90 --matrix full
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl
from torch.overrides import TorchFunctionMode

KERNEL_MODULES = ("lora_sgmv", "perceiver_attention", "swiglu_mlp")
SM_COUNT = {80: 108, 90: 132}  # A100, H100 SXM: only the wrappers' split heuristics read it
SKIP_EXIT = 3


# ---------------------------------------------------------------------------------------------
# Worker side (runs without TRITON_INTERPRET)
# ---------------------------------------------------------------------------------------------

class _FakeCuda(TorchFunctionMode):
    """Tensors say they live on ``cuda:0``; factories asked for CUDA allocate on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda", 0)
        if func == torch.Tensor.is_cuda.__get__:
            return True
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _under_fake_cuda(backward):
    # The autograd engine runs backward without the caller's torch-function modes.
    @functools.wraps(backward)
    def wrapped(*args):
        with _FakeCuda():
            return backward(*args)
    return wrapped


@contextlib.contextmanager
def _recorded_launches(kernels, functions, sm_count):
    """Launches of ``kernels`` (JITFunctions) appended to the yielded list instead of run, with
    the wrappers and the backward of the autograd ``functions`` seeing CUDA tensors."""
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append((kernel, args, kwargs))
        return run

    with contextlib.ExitStack() as stack:
        for kernel in kernels:
            stack.enter_context(mock.patch.object(kernel, "run", recorder(kernel)))
        for function in functions:
            stack.enter_context(mock.patch.object(
                function, "backward", staticmethod(_under_fake_cuda(function.backward))))
        stack.enter_context(mock.patch.object(
            torch.cuda, "get_device_properties",
            lambda device=None: SimpleNamespace(multi_processor_count=sm_count)))
        stack.enter_context(_FakeCuda())
        yield launches


def _rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


def _lora_case(dtype, factor_dtype, decode):
    """One down_proj LoRA layer (I=2560 → H=960, rank 16) of a 2-layer pool, forward + backward."""
    from v2l_fast.kernels.lora_sgmv import lora_sgmv
    from v2l_fast.kernels.lora_sgmv_metadata import lora_sgmv_metadata
    I, H, L, n, R = 2560, 960, 2, 3, 16
    if decode:  # 5 one-token segments, ranks given, no base: BLOCK_M 16, HAS_RANKS, not HAS_BASE
        T, indptr, adapters = 5, torch.arange(6), torch.tensor([0, 2, -1, 0, 1])
        ranks, base = torch.tensor([16, 8, 12], dtype=torch.int32), None
    else:  # two long segments with a base: BLOCK_M 64, HAS_BASE, no ranks
        T, indptr, adapters = 96, torch.tensor([0, 40, 96]), torch.tensor([0, 1])
        ranks, base = None, _rand(96, H, dtype=dtype, grad=True)
    x = _rand(T, I, dtype=dtype, grad=True)
    A = _rand(n, L, R, I, dtype=factor_dtype, grad=True)
    B = _rand(n, L, R, H, dtype=factor_dtype, grad=True)
    meta = lora_sgmv_metadata(indptr, adapters, T, n)  # the kernel arguments the op would pass, layer 1
    out = lora_sgmv(x, A[:, 1], B[:, 1], indptr, adapters, ranks, 2.0, base, meta.tensors(), meta.block_m)
    out.backward(torch.ones_like(out))


def _perceiver_case(dtype, masked, context_grad, D=512, normalized=False):
    """One Perceiver cross-attention (nh=16, nkv=4, hd=128, Q=8), forward + backward."""
    from v2l_fast.kernels.perceiver_attention import perceiver_attention
    N, Q, S, nh, nkv, hd = 2, 8, 50, 16, 4, 128
    mask = None
    if masked:
        mask = torch.ones(1, S, dtype=torch.bool)
        mask[0, 40:] = False
    out = perceiver_attention(  # the kernel arguments, positional as the op passes them
        _rand(N, Q, D, grad=True), _rand(N, S, D, dtype=dtype, grad=context_grad), mask,
        _rand(nh * hd, D, grad=True), _rand(nkv * hd, D, grad=True), _rand(nkv * hd, D, grad=True),
        _rand(D, nh * hd, grad=True), _rand(D, grad=True), _rand(D, grad=True), nh, nkv, 1e-6, normalized)
    out.sum().backward()


def _swiglu_case(dtype):
    """The modality projection of the 500M model (H=960 → 4H → D=512) on 37 tokens."""
    from v2l_fast.kernels.swiglu_mlp import swiglu_mlp
    H, F, D = 960, 3840, 512
    swiglu_mlp(_rand(37, H, dtype=dtype), _rand(F, H, dtype=dtype), _rand(F, H, dtype=dtype),
               _rand(D, F, dtype=dtype))


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cases(matrix):
    """(label, thunk) of the wrapper calls to record; "fast" covers every kernel and dtype."""
    cases = []
    for name, dtype in DTYPES.items():
        cases.append((f"lora prefill {name}", lambda d=dtype: _lora_case(d, d, decode=False)))
        cases.append((f"lora decode {name}", lambda d=dtype: _lora_case(d, d, decode=True)))
        cases.append((f"perceiver masked ctx-grad {name}",
                      lambda d=dtype: _perceiver_case(d, masked=True, context_grad=True)))
        cases.append((f"swiglu {name}", lambda d=dtype: _swiglu_case(d)))
        if dtype == torch.bfloat16:  # the Perceiver's own calls: its context normalised once
            cases.append((f"perceiver normalized-context ctx-grad {name}",
                          lambda d=dtype: _perceiver_case(d, masked=True, context_grad=True, normalized=True)))
        if matrix == "full":
            if dtype != torch.float32:  # half activations with the fp32 factor pool
                cases.append((f"lora prefill {name} x fp32 factors",
                              lambda d=dtype: _lora_case(d, torch.float32, decode=False)))
                cases.append((f"lora decode {name} x fp32 factors",
                              lambda d=dtype: _lora_case(d, torch.float32, decode=True)))
            cases.append((f"perceiver unmasked no-ctx-grad {name}",
                          lambda d=dtype: _perceiver_case(d, masked=False, context_grad=False)))
            # Each tile branch of the perceiver's `_cuda_tiles`: D = 64, 128, 512 (above) and the
            # largest D in the GPU dtype only (its fp32 backward alone takes ~20 s to compile).
            for D in (64, 128) + ((2048,) if dtype == torch.bfloat16 else ()):
                cases.append((f"perceiver D={D} {name}",
                              lambda d=dtype, D=D: _perceiver_case(d, masked=True, context_grad=True, D=D)))
    return cases


def _kernels_and_functions():
    """Every ``*_kernel`` JITFunction (helpers are inlined into them) and autograd Function
    defined in the kernel modules."""
    from triton.runtime.jit import JITFunction
    kernels, functions = [], []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"v2l_fast.kernels.{module_name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                kernels.append(obj)
            elif (isinstance(obj, type) and issubclass(obj, torch.autograd.Function)
                  and obj.__module__ == module.__name__):
                functions.append(obj)
    return kernels, functions


def _specialise(kernel, args, kwargs, backend):
    """Signature, constexprs, attrs and options exactly as `JITFunction.run` derives them."""
    from triton.runtime.jit import create_function_from_signature
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, launch_options = binder(*args, **kwargs)
    names = [p.name for p in kernel.params]
    signature = dict(zip(names, (s[0] for s in spec)))
    constexprs = {(i,): bound[name] for i, (name, s) in enumerate(zip(names, spec)) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec)
             if s[0] != "constexpr" and isinstance(s[1], str)}
    return signature, constexprs, attrs, backend.parse_options(launch_options)


def _describe(kernel, signature, constexprs):
    """Short label: pointer dtypes in order, then the declared constexprs (block sizes, flags)."""
    pointers = ",".join(t[1:] for t in signature.values() if t.startswith("*"))
    declared = {p.num for p in kernel.params if p.is_constexpr}
    flags = " ".join(f"{kernel.params[i].name}={getattr(v, 'name', v)}"
                     for (i,), v in constexprs.items() if i in declared)
    return f"[{pointers}] {flags}"


_PTXAS_NUMBERS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "stack": r"(\d+) bytes stack frame",
}


def _compile(kernel, args, kwargs, arch, seen):
    """Compile one recorded launch for ``sm_<arch>``; None when ``seen`` already had it, else a row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _specialise(kernel, args, kwargs, backend)
    key = (kernel.__name__, arch, repr(signature), repr(constexprs), repr(attrs), repr(options.__dict__))
    if key in seen:
        return None
    seen.add(key)
    row = {"kernel": kernel.__name__, "arch": arch, "config": _describe(kernel, signature, constexprs),
           "num_warps": options.num_warps, "num_stages": options.num_stages}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the ptxas -v log
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception:
        row["error"] = traceback.format_exc(limit=4)[-3000:] + log.getvalue()[-3000:]
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["cubin_bytes"] = len(compiled.asm.get("cubin", b""))
    row["ptx_has_entry"] = f".entry {kernel.__name__}" in compiled.asm.get("ptx", "")
    for name, pattern in _PTXAS_NUMBERS.items():
        found = re.search(pattern, log.getvalue())
        row[name] = int(found.group(1)) if found else None
    return row


def _probe_kernel(out_ptr, value, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.full([BLOCK], value, tl.float32))


def _broken_kernel(out_ptr, BLOCK: tl.constexpr):
    # Negative control: the inner dimensions of the product do not match.
    product = tl.dot(tl.zeros([BLOCK, BLOCK], tl.float32), tl.zeros([2 * BLOCK, BLOCK], tl.float32))
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.sum(product, 1))


def _toolchain_problem(arches):
    """Why this triton cannot compile for CUDA here (None when it can): checked on a trivial kernel."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as exc:
        return f"triton {triton.__version__} lacks the compile API used here: {exc}"
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return f"triton {triton.__version__} has no NVIDIA backend"
    for arch in arches:
        try:
            row = _compile(JITFunction(_probe_kernel), (torch.empty(16), 1.5), {"BLOCK": 16}, arch, set())
            problem = row.get("error")
        except Exception:  # the API differs from the one used here
            problem = traceback.format_exc(limit=2)
        if problem:
            return f"triton {triton.__version__} cannot compile a trivial kernel for sm_{arch}: {problem}"[:1500]
    return None


def compile_all(arches, matrix, only=""):
    """Record the wrappers' launches (of the cases whose label contains ``only``), compile each
    distinct one per arch; a JSON-able report."""
    problem = _toolchain_problem(arches)
    if problem:
        return {"skip": problem}
    from triton.runtime.jit import JITFunction
    control = _compile(JITFunction(_broken_kernel), (torch.empty(16),), {"BLOCK": 16}, arches[0], set())
    kernels, functions = _kernels_and_functions()
    rows, seen, recorded = [], set(), set()
    torch.manual_seed(0)
    for arch in arches:
        for label, run_case in _cases(matrix):
            if only not in label:
                continue
            with _recorded_launches(kernels, functions, SM_COUNT[arch]) as launches:
                run_case()
            for kernel, args, kwargs in launches:
                recorded.add(kernel.__name__)
                row = _compile(kernel, args, kwargs, arch, seen)
                if row is not None:
                    rows.append({"case": label, **row})
    return {"rows": rows, "not_launched": sorted({k.__name__ for k in kernels} - recorded) if not only else [],
            "negative_control": control}


def format_table(rows):
    """One line per compiled kernel configuration."""
    lines = [f"{'sm':>3} {'regs':>4} {'spill st/ld B':>13} {'warps':>5} {'stg':>3} {'s':>5}  kernel config  (case)"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['arch']:>3} COMPILE ERROR {r['kernel']} {r['config']} ({r['case']})")
            continue
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{r['arch']:>3} {r['registers']!s:>4} {spills:>13} {r['num_warps']:>5} "
                     f"{r['num_stages']:>3} {r['seconds']:>5}  {r['kernel']} {r['config']}  ({r['case']})")
    return "\n".join(lines)


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SM_COUNT))
    parser.add_argument("--matrix", choices=("fast", "full"), default="fast")
    parser.add_argument("--only", default="", help="only the cases whose label contains this")
    parser.add_argument("--json", type=Path, help="write the report here instead of printing a table")
    ns = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter replaces @triton.jit kernels")
    report = compile_all(ns.arch, ns.matrix, ns.only)
    if ns.json:
        ns.json.write_text(json.dumps(report, default=str))
    elif "skip" in report:
        print("skipped:", report["skip"])
    else:
        print(format_table(report["rows"]))
        print("kernels never launched:", report["not_launched"] or "none")
    return SKIP_EXIT if "skip" in report else int(any("error" in r for r in report.get("rows", ())))


# ---------------------------------------------------------------------------------------------
# Test side
# ---------------------------------------------------------------------------------------------

def _run_worker(tmp_path, arches, matrix, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Compile for real every time (a cache hit has no ptxas log) into a throwaway cache.
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_ALWAYS_COMPILE="1",
               TRITON_DUMP_PTXAS_LOG="1")
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, __file__, "--arch", *map(str, arches), "--matrix", matrix, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        pytest.fail(f"compile worker died (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(out.read_text())
    if "skip" in report:
        pytest.skip(report["skip"])
    return report


def _check(report):
    assert "error" in report["negative_control"], "a kernel that cannot compile was not reported"
    rows = report["rows"]
    print("\n" + format_table(rows))
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n\n".join(f"{r['kernel']} sm_{r['arch']} {r['config']} ({r['case']}):\n{r['error']}"
                                   for r in errors)
    assert not report["not_launched"], f"kernels no case launches: {report['not_launched']}"
    for r in rows:
        assert r["cubin_bytes"] > 0 and r["ptx_has_entry"], r
        assert r["registers"] is not None, f"no ptxas register count for {r}"


def test_every_kernel_compiles_for_sm90(tmp_path):
    """Each kernel, each dtype, the CUDA block sizes of prefill/decode/forward/backward launches."""
    _check(_run_worker(tmp_path, [90], "fast", timeout=300))


@pytest.mark.slow
def test_kernel_matrix_compiles_for_sm80_and_sm90(tmp_path):
    """The wider matrix (fp32 factor pools, unmasked, no context grad, small D) on both archs."""
    _check(_run_worker(tmp_path, [80, 90], "full", timeout=1800))


if __name__ == "__main__":
    sys.exit(_main())
