"""The GPU runbook (`make gpu`, scripts/gpu_runbook.py) planned and exercised on the CPU.

The dry run goes through make end to end; real runs here execute only cheap stages (the probe,
a sleeping command under `timeout`), never a build, a bench or the GPU tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


runbook = _load("gpu_runbook")
wheels_prep = _load("gpu_wheels")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_dry_run_plans_the_issue_benches_first_and_logs_every_stage(tmp_path):
    run_dir = tmp_path / "run"
    args = f"--run-dir {run_dir} --wheels {tmp_path / 'no-wheels'}"
    proc = subprocess.run(["make", "-s", "gpu", "DRY_RUN=1", f"GPU_PYTHON={sys.executable}", f"GPU_ARGS={args}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = json.loads((run_dir / "runbook.json").read_text())
    assert log["dry_run"] is True
    stages = {s["name"]: s for s in log["stages"]}
    kernels = sorted(p.stem for p in (ROOT / "bench").glob("bench_*.py") if not p.stem.startswith("bench_e2e"))
    e2e = sorted(p.stem for p in (ROOT / "bench").glob("bench_e2e*.py"))
    assert "bench_lora_sgmv" in kernels and e2e == ["bench_e2e", "bench_e2e_serve", "bench_e2e_ttft"]
    first = ["bench_train", "bench_e2e_ttft", "bench_e2e_serve"]  # the open issues' GPU targets
    rest = [name for name in kernels + e2e if name not in first]
    assert list(stages) == ["probe", "wheels", "install", *first, "test-gpu", *rest]
    assert rest[-1] == "bench_e2e"

    for s in log["stages"]:
        assert s["shell"].split("timeout -k 15 ")[1].startswith(f"{s['timeout_s']} {sys.executable} ")
        assert s["timeout_s"] <= 540 and s["exit_code"] is None and s["results"] == []
        assert f"== {s['name']} ({s['group']}): {s['shell']}" in proc.stdout
    assert stages["wheels"]["status"] == "skipped" and "make gpu-wheels" in stages["wheels"]["reason"]
    assert all(s["status"] == "dry-run" for s in log["stages"] if s["name"] != "wheels")

    install = stages["install"]
    assert install["command"][1:] == ["-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e",
                                      "."]
    assert install["env"]["CUDA_ARCHS"] == "90" and install["shell"].startswith("CUDA_ARCHS=90 MAX_JOBS=")
    assert stages["test-gpu"]["command"][1:6] == ["-m", "pytest", "-m", "gpu", "tests/"]
    for name in [*kernels, *e2e]:
        assert stages[name]["command"][1:5] == ["-m", "pytest", f"bench/{name}.py", "--benchmark"]
        assert stages[name]["group"] == ("bench-e2e" if name in e2e else "bench-kernels")


def test_dry_run_installs_carried_wheels_offline_and_counts_them_as_present(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "av-19.0.2-cp312-abi3-manylinux_2_28_x86_64.whl").write_bytes(b"")
    (wheels / "v2l_absent_mod-1.0-py3-none-any.whl").write_bytes(b"")
    assert runbook.main(["--dry-run", "--stages", "wheels", "--run-dir", str(tmp_path), "--wheels", str(wheels)]) == 0
    (entry,) = json.loads((tmp_path / "runbook.json").read_text())["stages"]
    assert entry["status"] == "dry-run"
    assert entry["command"][1:8] == ["-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels)]
    assert entry["command"][8:] == sorted(str(p) for p in wheels.glob("*.whl"))

    stage = runbook.Stage("needs-absent", "test", ["true"], needs={"v2l_absent_mod": "v2l-absent-mod", "json": "json"})
    prereq = runbook.prerequisites([stage], wheels, "/usr/bin:/bin")
    assert prereq["modules"]["json"] is True and prereq["missing"] == ["v2l_absent_mod"]
    assert prereq["from_wheels"] == ["v2l_absent_mod"] and prereq["tools"]["timeout"]


def test_carried_authors_code_reaches_every_bench_stage(tmp_path):
    """`make gpu-wheels` copies $V2L_AUTHORS_CODE's folders into wheels/authors/; the plan then sets
    V2L_AUTHORS_CODE for each bench stage (the authors rows of bench_train / bench_e2e), and not
    without the copies."""
    src, deps = tmp_path / "Video2LoRA" / "src", tmp_path / "deps"
    (src / "ctx_to_lora").mkdir(parents=True)
    (src / "ctx_to_lora" / "__init__.py").write_text("")
    (src / "ctx_to_lora" / "__pycache__").mkdir()
    (deps / "einops").mkdir(parents=True)
    wheels = tmp_path / "wheels"
    copies = wheels_prep.copy_authors_code(f"{src}{os.pathsep}{deps}", wheels)
    assert [c.name for c in copies] == ["0-src", "1-deps"]
    package = copies[0] / "ctx_to_lora"
    assert (package / "__init__.py").is_file() and not (package / "__pycache__").exists()

    stages = runbook.plan("python3", wheels, tmp_path / "run", "90")
    expected = os.pathsep.join(str(c.resolve()) for c in copies)
    benches = [s for s in stages if s.name.startswith("bench_")]
    assert benches and all(s.env == {"V2L_AUTHORS_CODE": expected} for s in benches)
    assert all("V2L_AUTHORS_CODE" not in s.env for s in stages if not s.name.startswith("bench_"))
    assert benches[0].shell(60).startswith(f"V2L_AUTHORS_CODE={expected} timeout")
    assert all(not s.env for s in runbook.plan("python3", tmp_path / "none", tmp_path / "run", "90")
               if s.name.startswith("bench_"))
    with pytest.raises(SystemExit, match=r"^V2L_AUTHORS_CODE: expected folders, got \['/nowhere'\] \(not found\)$"):
        wheels_prep.copy_authors_code("/nowhere", wheels)


def test_real_run_records_exit_code_wall_time_and_copies_log_and_results_out(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    common = ["--run-dir", str(run_dir), "--out", str(out)]
    assert runbook.main(["--stages", "probe", *common]) == 0
    (probe,) = json.loads((run_dir / "runbook.json").read_text())["stages"]
    assert probe["status"] == "ok" and probe["exit_code"] == 0 and probe["wall_s"] > 0
    assert probe["probe"]["packages"]["torch"] and probe["probe"]["python_headers"] is True
    assert "cuda_available" in probe["probe"]
    assert json.loads((out / "gpu_runbook.json").read_text())["stages"][0]["status"] == "ok"
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        assert {"gpu_runbook/probe.log", "gpu_runbook/probe.json", "gpu_runbook/runbook.json"} <= set(tar.getnames())

    # A second call on the same machine resumes: the probe's record is kept, it is not run again;
    # with 5 s of budget left, the install cannot start.
    (run_dir / "probe.log").unlink()
    assert runbook.main(["--stages", "probe,install", "--resume", "--budget", "5", *common]) == 0
    again, install = json.loads((run_dir / "runbook.json").read_text())["stages"]
    assert again == {**probe, "from_earlier_run": True} and not (run_dir / "probe.log").exists()
    assert install["status"] == "skipped" and install["reason"].startswith("budget:") and install["exit_code"] is None


def test_a_stage_reports_the_results_json_and_plots_it_wrote(tmp_path, monkeypatch):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    for name in ("bench_e2e_serve_gpu.json", "bench_e2e_serve_gpu.png", "ttft_gpu.png", "notes.txt", "old.json"):
        (results / name).write_text("x")
    os.utime(results / "old.json", (1, 1))  # written before the stage began
    monkeypatch.setattr(runbook, "ROOT", tmp_path)
    assert runbook.new_results(since=1000.0) == ["bench/results/bench_e2e_serve_gpu.json",
                                                 "bench/results/bench_e2e_serve_gpu.png", "bench/results/ttft_gpu.png"]


def test_stage_over_its_timeout_is_stopped_and_reported(tmp_path):
    stage = runbook.Stage("sleeper", "test", [sys.executable, "-c", "import time; print('start', flush=True); "
                                              "time.sleep(30)"])
    code = runbook.run_stage(stage, 1, {"PATH": "/usr/bin:/bin"}, tmp_path / "sleeper.log")
    assert code == 124 and runbook.status_of(code) == "timeout"
    assert (tmp_path / "sleeper.log").read_text() == "start\n"
    assert [runbook.status_of(c) for c in (0, 1, 5, 137)] == ["ok", "failed", "no-tests", "timeout"]


def test_unknown_stage_name_is_refused_with_the_valid_names(tmp_path, capsys):
    assert runbook.main(["--dry-run", "--stages", "bench_lora", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--stages: expected names from" in err and "'bench_lora_sgmv'" in err and "['bench_lora']" in err


def test_wheel_prep_targets_the_gpu_python_and_covers_what_its_image_lacks():
    assert {"av", "num2words", "docopt"} <= {wheels_prep.dist_name(r) for r in wheels_prep.WHEELS}
    cmd = wheels_prep.download_command("av>=12", Path("wheels"), "3.12")
    assert cmd[1:7] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version"]
    assert cmd[7] == "3.12" and "manylinux_2_28_x86_64" in cmd and cmd[-3:] == ["-d", "wheels", "av>=12"]
    build = wheels_prep.build_command("docopt>=0.6.2", Path("w"))
    assert build[1:4] == ["-m", "pip", "wheel"] and build[-4:] == ["--no-binary=:all:", "-w", "w", "docopt>=0.6.2"]
