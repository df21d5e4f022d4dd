#!/usr/bin/env python3
"""GPU runbook (`make gpu`): install v2l_fast offline, build the CUDA extension, measure, test.

For a GPU machine whose python already holds torch, triton, transformers and peft and that
reaches no package registry. Stages, in this order (the open issues' GPU targets first, since
the device time may run out before the end; then correctness; then the other timings):

  probe           versions, the GPU, the measured copy and bf16 matmul ceilings (scripts/gpu_probe.py)
  wheels          pip install --no-index --no-deps of wheels/*.whl (`make gpu-wheels` fills it)
  install         pip install --no-index --no-deps --no-build-isolation -e .  (CMake + ninja build _C)
  FIRST_BENCHES   the training step, time to first token, engine throughput (pytest … --benchmark)
  test-gpu        pytest -m gpu tests/
  bench_<name>    pytest bench/bench_<name>.py --benchmark, one stage per other kernel bench file
  bench_e2e*      the other end-to-end bench files (bench/bench_e2e*.py), last

Each stage runs under coreutils `timeout` (at most STAGE_LIMIT_S, so one stage fits one 10-minute
device command), its output goes to the console and to <run-dir>/<stage>.log, and after each stage
<run-dir>/runbook.json records what every stage ran: command, exit code, status, wall time and the
bench/results/*.json (and *.png plots) it wrote. `--budget S` fits the whole run into S seconds (a
stage that cannot get MIN_STAGE_S is skipped); `--resume` keeps the stages that an earlier run in the same
run dir finished ok and runs the rest; `--out DIR` copies the log and a tarball of the results there after each stage.
`--dry-run` prints every stage's exact command, checks its prerequisites and writes the log,
running nothing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE_LIMIT_S = 540  # one stage, under the device's 10-minute limit for one command
MIN_STAGE_S = 20  # a stage given less than this by --budget is skipped instead
# The benches behind the open issues' GPU targets (training step ≥ 3× the authors'; time to first
# token ≥ 10× / ≥ 100×; engine throughput, NVML), run right after set-up.
FIRST_BENCHES = ("bench_train", "bench_e2e_ttft", "bench_e2e_serve")
KILL_AFTER_S = 15  # `timeout` sends KILL this long after TERM

# Python modules the stages import, by the distribution that provides them.
BUILD = {"setuptools": "setuptools", "wheel": "wheel"}  # plus the cmake and ninja tools (TOOLS)
RUNTIME = {"torch": "torch", "triton": "triton", "transformers": "transformers", "safetensors": "safetensors",
           "av": "av", "numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm"}
TESTING = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark"}
BENCH = {"peft": "peft"}
OPTIONAL = {"num2words": "num2words"}  # tests that need it skip without it
TOOLS = ("timeout", "nvcc", "nvidia-smi", "cmake", "ninja")


@dataclass
class Stage:
    """One step of the runbook: a command run under `timeout` from the repository root."""

    name: str
    group: str
    command: list[str]
    timeout_s: int = STAGE_LIMIT_S
    env: dict[str, str] = field(default_factory=dict)
    needs: dict[str, str] = field(default_factory=dict)
    skip_reason: str | None = None

    def shell(self, timeout_s: int) -> str:
        """The exact command line the stage runs, environment and `timeout` included."""
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*env, shlex.join(self.argv(timeout_s))])

    def argv(self, timeout_s: int) -> list[str]:
        """The command wrapped in `timeout` (TERM after ``timeout_s``, KILL KILL_AFTER_S later)."""
        return ["timeout", "-k", str(KILL_AFTER_S), str(timeout_s), *self.command]


def bench_files(root: Path = ROOT) -> tuple[list[Path], list[Path]]:
    """The bench files split into (kernel benches, end-to-end benches), each sorted by name."""
    files = sorted((root / "bench").glob("bench_*.py"))
    e2e = [f for f in files if f.stem.startswith("bench_e2e")]
    return [f for f in files if f not in e2e], e2e


def plan(python: str, wheels: Path, run_dir: Path, cuda_archs: str, root: Path = ROOT) -> list[Stage]:
    """The runbook's stages in run order."""
    py = [python]
    wheel_files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    stages = [
        Stage("probe", "setup", [*py, "scripts/gpu_probe.py", "--json", str(run_dir / "probe.json")], timeout_s=120,
              needs={"torch": "torch"}),
        Stage("wheels", "setup",
              [*py, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels),
               *map(str, wheel_files)],
              timeout_s=180, needs={"pip": "pip"},
              skip_reason=None if wheel_files else f"no wheels in {wheels} (run `make gpu-wheels` where pip works)"),
        Stage("install", "setup",
              [*py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."],
              env={"CUDA_ARCHS": cuda_archs, "MAX_JOBS": str(os.cpu_count() or 1)},
              needs={**BUILD, "torch": "torch"}),
    ]
    kernels, e2e = bench_files(root)
    bench_needs = {**RUNTIME, **TESTING, **BENCH}
    authors = authors_code(wheels)
    bench_env = {"V2L_AUTHORS_CODE": authors} if authors else {}

    def bench(path: Path) -> Stage:
        group = "bench-e2e" if path in e2e else "bench-kernels"
        return Stage(path.stem, group, _bench_command(py, path, root), env=bench_env, needs=bench_needs)

    first = sorted((p for p in kernels + e2e if p.stem in FIRST_BENCHES), key=lambda p: FIRST_BENCHES.index(p.stem))
    stages += [bench(path) for path in first]
    stages.append(Stage("test-gpu", "test",
                        [*py, "-m", "pytest", "-m", "gpu", "tests/", "-q", "-p", "no:cacheprovider",
                         f"--junitxml={run_dir / 'test-gpu.xml'}"],
                        needs={**RUNTIME, **TESTING}))
    stages += [bench(path) for path in kernels + e2e if path not in first]
    return stages


def authors_code(wheels: Path) -> str:
    """``$V2L_AUTHORS_CODE`` for the benches: the copies `make gpu-wheels` put in wheels/authors/
    (absolute, os.pathsep-separated), or "" without them."""
    folder = wheels / "authors"
    copies = sorted(p.resolve() for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return os.pathsep.join(map(str, copies))


def _bench_command(py: list[str], path: Path, root: Path) -> list[str]:
    return [*py, "-m", "pytest", str(path.relative_to(root)), "--benchmark", "-q", "-p", "no:cacheprovider"]


def wheel_dists(wheels: Path) -> set[str]:
    """Normalised distribution names of the wheels in ``wheels`` ("pytest_benchmark")."""
    return {p.name.split("-")[0].lower().replace(".", "_") for p in wheels.glob("*.whl")} if wheels.is_dir() else set()


def prerequisites(stages: list[Stage], wheels: Path, env_path: str) -> dict:
    """Modules (of this python) and tools the run needs: found, missing, and missing but brought by a wheel."""
    needed = {**{m: d for s in stages for m, d in s.needs.items()}, **OPTIONAL}
    found = {m: importlib.util.find_spec(m) is not None for m in sorted(needed)}
    brought = wheel_dists(wheels)
    missing = sorted(m for m, ok in found.items() if not ok)
    return {
        "modules": found,
        "missing": missing,
        "from_wheels": [m for m in missing if needed[m].replace("-", "_").lower() in brought],
        "tools": {t: shutil.which(t, path=env_path) for t in TOOLS},
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_stage(stage: Stage, timeout_s: int, env: dict[str, str], log_path: Path) -> int:
    """Run ``stage`` under `timeout`, teeing its output to the console and ``log_path``."""
    popen = {"cwd": ROOT, "env": {**env, **stage.env}, "text": True, "errors": "replace",
             "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    with log_path.open("w") as log, subprocess.Popen(stage.argv(timeout_s), **popen) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


def status_of(code: int) -> str:
    """Stage status from the exit code of `timeout CMD` (124: timed out, 137: killed after it)."""
    if code == 0:
        return "ok"
    if code in (124, 137):
        return "timeout"
    if code == 5:  # pytest: nothing collected
        return "no-tests"
    return "failed"


def new_results(since: float) -> list[str]:
    """bench/results/*.json written at or after ``since`` (the harness writes one per bench module),
    and the PNG plots drawn beside some of them."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "results").iterdir()
                  if p.suffix in (".json", ".png") and p.stat().st_mtime >= since)


def write_out(log: dict, log_path: Path, run_dir: Path, out: Path) -> None:
    """Copy the stage log to ``out`` with a tarball of the run dir and the results it lists."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(log_path, out / "gpu_runbook.json")
    results = {r for s in log["stages"] for r in s.get("results", [])}
    with tarfile.open(out / "gpu_results.tar.gz", "w:gz") as tar:
        for rel in sorted(results):
            if (ROOT / rel).exists():  # an earlier call's results may be gone from a re-copied tree
                tar.add(ROOT / rel, arcname=rel)
        for path in sorted(run_dir.iterdir()):
            tar.add(path, arcname=f"gpu_runbook/{path.name}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and check prerequisites; run nothing")
    p.add_argument("--stages", help="comma-separated stage names to run (default: all, in order)")
    p.add_argument("--budget", type=float, help="seconds for the whole run; stages that cannot start are skipped")
    p.add_argument("--resume", action="store_true",
                   help="keep the stages that finished ok in run-dir/runbook.json; run the rest")
    p.add_argument("--out", type=Path, help="copy gpu_runbook.json and gpu_results.tar.gz here after each stage")
    p.add_argument("--run-dir", type=Path, default=ROOT / "build" / "gpu_runbook",
                   help="stage logs, junit XML and runbook.json (default: build/gpu_runbook)")
    p.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="wheel folder installed offline (wheels/)")
    p.add_argument("--cuda-archs", default="90", help="CUDA_ARCHS for the extension build (default: 90, Hopper)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run (or with --dry-run, print and check) the runbook; 0 when every stage run was ok."""
    args = parse_args(argv)
    start = time.monotonic()
    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "runbook.json"
    python = sys.executable
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env["PATH"] = os.pathsep.join([str(Path(python).parent), env.get("PATH", "")])
    stages = plan(python, args.wheels.resolve(), run_dir, args.cuda_archs)
    names = [s.name for s in stages]
    if args.stages:
        chosen = [n.strip() for n in args.stages.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            print(f"--stages: expected names from {names}, got {unknown}", file=sys.stderr)
            return 2
        stages = [s for s in stages if s.name in chosen]
    earlier = {}
    if args.resume and log_path.exists():
        earlier = {s["name"]: s for s in json.loads(log_path.read_text())["stages"] if s["status"] == "ok"}
    prereq = prerequisites(stages, args.wheels.resolve(), env["PATH"])
    if prereq["tools"]["timeout"] is None:
        print("gpu_runbook: expected coreutils `timeout` on PATH, got none", file=sys.stderr)
        return 2
    log = {"runbook": "scripts/gpu_runbook.py", "dry_run": args.dry_run, "started": _now(), "python": python,
           "root": str(ROOT), "budget_s": args.budget, "prerequisites": prereq, "stages": []}
    no_tools = [t for t, where in prereq["tools"].items() if where is None]
    print(f"gpu_runbook: {len(stages)} stages, python {python}; missing modules: {prereq['missing'] or 'none'}"
          f" (in wheels: {prereq['from_wheels'] or 'none'}); missing tools: {no_tools or 'none'}")
    worst = 0
    for stage in stages:
        timeout_s = stage.timeout_s
        if args.budget is not None:
            timeout_s = min(timeout_s, int(args.budget - (time.monotonic() - start)))
        missing = [m for m in stage.needs if m in prereq["missing"] and m not in prereq["from_wheels"]]
        entry = {"name": stage.name, "group": stage.group, "command": stage.command, "env": stage.env,
                 "shell": stage.shell(timeout_s), "timeout_s": timeout_s, "missing": missing,
                 "exit_code": None, "wall_s": 0.0, "results": []}
        print(f"\n== {stage.name} ({stage.group}): {entry['shell']}", flush=True)
        if stage.name in earlier:
            entry = {**earlier[stage.name], "from_earlier_run": True}
        elif stage.skip_reason:
            entry.update(status="skipped", reason=stage.skip_reason)
        elif timeout_s < MIN_STAGE_S:
            entry.update(status="skipped", reason=f"budget: {max(timeout_s, 0)} s left, a stage needs {MIN_STAGE_S}")
        elif args.dry_run:
            entry.update(status="dry-run")
        else:
            entry["started"] = _now()
            t0, wall0 = time.monotonic(), time.time()
            code = run_stage(stage, timeout_s, env, run_dir / f"{stage.name}.log")
            entry.update(exit_code=code, status=status_of(code), wall_s=round(time.monotonic() - t0, 1),
                         output=str(run_dir / f"{stage.name}.log"),
                         results=new_results(wall0) if stage.group.startswith("bench") else [])
            if stage.name == "probe" and (run_dir / "probe.json").exists():
                entry["probe"] = json.loads((run_dir / "probe.json").read_text())
            worst = max(worst, int(entry["status"] not in ("ok", "no-tests")))
        notes = [entry.get("reason", "")] + ([f"missing: {', '.join(missing)}"] if missing else [])
        print(f"== {stage.name}: {entry['status']} {'; '.join(n for n in notes if n)}".rstrip())
        log["stages"].append(entry)
        log["wall_s"] = round(time.monotonic() - start, 1)
        log_path.write_text(json.dumps(log, indent=2) + "\n")
        if args.out and not args.dry_run:
            write_out(log, log_path, run_dir, args.out)
    print("\nstage                          status     exit  wall_s  results")
    for s in log["stages"]:
        code = "" if s["exit_code"] is None else s["exit_code"]
        print(f"{s['name']:<30} {s['status']:<10} {code!s:>4} {s['wall_s']:>7}  {' '.join(s['results'])}")
    print(f"stage log: {log_path}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
