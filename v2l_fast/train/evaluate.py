"""Held-out evaluation of the toy replication: the VLM with the video in context, with only the
generated adapter, and with neither, on the question rows of a manifest.

For every question row (``task_type`` ``"qa"``, ground truth in ``target_text``) the same frozen
VLM answers three times, greedily:

* **(a) video** — the video in the context, exactly as the teacher answers
  (`v2l_fast.train.teacher.video_answers`);
* **(b) adapter** — the video internalized once into an adapter (`v2l_fast.api.internalize`),
  then the question alone with that adapter applied: zero visual tokens (`v2l_fast.api.ask`);
* **(c) none** — the question alone, no adapter (``ask(None, …)``).

Scoring rule (`is_correct`): answer and target are normalised — lower-cased, every Unicode
punctuation character replaced by a space, split on whitespace — and the answer is correct
when its first k words equal the target's k words (k = the target's word count). For the
single-word targets of the synthetic world: the answer's first word is the target, so ``"Red."``
and ``"red circle"`` score for ``red``, ``"It is red"`` and ``"reddish"`` do not. (d) agreement
counts the questions where (b)'s first k words equal (a)'s (two answers without words agree).

The issue's goal (`EvalReport.goal_met`): (b) within 5 points of (a) — ``acc(b) ≥ acc(a) − 5`` —
both (a) and (b) at least 30 points above (c), on at least 500 questions. `answer_prior` (a
blind guesser answering each question type's most frequent target) is reported beside them.
"""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from v2l_fast.api import ask, internalize
from v2l_fast.data.manifest import read_manifest
from v2l_fast.data.synthetic import answer_prior
from v2l_fast.errors import fail
from v2l_fast.train.teacher import video_answers
from v2l_fast.vlm.load import VLM
from v2l_fast.vlm.video import read_video

MODES = ("video", "adapter", "none")
MODE_LABELS = {"video": "(a) video", "adapter": "(b) adapter", "none": "(c) neither"}
ALL = "all"
UNTYPED = "untyped"  # the group of a question row without metadata.question_type
GOAL_QUESTIONS = 500
GOAL_GAP_POINTS = 5  # (b) may trail (a) by at most this many points
GOAL_MARGIN_POINTS = 30  # (a) and (b) must beat (c) by at least this many points


def normalise(text: str) -> list[str]:
    """The words of ``text``: lower-cased, Unicode punctuation replaced by spaces, split on whitespace."""
    chars = (" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return "".join(chars).split()


def is_correct(answer: str, target: str) -> bool:
    """Whether ``answer``'s first k normalised words are ``target``'s k words (k = its word count)."""
    words = normalise(target)
    if not words:
        fail("target", "an answer with at least one word after normalisation", repr(target))
    return normalise(answer)[:len(words)] == words


@dataclass
class EvalReport:
    """Counts of an `evaluate` run, per question type and over ``"all"`` questions.

    ``counts[group]`` questions; ``correct[mode][group]`` correct answers of each mode in
    `MODES`; ``agree[group]`` questions where (b)'s answer agrees with (a)'s; ``prior`` the
    blind guesser's accuracy (`answer_prior`); ``questions`` one record per question (id, type,
    target, the three answers, their scores); ``settings`` what the run used.
    """

    counts: dict[str, int]
    correct: dict[str, dict[str, int]]
    agree: dict[str, int]
    prior: dict[str, float]
    questions: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """The number of questions evaluated."""
        return self.counts[ALL]

    @property
    def groups(self) -> list[str]:
        """The question types in sorted order, then ``"all"``."""
        return sorted(group for group in self.counts if group != ALL) + [ALL]

    def accuracy(self, mode: str, group: str = ALL) -> float:
        """Fraction of ``group``'s questions that ``mode`` answered correctly."""
        if mode not in MODES:
            fail("mode", f"one of {MODES}", repr(mode))
        return self.correct[mode][group] / self.counts[group]

    def agreement(self, group: str = ALL) -> float:
        """(d): fraction of ``group``'s questions where (b)'s answer agrees with (a)'s."""
        return self.agree[group] / self.counts[group]

    @property
    def goal(self) -> dict[str, bool]:
        """The issue's conditions, checked exactly on the counts (points = percent): ``questions``
        (n ≥ 500), ``adapter_near_video`` ((b) ≥ (a) − 5), ``video_above_none`` ((a) ≥ (c) + 30),
        ``adapter_above_none`` ((b) ≥ (c) + 30)."""
        n, right = self.n, {mode: 100 * self.correct[mode][ALL] for mode in MODES}
        return {
            "questions": n >= GOAL_QUESTIONS,
            "adapter_near_video": right["adapter"] >= right["video"] - GOAL_GAP_POINTS * n,
            "video_above_none": right["video"] >= right["none"] + GOAL_MARGIN_POINTS * n,
            "adapter_above_none": right["adapter"] >= right["none"] + GOAL_MARGIN_POINTS * n,
        }

    @property
    def goal_met(self) -> bool:
        """(b) ≥ (a) − 5 points, (a) and (b) ≥ (c) + 30 points, and at least 500 questions."""
        return all(self.goal.values())

    def to_json(self) -> dict:
        """The report as JSON values: accuracies, agreement, prior, counts, goal, settings, questions."""
        return {
            "n": self.n,
            "accuracy": {mode: {group: self.accuracy(mode, group) for group in self.groups} for mode in MODES},
            "agreement": {group: self.agreement(group) for group in self.groups},
            "prior": dict(self.prior),
            "counts": dict(self.counts),
            "correct": {mode: dict(self.correct[mode]) for mode in MODES},
            "agree": dict(self.agree),
            "goal": dict(self.goal, met=self.goal_met),
            "settings": dict(self.settings),
            "questions": list(self.questions),
        }

    @classmethod
    def from_json(cls, data: dict) -> EvalReport:
        """The report `to_json` wrote (counts, correct answers, agreement, prior, settings, questions)."""
        return cls(dict(data["counts"]), {mode: dict(data["correct"][mode]) for mode in MODES}, dict(data["agree"]),
                   dict(data["prior"]), list(data.get("questions", [])), dict(data.get("settings", {})))

    def table(self) -> str:
        """A plain-text table: one line per question type and one for all, accuracies in percent."""
        header = ["question type", "n", *MODE_LABELS.values(), "(d) b = a", "prior"]
        lines = [[group, str(self.counts[group]), *(f"{100 * self.accuracy(mode, group):.1f}%" for mode in MODES),
                  f"{100 * self.agreement(group):.1f}%",
                  f"{100 * self.prior[group]:.1f}%" if group in self.prior else "-"] for group in self.groups]
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

        def render(row):
            return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

        rule = "-" * len(render(header))
        checks = self.goal
        verdict = "met" if self.goal_met else "not met"
        goal = (f"goal ({verdict}): (b) >= (a) - {GOAL_GAP_POINTS} points [{_yes(checks['adapter_near_video'])}], "
                f"(a), (b) >= (c) + {GOAL_MARGIN_POINTS} points [{_yes(checks['video_above_none'])}, "
                f"{_yes(checks['adapter_above_none'])}], n >= {GOAL_QUESTIONS} [{_yes(checks['questions'])}]")
        legend = ("(a) video in context, (b) generated adapter with zero visual tokens, (c) neither; "
                  "(d) b = a: (b) answers as (a); prior: most frequent answer per question type")
        return "\n".join([render(header), rule, *map(render, lines[:-1]), rule, render(lines[-1]), "", legend, goal])


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def evaluate(manifest: str | os.PathLike, *, vlm: VLM, hypernet, batch_size: int = 8, max_new_tokens: int = 8,
             limit: int | None = None, data_root: str | os.PathLike | None = None,
             progress: bool = True) -> EvalReport:
    """Answer every question row of ``manifest`` in the three modes and score them.

    Videos are taken in chunks of ``batch_size`` (in order of first appearance): each chunk is
    read once (``vlm.preprocessor``'s frame sampling, as `internalize` reads a path),
    internalized in one forward, and its questions answered in generate calls of
    ``batch_size`` questions per mode.

    Args:
        manifest: a JSONL manifest with ``target_text`` on every row (`read_manifest`); rows
            whose ``task_type`` is not ``"qa"`` (captions) are left out.
        vlm: the frozen `VLM` (the same model answers in all three modes).
        hypernet: the `Frames2LoRA` for ``vlm``.
        batch_size: videos per internalize forward and questions per ``generate`` call.
        max_new_tokens: greedy answer length limit (the answers are single words).
        limit: evaluate only the first ``limit`` question rows (None: all).
        data_root: folder relative video paths are resolved against (None: the manifest's).
        progress: tqdm bar over the chunks of videos.
    """
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        _check_positive(name, value)
    if limit is not None:
        _check_positive("limit", limit, " or None")
    rows = [row for row in read_manifest(manifest, data_root=data_root, require_targets=True).rows
            if row.task_type == "qa"]
    if not rows:
        fail("manifest", "at least one question row (task_type 'qa')", f"{os.fspath(manifest)!r}, which has none")
    rows = rows[:limit]
    for row in rows:
        if not normalise(row.target_text):
            fail(f"{row.source}: target_text", "an answer with at least one word after normalisation",
                 repr(row.target_text))
    by_video: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_video.setdefault(row.video_file, []).append(i)
    files = list(by_video)
    answers = {mode: [""] * len(rows) for mode in MODES}
    for start in tqdm(range(0, len(files), batch_size), desc="evaluate", disable=not progress):
        chunk = files[start:start + batch_size]
        videos = [read_video(path, max_frames=vlm.preprocessor.max_frames, target_fps=vlm.preprocessor.fps)
                  for path in chunk]
        slots = [(k, i) for k, path in enumerate(chunk) for i in by_video[path]]
        prompts = [rows[i].prompt for _, i in slots]
        for s in range(0, len(slots), batch_size):
            part = slots[s:s + batch_size]
            texts = video_answers([videos[k] for k, _ in part], [rows[i].prompt for _, i in part], vlm,
                                  max_new_tokens=max_new_tokens)
            for (_, i), text in zip(part, texts):
                answers["video"][i] = text
        adapters = internalize(videos, vlm=vlm, hypernet=hypernet, progress=False)
        with_adapter = ask(adapters[[k for k, _ in slots]], prompts, vlm=vlm, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=False)
        without = ask(None, prompts, vlm=vlm, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
        for (_, i), adapter_text, none_text in zip(slots, with_adapter, without):
            answers["adapter"][i], answers["none"][i] = adapter_text, none_text
    settings = {"manifest": os.fspath(manifest), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "limit": limit, "max_frames": vlm.preprocessor.max_frames}
    return _score(rows, answers, settings)


def _check_positive(name: str, value, also: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(name, f"a positive int{also}", repr(value))


def _score(rows, answers: dict[str, list[str]], settings: dict) -> EvalReport:
    """Count correct answers and agreements per question type; the per-question records."""
    groups = [row.metadata.get("question_type", UNTYPED) for row in rows]
    counts, agree = Counter(groups), Counter()
    correct = {mode: Counter() for mode in MODES}
    questions = []
    for i, (row, group) in enumerate(zip(rows, groups)):
        width = len(normalise(row.target_text))
        scored = {mode: is_correct(answers[mode][i], row.target_text) for mode in MODES}
        same = normalise(answers["adapter"][i])[:width] == normalise(answers["video"][i])[:width]
        agree[group] += same
        for mode in MODES:
            correct[mode][group] += scored[mode]
        questions.append({"id": row.id, "question_type": group, "prompt": row.prompt, "target": row.target_text,
                          "answers": {mode: answers[mode][i] for mode in MODES}, "correct": scored, "agree": same})
    prior = answer_prior([{"task_type": "qa", "prompt": row.prompt, "target_text": " ".join(normalise(row.target_text)),
                           "metadata": {"question_type": group}} for row, group in zip(rows, groups)])
    return EvalReport(counts=_with_all(counts), correct={mode: _with_all(correct[mode], groups) for mode in MODES},
                      agree=_with_all(agree, groups), prior=prior, questions=questions, settings=settings)


def _with_all(counter: Counter, groups=()) -> dict[str, int]:
    """``counter`` as a dict with every group of ``groups`` (0 when absent) and its total under ``"all"``."""
    out = {group: counter[group] for group in sorted(set(counter) | set(groups))}
    return dict(out, **{ALL: sum(out.values())})
