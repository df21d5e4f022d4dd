"""The token and FLOP arithmetic of bench/bench_e2e_ttft.py (no model is built)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ttft(bench_module):
    return bench_module("bench_e2e_ttft")


@pytest.mark.parametrize(("size", "per_frame"), [("256M", 64), ("500M", 64), ("2.2B", 81)])
def test_visual_tokens_are_frames_times_tokens_per_frame(ttft, size, per_frame):
    from v2l_fast.vlm.factory import image_seq_len

    assert image_seq_len(size) == per_frame
    counts = {frames: ttft.context_tokens(size, frames) for frames in (8, 64)}
    for frames, tokens in counts.items():
        video, lora = tokens["video"], tokens["lora"]
        assert video["visual"] == frames * per_frame
        assert video["total"] == video["visual"] + video["text"]
        assert lora["visual"] == 0 and lora["total"] == lora["text"]
    # A frame adds its timestamp line ("\nFrame from 00:08:", 10 pieces) and the three wrapper
    # tokens (<fake_token_around_image><global-img> … <fake_token_around_image>); 8 → 9 frames
    # changes no other text ("eight" → "nine", "0:00:08" → "0:00:09").
    nine = ttft.context_tokens(size, 9)["video"]
    assert nine["visual"] - counts[8]["video"]["visual"] == per_frame
    assert nine["text"] - counts[8]["video"]["text"] == 13
    # The LoRA prompt is the question alone, whatever the video's length.
    assert counts[8]["lora"] == counts[64]["lora"]


def test_the_question_prompt_is_what_ask_prefills(ttft):
    from v2l_fast.api import question_ids

    tokenizer = ttft.bench_tokenizer()
    ids = question_ids(tokenizer, ttft.QUESTION)
    assert ttft.context_tokens("256M", 8)["lora"]["total"] == len(ids)
    assert tokenizer.convert_tokens_to_ids("<image>") == 49190  # SmolVLM2's image_token_id
    # SmolLM2-like pieces: the words with their space, the punctuation, the chat markers.
    pieces = ["What", " happens", " in", " the", " video", "?", " ", "0", "0", ":", "1", "2"]
    assert tokenizer.tokenize("What happens in the video? 00:12") == pieces
    assert tokenizer.tokenize("at the zoo") == ["<unk>", " the", "<unk>"]  # unknown words: one token each


def test_flops_grow_with_frames_and_the_lora_prefill_does_not(ttft):
    small, large = (ttft.path_flops("500M", f, ttft.context_tokens("500M", f)) for f in (8, 64))
    assert large["video"] > 7 * small["video"]
    assert large["lora"] == small["lora"]
    tokens = ttft.context_tokens("500M", 8)["video"]["total"]
    lm_head = ttft.prefill_flops("500M", tokens) - ttft.prefill_flops("500M", tokens, lm_head=False)
    assert small["internalize"] == small["video"] - lm_head + ttft.hypernet_flops("500M", tokens)


def test_calibration_borrows_the_last_measured_rate(ttft):
    cal = ttft.Calibration()
    assert cal.seconds("500M", 10)[0] is None and cal.lora_seconds("500M", 10) is None
    cal.add("256M", 2.0, 100, 0.5, 10)
    assert cal.seconds("256M", 50)[0] == pytest.approx(1.0)
    assert cal.seconds("2.2B", 50)[0] == pytest.approx(1.0)
    assert cal.lora_seconds("256M", 99) == 0.5  # the LoRA path does not grow with the video
    assert cal.lora_seconds("2.2B", 40) == pytest.approx(2.0)  # another model: scaled by its FLOPs
    cal.add("500M", 1.0, 100, 0.7, 20)
    assert cal.seconds("256M", 50)[0] == pytest.approx(1.0)
    assert cal.seconds("2.2B", 50)[0] == pytest.approx(0.5)
    assert cal.lora_seconds("2.2B", 40) == pytest.approx(1.4)


def test_gpu_summary_and_the_plot_of_a_full_sweep(ttft, monkeypatch, tmp_path):
    """The GPU-only bookkeeping (no GPU needed: fake telemetry) and the plot of a sweep where
    every point ran, one where points are estimates, and one where the internalization did not run."""
    monkeypatch.setattr(ttft, "ON_GPU", True)
    call = {"torch_peak_bytes": 5, "torch_peak_total_bytes": 9, "power_mean_w": 300.0, "power_max_w": 400.0,
            "energy_j": 3.0, "nvml_memory_used_max_bytes": 11, "samples": 4}
    out = ttft.summarize([0.2, 0.1, 0.3], 10**12, [call, dict(call, torch_peak_bytes=7), call])
    assert out["median_s"] == 0.2 and out["gpu"]["torch_peak_bytes_max"] == 7
    assert out["gpu"]["power_mean_w"] == 300.0 and out["gpu"]["energy_j_median"] == 3.0
    monkeypatch.setattr(ttft, "ON_GPU", False)
    assert ttft.summarize([1.0], 1, [None])["gpu"] == ttft.UNMEASURED_GPU

    from plots import plot_ttft

    rows = []
    for model in ttft.MODELS:
        for frames in ttft.FRAMES:
            tokens = ttft.context_tokens(model, frames) if frames == 8 else {
                "video": {"total": 80 * frames}, "lora": {"total": 13}}
            video, lora = 0.01 * frames, 0.02
            row = {"op": "ttft", "model": model, "frames": frames, "tokens": tokens}
            if model == "2.2B" and frames > 8:
                row.update(status="skipped: est.", estimate={"video_s": video, "lora_s": lora, "ratio": video / lora})
            else:
                row.update(status="measured", video={"median_s": video}, lora={"median_s": lora},
                           internalize={"median_s": video} if model != "500M" else "not run",
                           ratio_median=video / lora)
            rows.append(row)
    path = plot_ttft({"device": "test", "dtype": "bfloat16", "results": rows}, tmp_path / "ttft.png")
    assert path.stat().st_size > 10_000
