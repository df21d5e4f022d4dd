"""Plots of benchmark results, written as PNG beside their JSON (matplotlib, no display needed).

`plot_ttft`: the time-to-first-token sweep of ``bench_e2e_ttft.py``; `plot_engine_throughput`: the
serving throughput of ``bench_e2e_serve.py`` (`harness.ResultLog` draws it beside the module's JSON).
"""

from __future__ import annotations

from pathlib import Path

COLOURS = {"256M": "tab:blue", "500M": "tab:orange", "2.2B": "tab:green"}
LABEL_OFFSETS = {"256M": (8, -14), "500M": (-20, 10), "2.2B": (8, 6)}  # points: ratio labels apart


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ttft(payload: dict, path: str | Path) -> Path:
    """TTFT vs frames (log-log; video in context solid, LoRA answer dashed, one colour per model,
    the video/LoRA ratio of the medians, and of the fastest calls, written at each point) beside
    the context tokens of both prompts.

    Measured points are filled; points that did not run here are hollow, at their estimate
    (``row["estimate"]``: the measured seconds per FLOP times the point's FLOPs), labelled "est.".
    """
    plt = _pyplot()
    rows = [row for row in payload["results"] if row.get("op") == "ttft"]
    models = [m for m in COLOURS if any(row["model"] == m for row in rows)]
    fig, (ax, ax_tokens) = plt.subplots(1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [3, 2]})
    for model in models:
        colour = COLOURS[model]
        mine = sorted((row for row in rows if row["model"] == model), key=lambda row: row["frames"])
        measured = [row for row in mine if row.get("status") == "measured"]
        estimated = [row for row in mine if row.get("status") != "measured"
                     and (row.get("estimate") or {}).get("video_s") is not None]
        if measured:
            frames = [row["frames"] for row in measured]
            ax.plot(frames, [row["video"]["median_s"] for row in measured], "o-", color=colour,
                    label=f"{model}: video in context")
            ax.plot(frames, [row["lora"]["median_s"] for row in measured], "s--", color=colour,
                    label=f"{model}: LoRA answer (0 visual tokens)")
            once = [row for row in measured if isinstance(row.get("internalize"), dict)]
            ax.plot([row["frames"] for row in once], [row["internalize"]["median_s"] for row in once], "x:",
                    color=colour, alpha=0.6, label=f"{model}: internalize (once per video)")
            for row in measured:
                ratio = f"{row['ratio_median']:.0f}×"
                if "ratio_min" in row:
                    ratio += f" ({row['ratio_min']:.0f}× min)"
                ax.annotate(ratio, (row["frames"], row["video"]["median_s"]), textcoords="offset points",
                            xytext=LABEL_OFFSETS.get(model, (6, 6)), color=colour, fontsize=9, weight="bold")
        if estimated:
            chain = measured[-1:] + estimated
            ax.plot([row["frames"] for row in chain],
                    [row["video"]["median_s"] if row in measured else row["estimate"]["video_s"] for row in chain],
                    ":", color=colour, alpha=0.5)
            ax.plot([row["frames"] for row in estimated], [row["estimate"]["video_s"] for row in estimated], "o",
                    mfc="none", color=colour, alpha=0.7, label=f"{model}: video in context, est. (not run)")
            ax.plot([row["frames"] for row in estimated], [row["estimate"]["lora_s"] for row in estimated], "s",
                    mfc="none", color=colour, alpha=0.5)
            for row in estimated:
                ax.annotate(f"~{row['estimate']['ratio']:.0f}× est.", (row["frames"], row["estimate"]["video_s"]),
                            textcoords="offset points", xytext=(6, -12), color=colour, fontsize=8, alpha=0.8)
        frames_all = [row["frames"] for row in mine]
        ax_tokens.plot(frames_all, [row["tokens"]["video"]["total"] for row in mine], "o-", color=colour,
                       label=f"{model}: video in context")
        ax_tokens.plot(frames_all, [row["tokens"]["lora"]["total"] for row in mine], "s--", color=colour,
                       label=f"{model}: LoRA answer")
    for axis in (ax, ax_tokens):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("frames in the video")
        axis.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"TTFT, {payload.get('device')}, {payload.get('dtype')} (ratio: video / LoRA)", fontsize=10)
    # below both panels, so that no point or ratio label sits under the legend
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7, bbox_to_anchor=(0.5, 0.035))
    ax_tokens.set_ylabel("context tokens of the prompt")
    ax_tokens.set_title("context tokens (visual + text)", fontsize=10)
    ax_tokens.legend(fontsize=7, loc="center right")
    fig.text(0.01, 0.01, "filled: measured (median; ratio of medians, and of the fastest calls). hollow: not run here, "
             "estimated (video: FLOPs × measured s/FLOP; LoRA: measured, flat in frames). LoRA path: adapter already "
             "made; internalization (×) is paid once per video.", fontsize=7, alpha=0.8)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


ENGINE_PROVIDERS = {"engine": "tab:blue", "engine-base": "tab:cyan", "peft-mixed": "tab:orange",
                    "peft-swap": "tab:red"}


def plot_engine_throughput(payload: dict, path: str | Path) -> Path:
    """Tokens per second of each provider, one group of bars per (model, dtype) row set of
    ``bench_e2e_serve.py`` (ops ``engine_throughput`` and ``engine_throughput_bf16``), log scale,
    the engine's speed-ups over peft's mixed batch and over one video at a time written above
    its bar (the ratios of medians measured in the same run)."""
    plt = _pyplot()
    rows = [row for row in payload["results"] if str(row.get("op", "")).startswith("engine_throughput")
            and "tokens_per_s" in row]
    groups = list(dict.fromkeys((row["model"], row["dtype"].replace("torch.", "")) for row in rows))
    fig, ax = plt.subplots(figsize=(3.2 + 2.6 * len(groups), 5.5))
    width = 0.8 / len(ENGINE_PROVIDERS)
    for g, (model, dtype) in enumerate(groups):
        mine = {row["provider"]: row for row in rows
                if row["model"] == model and row["dtype"].replace("torch.", "") == dtype}
        for p, (provider, colour) in enumerate(ENGINE_PROVIDERS.items()):
            row = mine.get(provider)
            if row is None:
                continue
            x = g + (p - (len(ENGINE_PROVIDERS) - 1) / 2) * width
            ax.bar(x, row["tokens_per_s"], width, color=colour, label=provider if g == 0 else None,
                   hatch="//" if row.get("onednn_switched_off") else None)
            if provider == "engine":
                ratios = [f"{row[key]:.1f}× {peer}" for peer in ("peft-mixed", "peft-swap")
                          if (key := f"engine_speedup_vs_{peer}") in row]
                ax.annotate("\n".join(ratios), (x, row["tokens_per_s"]), textcoords="offset points",
                            xytext=(0, 4), ha="center", fontsize=8, weight="bold")
    ax.set_xticks(range(len(groups)), [f"{model}\n{dtype}" for model, dtype in groups])
    ax.set_yscale("log")
    if rows:  # room below the slowest bar and above the engine's labels
        speeds = [row["tokens_per_s"] for row in rows]
        ax.set_ylim(min(speeds) / 2, max(speeds) * 3)
    ax.set_ylabel("generated tokens per second (median of the rounds)")
    first = rows[0] if rows else {}
    ax.set_title(f"engine throughput, {payload.get('device')}: {first.get('videos')} videos × "
                 f"{first.get('questions')} questions, {first.get('new_tokens')} new tokens each", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=len(ENGINE_PROVIDERS))
    fig.text(0.01, 0.01, "hatched: oneDNN switched itself off during that provider's calls (bench/NOTES.md)",
             fontsize=7, alpha=0.8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
