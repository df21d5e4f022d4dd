"""Long-video composition on the trained toy model: single-shot adapters vs adapters composed from segments.

    python scripts/long_video_report.py [--clips 40] [--seed 2026] [--out bench/results/long_video_toy.json]

The embedded default (`v2l_fast.data.embedded`: the toy SmolVLM2 trained on the synthetic world
and its Frames2LoRA) answers the questions of fresh held-out clips (`generate_world` with its own
``heldout_seed``, written as mp4 and read back exactly as `v2l_fast.train.evaluate` reads them)
with zero visual tokens, using

* ``single``: one adapter per clip from all its frames (`v2l_fast.api.internalize`, rank 2r);
* ``seg{n}``: the clip split into n consecutive segments, internalized in one batched pass and
  composed in rank space (`v2l_fast.long_video.internalize_long`): the spec's sum of the segment
  deltas (rank n·r + r), ``…-mean`` their average, ``…-rk{r}`` re-compressed to the single-shot
  rank (per-video rows to r, then the bias block: rank 2r again);

beside the video in context (``video``) and no adapter (``none``) for scale. For each way it
reports accuracy (`is_correct`, overall and per question type), agreement with the single-shot
answers (first k words equal, k = the target's word count, as `EvalReport.agreement`), the
adapter rank, the wall time, and for re-compressed adapters the relative ΔW change it made
(‖ΔW_k − ΔW‖ / ‖ΔW‖ of the per-video rows, averaged over clips and layers), for composed ones
the share of ‖ΔW‖² in the top r singular values (``top_r_energy``: how much a re-compression to
the single-shot rank can keep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import Counter
from importlib import metadata

import torch

import v2l_fast
from v2l_fast.api import ask, internalize
from v2l_fast.data.embedded import embedded_default
from v2l_fast.data.manifest import read_manifest
from v2l_fast.data.synthetic import generate_world
from v2l_fast.long_video import internalize_long
from v2l_fast.train.evaluate import is_correct, normalise
from v2l_fast.train.teacher import video_answers
from v2l_fast.vlm.video import read_video

ALL = "all"


def _versions() -> dict:
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{p: version(p) for p in ("torch", "triton", "transformers",
                                                                             "v2l_fast")}}


def _score(rows, answers: list[str], reference: list[str] | None) -> dict:
    """Accuracy per question type (and overall) and, given ``reference`` answers, agreement with them."""
    counts, right, agree = Counter(), Counter(), Counter()
    for i, row in enumerate(rows):
        group = row.metadata.get("question_type", "untyped")
        counts[group] += 1
        right[group] += is_correct(answers[i], row.target_text)
        if reference is not None:
            width = len(normalise(row.target_text))
            agree[group] += normalise(answers[i])[:width] == normalise(reference[i])[:width]
    for c in (counts, right, agree):
        c[ALL] = sum(v for k, v in c.items() if k != ALL)
    out = {"correct": right[ALL], "accuracy": right[ALL] / counts[ALL],
           "accuracy_by_type": {g: right[g] / counts[g] for g in sorted(counts) if g != ALL}}
    if reference is not None:
        out["agreement_with_single"] = agree[ALL] / counts[ALL]
        out["agreement_by_type"] = {g: agree[g] / counts[g] for g in sorted(counts) if g != ALL}
    return out


def _delta_change(full: v2l_fast.Adapters, small: v2l_fast.Adapters) -> float:
    """Mean over clips and layers of ‖ΔW_k − ΔW‖ / ‖ΔW‖ of the per-video rows."""
    def delta(a):
        g = a.without_bias()
        return g.B.double().mT @ g.A.double()

    d_full, d_small = delta(full), delta(small)
    return float(((d_small - d_full).flatten(-2).norm(dim=-1) / d_full.flatten(-2).norm(dim=-1)).mean())


def _top_energy(adapters: v2l_fast.Adapters, k: int) -> float:
    """Mean over clips and layers of the share of ‖ΔW‖² (per-video rows) in its top k singular values."""
    g = adapters.without_bias()
    s2 = torch.linalg.svdvals(g.B.double().mT @ g.A.double()).pow(2)
    return float((s2[..., :k].sum(-1) / s2.sum(-1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40, help="fresh held-out clips (4 questions each at most)")
    parser.add_argument("--seed", type=int, default=2026, help="heldout_seed of the fresh clips (default: 2026)")
    parser.add_argument("--segments", type=int, nargs="+", default=[2, 4], help="segment counts (default: 2 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", default="bench/results/long_video_toy.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()
    embedded = embedded_default()
    session = v2l_fast.load(embedded.vlm, embedded.hypernet, dtype=torch.float32, device="cpu")
    vlm, hypernet = session.vlm, session.hypernet
    r = hypernet.config.rank
    with tempfile.TemporaryDirectory(prefix="v2l-long-") as world:
        manifests = generate_world(world, num_train=1, num_val=0, num_heldout=args.clips, heldout_seed=args.seed,
                                   progress=False)
        rows = [row for row in read_manifest(manifests["heldout"], require_targets=True).rows if row.task_type == "qa"]
        files = list(dict.fromkeys(row.video_file for row in rows))
        videos = [read_video(path, max_frames=vlm.preprocessor.max_frames, target_fps=vlm.preprocessor.fps)
                  for path in files]
    index = {path: k for k, path in enumerate(files)}
    which = [index[row.video_file] for row in rows]
    prompts = [row.prompt for row in rows]
    frames = sorted({len(v.frames) for v in videos})
    results, adapters_of, timings = {}, {}, {}

    def answer(name: str, make):
        start = time.perf_counter()
        adapters = make()
        made = time.perf_counter() - start
        texts = ask(adapters[which], prompts, vlm=vlm, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size, progress=False)
        timings[name] = {"internalize_s": made, "ask_s": time.perf_counter() - start - made}
        adapters_of[name] = adapters
        return texts, adapters

    answers = {}
    answers["single"], single = answer("single", lambda: internalize(videos, vlm=vlm, hypernet=hypernet))
    results["single"] = {"rank": single.rank, "bias_rank": single.bias_rank, **_score(rows, answers["single"], None)}
    for n in args.segments:
        if n > min(frames):
            results[f"seg{n}"] = {"skipped": f"clips have {min(frames)} frames, fewer than {n} segments"}
            continue
        for mean in (False, True):
            for max_rank in (None, r):
                name = f"seg{n}" + ("-mean" if mean else "") + (f"-rk{max_rank}" if max_rank else "")
                answers[name], adapters = answer(name, lambda n=n, mean=mean, max_rank=max_rank: internalize_long(
                    videos, vlm=vlm, hypernet=hypernet, segments=n, mean=mean, max_rank=max_rank))
                results[name] = {"segments": n, "mean": mean, "max_rank": max_rank, "rank": adapters.rank,
                                 "bias_rank": adapters.bias_rank, **_score(rows, answers[name], answers["single"])}
                if max_rank:
                    full = adapters_of[name.rsplit("-rk", 1)[0]]
                    results[name]["delta_rel_change"] = _delta_change(full, adapters)
                else:
                    results[name]["top_r_energy"] = _top_energy(adapters, r)
    start = time.perf_counter()
    answers["video"] = []
    for s in range(0, len(rows), args.batch_size):
        part = range(s, min(s + args.batch_size, len(rows)))
        answers["video"] += video_answers([videos[which[i]] for i in part], [prompts[i] for i in part], vlm,
                                          max_new_tokens=args.max_new_tokens)
    timings["video"] = {"ask_s": time.perf_counter() - start}
    results["video"] = _score(rows, answers["video"], answers["single"])
    start = time.perf_counter()
    answers["none"] = ask(None, prompts, vlm=vlm, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          progress=False)
    timings["none"] = {"ask_s": time.perf_counter() - start}
    results["none"] = _score(rows, answers["none"], answers["single"])
    for name, t in timings.items():
        results[name]["wall_s"] = t
    report = {
        "what": "toy long-video composition: single-shot adapter vs adapters composed from segments "
                "(scripts/long_video_report.py)",
        "model": {"vlm": os.path.relpath(embedded.vlm), "hypernet": os.path.relpath(embedded.hypernet), "rank": r,
                  "single_shot_adapter_rank": single.rank, "alpha": single.alpha},
        "seed": args.seed, "clips": len(videos), "questions": len(rows), "frames_per_clip": frames,
        "questions_by_type": dict(sorted(Counter(row.metadata.get("question_type") for row in rows).items())),
        "max_new_tokens": args.max_new_tokens, "device": "cpu", "threads": torch.get_num_threads(),
        "backend": "auto (torch on the CPU)", "versions": _versions(), "results": results,
        "wall_s": time.perf_counter() - started,
        "answers": {"targets": [row.target_text for row in rows], **answers},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    width = max(map(len, results))
    for name, res in results.items():
        if "skipped" in res:
            print(f"{name:<{width}}  skipped: {res['skipped']}")
            continue
        agree = res.get("agreement_with_single")
        print(f"{name:<{width}}  acc {res['accuracy']:.3f}" + (f"  agree {agree:.3f}" if agree is not None else "")
              + (f"  rank {res['rank']}" if "rank" in res else ""))
    print(f"{len(rows)} questions on {len(videos)} clips, {report['wall_s']:.0f} s → {args.out}")


if __name__ == "__main__":
    main()
