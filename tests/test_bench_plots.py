"""Benchmark plots drawn beside their results JSON (bench/harness.py `PLOTS`, bench/plots.py); no model is built."""

from __future__ import annotations

import pytest

PROVIDERS = {"engine": 4800.0, "engine-base": 5400.0, "peft-mixed": 350.0, "peft-swap": 98.0}


@pytest.fixture(scope="module")
def harness(bench_module):
    return bench_module("harness")


def serving_rows(model: str, dtype: str) -> list[dict]:
    """Rows as bench_e2e_serve.py records them (derived fields only; no timings needed to draw)."""
    rows = []
    for provider, tokens_per_s in PROVIDERS.items():
        row = dict(op="engine_throughput", model=model, dtype=dtype, provider=provider, videos=64, questions=8,
                   new_tokens=32, tokens_per_s=tokens_per_s, onednn_switched_off=provider == "peft-mixed")
        if provider == "engine":
            row.update({f"engine_speedup_vs_{p}": tokens_per_s / t for p, t in PROVIDERS.items() if p != "engine"})
        rows.append(row)
    return rows + [dict(op="engine_throughput_agreement", model=model, dtype=dtype, requests=512,
                        identical_token_sequences=512)]


def test_the_serving_results_get_their_plot_and_other_modules_do_not(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    log = harness.ResultLog()
    log._bandwidth = 1.0  # (not measured: no timings in these rows)
    for row in serving_rows("500M", "torch.bfloat16") + serving_rows("2.2B", "torch.bfloat16"):
        log.add("bench_e2e_serve", None, **row)
    log.add("bench_sampling", None, op="greedy", provider="argmax")
    paths = log.write()
    slug = paths[0].name.removeprefix("bench_e2e_serve_").removesuffix(".json")  # the device's name
    assert [path.name for path in paths] == [f"bench_e2e_serve_{slug}.json", f"bench_e2e_serve_{slug}.png",
                                             f"bench_sampling_{slug}.json"]
    png = paths[1]
    assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
