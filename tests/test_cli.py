"""The ``v2l-fast`` command line, run in-process: demo, info, internalize → ask on a tiny model
saved to disk, and bad input (exit code 2, one line on stderr, no traceback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run

import v2l_fast
from v2l_fast.adapters import Adapters
from v2l_fast.cli import main
from v2l_fast.cli.demo import demo_session, write_synthetic_video
from v2l_fast.hypernet import save_frames2lora
from v2l_fast.ops import available_backends, resolve, use_backend
from v2l_fast.testing import assert_rel_close, write_test_video
from v2l_fast.vlm import read_video
from v2l_fast.vlm.factory import image_seq_len, random_smolvlm, tiny_smolvlm_tokenizer

QUESTIONS = ["What is shown?", "Is anyone moving at all?"]




def assert_bad_input(result, *fragments: str) -> None:
    """Exit code 2 and one error line, the last on stderr (progress bars of model loading may
    come before it), naming ``fragments``; no traceback."""
    code, _, err = result
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and [line for line in lines if line.startswith("v2l-fast")] == lines[-1:], err
    for fragment in fragments:
        assert fragment in lines[-1]


def save_model(model, directory) -> str:
    model.save_pretrained(directory)
    tiny_smolvlm_tokenizer(model.config.text_config.vocab_size).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny VLM and its hypernetwork on disk, the same session in memory, two videos."""
    root = tmp_path_factory.mktemp("cli")
    session = demo_session(seed=5, device=torch.device("cpu"), max_frames=3)
    videos = [root / "a.mp4", root / "b.mp4"]
    write_test_video(videos[0], num_frames=10, fps=2, seed=1)
    write_synthetic_video(videos[1], seconds=3)
    return {"session": session, "vlm": save_model(session.vlm.model, root / "vlm"),
            "hypernet": save_frames2lora(session.hypernet, root / "hypernet"), "videos": videos, "root": root}


@pytest.fixture(scope="module")
def adapters_file(saved):
    path = saved["root"] / "two.safetensors"
    assert main(["internalize", *map(str, saved["videos"]), "--vlm", saved["vlm"], "--hypernet", saved["hypernet"],
                 "--out", str(path), "--dtype", "fp32", "--max-frames", "3", "--device", "cpu"]) == 0
    return path


def test_demo_runs_the_whole_path_with_zero_visual_tokens_in_the_answers(capsys):
    code, out, err = run(capsys, "demo", "--random", "--frames", "2", "--max-new-tokens", "3",
                         "--questions", "Q one?", "Q two?")
    assert code == 0, err
    assert "RANDOM" in out and "meaningless" in out and "--vlm" in out and "--hypernet" in out
    internalized = re.search(r"once: (\d+) context tokens, (\d+) visual \(<image>\) from (\d+) frames", out)
    assert internalized and int(internalized[2]) == 2 * image_seq_len("tiny") and int(internalized[3]) == 2
    assert int(internalized[1]) > int(internalized[2])
    asked = re.search(r"per question: adapter (\d+)–(\d+) tokens, (\d+) visual; video in context (\d+)–(\d+) "
                      r"tokens, (\d+) visual", out)
    assert asked and int(asked[1]) > 0 and asked[3] == "0" and int(asked[6]) == 2 * image_seq_len("tiny")
    assert int(asked[4]) > int(asked[2])
    assert "A [1, 4, 8, 128], B [1, 4, 8, 64]" in out
    assert "answers with the reloaded adapter: identical" in out
    assert re.search(r"\n    Q one\? +'.*' +'.*'\n    Q two\? +'.*' +'.*'\n", out) and "truth" not in out
    for stage in ("load models", "write video", "internalize", "ask (adapter)", "ask (video in context)"):
        assert re.search(rf"\n  {re.escape(stage)} +[\d.]+ ms", out), stage
    assert "lora_sgmv=" in out and "perceiver_attention=" in out


@pytest.mark.triton
def test_demo_backend_switch_gives_the_same_answers(capsys):
    """--backend triton (interpreter on CPU) routes the Perceiver and the LoRA through the kernels
    and answers as the default backends do."""
    argv = ("demo", "--random", "--frames", "1", "--max-new-tokens", "3", "--questions", "What?")
    code, default, _ = run(capsys, *argv)
    assert code == 0
    code, triton, err = run(capsys, *argv, "--backend", "triton")
    assert code == 0, err
    assert "perceiver_attention=triton" in triton and "lora_sgmv=triton" in triton
    answer = re.compile(r"\n    What\? +('.*')\n")
    assert answer.search(triton)[1] == answer.search(default)[1]


def test_backend_option_is_a_scope_and_leaves_the_environment_alone(capsys, monkeypatch):
    monkeypatch.delenv("V2L_BACKEND", raising=False)
    code, out, err = run(capsys, "demo", "--random", "--frames", "1", "--max-new-tokens", "2", "--questions", "What?",
                         "--backend", "torch")
    assert code == 0, err
    assert re.search(r"\n  backend +torch: perceiver_attention=torch, swiglu_mlp=torch, compose_adapters=torch, "
                     r"lora_sgmv=torch\n", out)
    assert "V2L_BACKEND" not in os.environ
    assert resolve("lora_sgmv", "auto", torch.device("cpu")).backend == available_cpu_lora_backend()


def available_cpu_lora_backend() -> str:
    """What auto picks for lora_sgmv on the CPU with no setting in force."""
    with use_backend("auto"):
        return resolve("lora_sgmv", "auto", torch.device("cpu")).backend


def test_synthetic_video_shows_the_shapes_moving(tmp_path):
    path = tmp_path / "shapes.mp4"
    assert write_synthetic_video(path, seconds=3) == 12
    video = read_video(path, max_frames=3)
    assert video.frames.shape == (3, 96, 128, 3) and video.duration == 3.0

    def centre(frame, colour_channel):
        others = [c for c in range(3) if c != colour_channel]
        mask = (frame[..., colour_channel] > 150) & (frame[..., others] < 120).all(-1)
        rows, cols = np.nonzero(mask)
        assert rows.size > 30
        return rows.mean(), cols.mean()

    first, last = video.frames[0], video.frames[-1]
    assert centre(last, 0)[1] - centre(first, 0)[1] > 50  # the red square crosses to the right
    assert centre(last, 1)[0] - centre(first, 1)[0] > 40  # the green disc falls


def test_info_lists_versions_build_and_backends(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"v2l_fast {v2l_fast.__version__}" in out and f"torch         {torch.__version__}" in out
    assert f"available backends: {', '.join(available_backends())}\n" in out
    assert f"built         {v2l_fast.build_info()['built']}" in out
    from importlib.metadata import version
    assert f"fastapi       {version('fastapi')} (optional: v2l-fast serve)" in out
    assert re.search(r"auto on cpu: perceiver_attention=\w+, swiglu_mlp=\w+, compose_adapters=\w+, lora_sgmv=\w+",
                     out)


@pytest.mark.parametrize("amx,line", [
    (True, "bf16 on cpu   AMX: training autocasts to bf16, --dtype auto loads bf16\n"),
    (False, "bf16 on cpu   training and --dtype auto stay fp32: this CPU has no AMX tiles"),
])
def test_info_says_whether_training_and_dtype_auto_use_bf16_on_this_cpu(capsys, monkeypatch, amx, line):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    code, out, _ = run(capsys, "info")
    assert code == 0 and line in out


def test_info_reports_what_auto_picks_whatever_the_environment_says(capsys, monkeypatch):
    monkeypatch.setenv("V2L_BACKEND", "torch")
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f", lora_sgmv={available_cpu_lora_backend()}\n" in out.split("auto on cpu: ")[1]
    for name in ("torch", "triton", "cuda", "cpp"):
        if name not in available_backends():
            assert re.search(rf"\n  {name}: \S", out), name  # why it cannot run


def test_internalize_writes_the_adapters_the_api_makes(saved, adapters_file, capsys):
    expected = saved["session"].internalize(saved["videos"])
    got = Adapters.load(adapters_file, model=saved["session"].vlm.model)
    assert got.A.shape == (2, 4, 8, 128) and got.alpha == expected.alpha
    assert_rel_close(got.A, expected.A, tol=1e-6)
    assert_rel_close(got.B, expected.B, tol=1e-6)
    batched = saved["root"] / "batched.safetensors"
    code, out, err = run(capsys, "internalize", *saved["videos"], "--vlm", saved["vlm"], "--hypernet",
                         saved["hypernet"], "--out", batched, "--dtype", "fp32", "--max-frames", "3",
                         "--batch-size", "1")
    assert code == 0, err
    assert f"adapter 1: {saved['videos'][1]}" in out and "A [2, 4, 8, 128]" in out
    assert_rel_close(Adapters.load(batched).A, expected.A, tol=1e-5)


def test_ask_answers_as_the_api_with_the_chosen_adapters(saved, adapters_file, capsys):
    session = saved["session"]
    adapters = Adapters.load(adapters_file)
    expected = session.ask(adapters[[1, 0]], QUESTIONS, max_new_tokens=6)
    code, out, err = run(capsys, "ask", adapters_file, *QUESTIONS, "--vlm", saved["vlm"], "--adapter", "1", "0",
                         "--max-new-tokens", "6", "--dtype", "fp32")
    assert code == 0, err
    assert f"[adapter 1] Q: {QUESTIONS[0]}\nA: {expected[0]}\n" in out
    assert f"[adapter 0] Q: {QUESTIONS[1]}\nA: {expected[1]}\n" in out
    one = saved["root"] / "one.safetensors"
    adapters[1].save(one)
    code, out, err = run(capsys, "ask", one, QUESTIONS[0], "--vlm", saved["vlm"], "--max-new-tokens", "6",
                         "--dtype", "fp32")
    assert code == 0, err
    assert f"[adapter 0] Q: {QUESTIONS[0]}\nA: {expected[0]}\n" in out


@pytest.mark.parametrize("hardware, loaded", [("AMX", "bf16"), ("CUDA", "bf16"), (None, "fp32")])
def test_dtype_auto_is_bf16_where_the_device_multiplies_it_in_hardware(saved, adapters_file, capsys, monkeypatch,
                                                                       hardware, loaded):
    from v2l_fast.cli import common

    asked = []
    monkeypatch.setattr(common, "bf16_matmul_hardware", lambda device: asked.append(device) or hardware)
    code, out, err = run(capsys, "ask", adapters_file, QUESTIONS[0], "--vlm", saved["vlm"], "--adapter", "0",
                         "--max-new-tokens", "2", "--device", "cpu")  # --dtype auto, the default
    assert code == 0, err
    assert f"loaded {saved['vlm']} ({loaded}, cpu)" in out and asked == [torch.device("cpu")]
    code, out, err = run(capsys, "ask", adapters_file, QUESTIONS[0], "--vlm", saved["vlm"], "--adapter", "0",
                         "--max-new-tokens", "2", "--dtype", "fp32")
    assert code == 0 and f"loaded {saved['vlm']} (fp32, cpu)" in out, err  # an explicit dtype is kept
    assert "auto = bf16 where the device multiplies bf16 in hardware" in " ".join(
        run(capsys, "ask", "--help")[1].split())


def test_demo_runs_given_weights_on_your_clip_and_answers_as_the_api(saved, capsys):
    """--vlm/--hypernet (here tiny random ones saved to disk; real SmolVLM2 weights go the same way)."""
    import v2l_fast

    session = v2l_fast.load(saved["vlm"], saved["hypernet"], dtype=torch.float32, device="cpu")
    adapter_answer = session.ask(session.internalize([saved["videos"][1]]), QUESTIONS[:1], max_new_tokens=5)[0]
    code, out, err = run(capsys, "demo", "--vlm", saved["vlm"], "--hypernet", saved["hypernet"], "--video",
                         saved["videos"][1], "--questions", QUESTIONS[0], "--dtype", "fp32", "--max-new-tokens", "5")
    assert code == 0, err
    assert f"demo: {saved['vlm']} + {saved['hypernet']} (fp32)" in out and "RANDOM" not in out
    assert re.search(rf"\n    {re.escape(QUESTIONS[0])} +{re.escape(repr(adapter_answer))} ", out)


def test_bad_input_is_one_line_and_exit_code_2(saved, adapters_file, tmp_path, capsys):
    vlm, hypernet = saved["vlm"], saved["hypernet"]
    internalize = ("internalize", "--vlm", vlm, "--hypernet", hypernet, "--max-frames", "3", "--dtype", "fp32",
                   "--out", tmp_path / "out.safetensors")
    assert_bad_input(run(capsys, *internalize, tmp_path / "missing.mp4"), "video file: expected an existing file",
                     "missing.mp4', which was not found")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    assert_bad_input(run(capsys, *internalize, corrupt), "corrupt.mp4")
    assert_bad_input(run(capsys, "internalize", saved["videos"][0], "--vlm", tmp_path / "nowhere",
                         "--hypernet", hypernet), "name_or_path", "nowhere")
    other = random_smolvlm("tiny", seed=6, num_hidden_layers=2)
    other_hypernet = save_frames2lora(demo_session(6, torch.device("cpu"), 3).hypernet, tmp_path / "hn-other")
    other_vlm = save_model(other, tmp_path / "other-vlm")
    assert_bad_input(run(capsys, "internalize", saved["videos"][0], "--vlm", other_vlm, "--hypernet",
                         other_hypernet, "--dtype", "fp32"), "num_layers")
    assert_bad_input(run(capsys, *internalize[:-2], "--out", tmp_path / "no-dir" / "a.safetensors",
                         saved["videos"][0]), "--out", "does not exist")
    assert_bad_input(run(capsys, *internalize[:-2], "--out", tmp_path, saved["videos"][0]), "--out", "directory")

    ask = ("ask", adapters_file, "--vlm", vlm, "--dtype", "fp32", "--max-new-tokens", "2")
    assert_bad_input(run(capsys, "ask", adapters_file, "Hi?", "--vlm", other_vlm), "another base model")
    assert_bad_input(run(capsys, *ask, "Hi?"), "--adapter", "holds 2 adapters")
    assert_bad_input(run(capsys, *ask, "Hi?", "--adapter", "2"), "--adapter", "out of range")
    assert_bad_input(run(capsys, *ask, "Hi?", "Ho?", "Ha?", "--adapter", "0", "1"), "one index or one per question")
    assert_bad_input(run(capsys, *ask, "look: <image>", "--adapter", "0"), "image tokens")
    assert_bad_input(run(capsys, "ask", tmp_path / "none.safetensors", "Hi?", "--vlm", vlm),
                     "adapters file: expected an existing file", "none.safetensors', which was not found")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    assert_bad_input(run(capsys, "ask", garbage, "Hi?", "--vlm", vlm), "cannot read adapters")

    assert_bad_input(run(capsys, "demo", "--backend", "nope"), "--backend", "invalid choice")
    assert_bad_input(run(capsys, "demo", "--random", "--frames", "0"), "--frames", "positive integer")
    assert_bad_input(run(capsys, "demo", "--device", "toaster"), "--device", "toaster")
    assert_bad_input(run(capsys), "COMMAND")
    if not torch.cuda.is_available():
        assert_bad_input(run(capsys, "demo", "--backend", "cuda"), "--backend cuda", "cannot run here")
        assert_bad_input(run(capsys, "demo", "--device", "cuda"), "--device", "no CUDA device")


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    """``python -m v2l_fast`` as a process: bad input gives exit code 2 and one line on stderr."""
    done = subprocess.run([sys.executable, "-m", "v2l_fast", "internalize", str(tmp_path / "gone.mp4"), "--vlm", "x",
                           "--hypernet", "y"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == ("v2l-fast internalize: error: video file: expected an existing file, got "
                                   f"{str(tmp_path / 'gone.mp4')!r}, which was not found")


def test_a_reader_that_stops_early_is_not_an_error():
    """``v2l-fast info | head -1``: a closed pipe ends the command quietly, exit code 0. The pipe
    is closed before the command starts, so every write of it fails."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "v2l_fast", "info"], stdout=write_end, stderr=subprocess.PIPE,
                              timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr == b""


def test_the_checkout_root_does_not_shadow_the_kernels_package_transformers_imports():
    """``python -c`` / ``python -m`` started in the checkout's root: once `v2l_fast` is imported,
    ``kernels`` is the PyPI package transformers imports, not the Triton sources' ``kernels/``."""
    root = Path(__file__).resolve().parent.parent
    code = ("import importlib.util, v2l_fast; spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else '')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip().startswith(str(root / "kernels")), done.stdout
