"""The engine's greedy next token: 512 rows × SmolVLM2's 49 280-token vocabulary.

    pytest bench/bench_sampling.py --benchmark

What every greedy decode step of `v2l_fast.serve.Engine` ends with, after the LM head. Providers,
interleaved round by round, on the logits in the model's dtype:

- ``float+argmax``: the engine before `greedy_tokens` (an fp32 copy of the logits, then ``argmax``);
- ``argmax``: ``torch.argmax`` on the logits as they are (the reference: `greedy_tokens` must equal it);
- ``blocks-<b>``: `argmax_in_blocks` with blocks of b columns (b divides 49 280; `greedy_tokens`
  takes the largest divisor in [64, 512], 448).

Rows hold each provider's speed-up over ``float+argmax`` by median.
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch

from v2l_fast.serve.sampling import argmax_in_blocks, greedy_tokens

import harness

DEVICE = harness.device()
ROWS, VOCAB = 512, 49280  # the serving bench's 8 questions × 64 videos; SmolVLM2's vocabulary
BLOCKS = (64, 128, 224, 320, 448)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_greedy_next_token(benchmark, bench_record, dtype):
    logits = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPES[dtype])
    want = logits.argmax(dim=-1)
    assert torch.equal(greedy_tokens(logits), want)
    steps = {"float+argmax": lambda: logits.float().argmax(dim=-1), "argmax": lambda: logits.argmax(dim=-1)}
    for block in BLOCKS:
        assert torch.equal(argmax_in_blocks(logits, block), want)
        steps[f"blocks-{block}"] = functools.partial(argmax_in_blocks, logits, block)

    def derive(provider, times):
        median = statistics.median(times[provider])
        return {"speedup_vs_float+argmax": statistics.median(times["float+argmax"]) / median}

    harness.interleaved(benchmark, bench_record, steps, rounds=9, derive=derive, op="greedy_next_token",
                        rows=ROWS, vocab=VOCAB, dtype=dtype)
