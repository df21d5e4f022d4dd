"""A synthetic video world for offline training and evaluation (a tiny VLM on a CPU).

A clip shows one to three objects — a shape (circle, square, triangle, diamond) in a colour
(red, green, blue, yellow, all different within a clip) and a size (small, large) — each moving
at constant speed in one direction (left, right, up, down) on a black, grey or white
background, plain or with static grey noise. Objects stay inside the frame and never touch, so
every object is visible in every frame. A `Scene` holds these facts in frame fractions
(x right, y down, 0–1), so the same scene renders at any size; `render_clip` draws it with numpy.

Each clip gets a caption and up to ``questions_per_clip`` questions whose single-word answers
need the video (`QUESTION_TYPES`, answers from `ANSWERS`):

=============  ==============================================  ==============================
type           example                                         answers
=============  ==============================================  ==============================
``colour``     What colour is the circle?                      red, green, blue, yellow
``shape``      What shape is the red object?                   circle, square, triangle, diamond
``size``       What size is the blue shape?                    small, large
``direction``  Which way does the red shape move?              left, right, up, down
``mover``      What colour is the shape that moves left?      red, green, blue, yellow
``count``      How many shapes are there?                      one, two, three
``end``        Which shape ends nearest the top?               circle, square, triangle, diamond
=============  ==============================================  ==============================

A question is asked only when its answer is unambiguous for the clip: an object is named by
its colour, or by its shape (or size and shape) only when no other object shares it; ``mover``
needs exactly one object moving that way; ``end`` needs a clear winner (centres apart by at
least `END_MARGIN` plus the difference of the two sizes, so edges and centres agree). The
answer classes are balanced (`answer_prior` measures what a blind guesser scores).

`generate_world` writes ``videos/<id>.mp4`` (mpeg4 at 1 fps, so `read_video`'s default
sampling keeps every frame of clips up to 12 frames) and ``train.jsonl``, ``val.jsonl``,
``heldout.jsonl`` and ``world.json``. Everything is deterministic from the seed: clip ``i`` of a
split draws from its own generator seeded by ``(seed, split, i)``, so a bigger world starts with
the clips of a smaller one, and ``heldout_seed`` gives a fresh held-out set from the same
distribution. No scene appears twice in a world.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from v2l_fast.data.manifest import write_text_atomic
from v2l_fast.errors import fail

DATASET = "v2l_synthetic"
SPLITS = ("train", "val", "heldout")
FPS = 1  # 1 frame per second: read_video (target 1 fps, ≤ 12 frames) keeps every frame
BIT_RATE = 2_000_000  # mpeg4 bits per second: every frame keeps its colours (see `write_clip`)
MIN_SIZE = 32

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 205, 40)}
SIZES = {"small": 0.075, "large": 0.13}  # half-extent of the object, in frame fractions
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUNDS = {"black": 25, "grey": 128, "white": 230}  # grey level
NOISE = {"plain": 0, "noisy": 24}  # amplitude of the static grey noise
COUNTS = ("one", "two", "three")
SIDES = {"top": (1, -1), "bottom": (1, 1), "left": (0, -1), "right": (0, 1)}  # (axis, sign)
SIDE_WORDS = {"top": "the top", "bottom": "the bottom", "left": "the left side", "right": "the right side"}

TRAVEL = (0.25, 0.45)  # distance an object covers over the clip, in frame fractions
EDGE_MARGIN = 0.02  # gap between an object and the frame edge
GAP = 0.03  # least gap between two objects' boxes at any time
CANDIDATES = 32  # random starts tried per object by one placement
PLACEMENT_TRIES = 8  # placements tried before the scene is drawn again
END_MARGIN = 0.15  # least distance between the winner and the runner-up of an ``end`` question

ANSWERS = {
    "colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "direction": tuple(DIRECTIONS),
    "mover": tuple(COLOURS), "count": COUNTS, "end": SHAPES,
}
QUESTION_TYPES = tuple(ANSWERS)
TEMPLATES = {
    "colour": ("What colour is {ref}?", "Which colour is {ref}?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "size": ("What size is the {colour} shape?", "Is the {colour} shape small or large?"),
    "direction": ("Which way does {ref} move?", "In which direction does {ref} move?"),
    "mover": ("What colour is the shape that moves {direction}?", "Which colour moves {direction}?"),
    "count": ("How many shapes are there?", "How many shapes are in the video?"),
    "end": ("Which shape ends nearest {side}?", "Which shape is closest to {side} at the end?"),
}
CAPTION_PROMPT = "Describe the video."


@dataclass(frozen=True)
class SceneObject:
    """One moving object: its attributes and its centre at the first and last frame."""

    shape: str
    colour: str
    size: str
    direction: str
    start: tuple[float, float]
    end: tuple[float, float]

    @property
    def radius(self) -> float:
        """Half-extent of the object in frame fractions (`SIZES`)."""
        return SIZES[self.size]

    def describe(self) -> str:
        """``small red circle moves left``."""
        return f"{self.size} {self.colour} {self.shape} moves {self.direction}"


@dataclass(frozen=True)
class Scene:
    """The ground truth of one clip: background, noise, the seed of the noise, the objects."""

    background: str
    noise: str
    noise_seed: int
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict:
        """The scene as plain JSON values (lists for coordinates)."""
        facts = asdict(self)
        for obj in facts["objects"]:
            obj["start"], obj["end"] = list(obj["start"]), list(obj["end"])
        return facts

    @classmethod
    def from_dict(cls, facts: Mapping) -> Scene:
        """The scene `to_dict` wrote (for instance a manifest row's ``metadata["scene"]``)."""
        objects = tuple(SceneObject(o["shape"], o["colour"], o["size"], o["direction"], tuple(o["start"]),
                                    tuple(o["end"])) for o in facts["objects"])
        return cls(facts["background"], facts["noise"], int(facts["noise_seed"]), objects)


@dataclass(frozen=True)
class Question:
    """One question about a scene: its type, text and answer, and the facts it rests on.

    ``obj`` is the index of the object the answer is about (None for ``count``); ``about`` is
    the side of an ``end`` question or the direction of a ``mover`` question (else None).
    """

    question_type: str
    prompt: str
    answer: str
    obj: int | None
    about: str | None


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: 1–3 objects (uniform), distinct colours, placed so they never touch.

    Shapes, sizes and directions are uniform and independent; each object travels a uniform
    distance in `TRAVEL`. Positions are rounded to 1/1000 of the frame. The few draws whose
    objects cannot be placed apart (`PLACEMENT_TRIES` fail) are drawn again.
    """
    _check_rng(rng)
    while True:
        count = int(rng.integers(1, 4))
        colours = [tuple(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:count]]
        shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), count)]
        sizes = [tuple(SIZES)[i] for i in rng.integers(0, len(SIZES), count)]
        directions = [tuple(DIRECTIONS)[i] for i in rng.integers(0, len(DIRECTIONS), count)]
        travels = [round(float(t), 3) for t in rng.uniform(*TRAVEL, count)]
        background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        noise = tuple(NOISE)[int(rng.integers(len(NOISE)))]
        noise_seed = int(rng.integers(2**31))
        for _ in range(PLACEMENT_TRIES):
            objects = _place(rng, list(zip(shapes, colours, sizes, directions, travels)))
            if objects is not None:
                return Scene(background, noise, noise_seed, objects)


def _place(rng: np.random.Generator, attributes: list[tuple]) -> tuple[SceneObject, ...] | None:
    """Place the objects one by one, each at the first of `CANDIDATES` random starts that
    keeps it apart from those already placed (None when an object finds none).

    A start is drawn so that the object's box stays `EDGE_MARGIN` inside the frame from start
    to end.
    """
    placed: list[SceneObject] = []
    for shape, colour, size, direction, travel in attributes:
        step = np.array(DIRECTIONS[direction], dtype=float)
        low = SIZES[size] + EDGE_MARGIN + np.maximum(0.0, -step * travel)
        high = 1 - SIZES[size] - EDGE_MARGIN - np.maximum(0.0, step * travel)
        starts = np.round(rng.uniform(low, high, (CANDIDATES, 2)), 3)
        ends = np.round(starts + step * travel, 3)
        free = np.ones(CANDIDATES, dtype=bool)
        for other in placed:
            free &= _apart(other, starts, ends, SIZES[size])
        if not free.any():
            return None
        i = int(np.argmax(free))
        placed.append(SceneObject(shape, colour, size, direction, (float(starts[i, 0]), float(starts[i, 1])),
                                  (float(ends[i, 0]), float(ends[i, 1]))))
    return tuple(placed)


def _apart(obj: SceneObject, starts: np.ndarray, ends: np.ndarray, radius: float) -> np.ndarray:
    """Whether the box of ``obj`` stays `GAP` apart from boxes of half-extent ``radius``
    moving from ``starts`` to ``ends`` (``[N, 2]``), for each of the N.

    Both move linearly over t ∈ [0, 1], so on each axis the boxes overlap for an interval of
    t; they touch only where the two intervals meet inside [0, 1].
    """
    reach = obj.radius + radius + GAP
    p = np.array(obj.start) - starts
    v = (np.array(obj.end) - np.array(obj.start)) - (ends - starts)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-reach - p) / v, (reach - p) / v
    still = v == 0
    inside = np.abs(p) < reach
    lo = np.where(still, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2))
    hi = np.where(still, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2))
    return np.maximum(lo.max(axis=1), 0.0) >= np.minimum(hi.min(axis=1), 1.0)


def render_clip(scene: Scene, frames: int = 8, size: int = 64) -> np.ndarray:
    """Draw ``scene`` as ``[frames, size, size, 3]`` uint8 RGB frames.

    Frame ``k`` shows each object at ``start + (end − start) · k / (frames − 1)``; pixel
    ``(row, col)`` samples the scene at its centre, ``((col + ½) / size, (row + ½) / size)``.
    """
    if not isinstance(scene, Scene):
        fail("scene", "a Scene", type(scene).__name__)
    _check_frames(frames)
    _check_size(size)
    background = np.full((size, size, 1), BACKGROUNDS[scene.background], dtype=np.int16)
    if NOISE[scene.noise]:
        amplitude = NOISE[scene.noise]
        background = background + np.random.default_rng(scene.noise_seed).integers(
            -amplitude, amplitude + 1, (size, size, 1), dtype=np.int16)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = np.clip(background, 0, 255).astype(np.uint8)
    coords = (np.arange(size) + 0.5) / size
    progress = np.linspace(0.0, 1.0, frames)
    for obj in scene.objects:
        cx = obj.start[0] + (obj.end[0] - obj.start[0]) * progress
        cy = obj.start[1] + (obj.end[1] - obj.start[1]) * progress
        dx = coords[None, None, :] - cx[:, None, None]
        dy = coords[None, :, None] - cy[:, None, None]
        video[_shape_mask(obj.shape, dx, dy, obj.radius)] = COLOURS[obj.colour]
    return video


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside ``shape`` of half-extent ``r`` at offsets ``(dx, dy)`` from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    return np.abs(dx) + np.abs(dy) <= r  # diamond


def _references(scene: Scene, index: int, *, colour: bool) -> list[str]:
    """Unambiguous names of object ``index``: by colour (with ``colour``), by its shape or its
    size and shape when no other object shares them."""
    obj = scene.objects[index]
    names = [f"the {obj.colour} shape"] if colour else []
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        names.append(f"the {obj.shape}")
    elif sum((o.size, o.shape) == (obj.size, obj.shape) for o in scene.objects) == 1:
        names.append(f"the {obj.size} {obj.shape}")
    return names


def _end_winner(scene: Scene, side: str) -> int | None:
    """The object whose centre ends nearest ``side`` by a clear margin, else None."""
    if len(scene.objects) < 2:
        return None
    axis, sign = SIDES[side]
    order = sorted(range(len(scene.objects)), key=lambda i: sign * scene.objects[i].end[axis], reverse=True)
    first, second = scene.objects[order[0]], scene.objects[order[1]]
    gap = sign * (first.end[axis] - second.end[axis])
    return order[0] if gap >= END_MARGIN + abs(first.radius - second.radius) else None


def _candidates(scene: Scene) -> dict[str, list[tuple[dict, str, int | None, str | None]]]:
    """Every unambiguous question per type: ``(template fields, answer, object, about)``."""
    found: dict[str, list] = defaultdict(list)
    for i, obj in enumerate(scene.objects):
        found["colour"] += [({"ref": ref}, obj.colour, i, None) for ref in _references(scene, i, colour=False)]
        found["shape"].append(({"colour": obj.colour}, obj.shape, i, None))
        found["size"].append(({"colour": obj.colour}, obj.size, i, None))
        found["direction"] += [({"ref": ref}, obj.direction, i, None) for ref in _references(scene, i, colour=True)]
    for direction in DIRECTIONS:
        movers = [i for i, o in enumerate(scene.objects) if o.direction == direction]
        if len(movers) == 1:
            found["mover"].append(({"direction": direction}, scene.objects[movers[0]].colour, movers[0], direction))
    for side in SIDES:
        winner = _end_winner(scene, side)
        if winner is not None:
            found["end"].append(({"side": SIDE_WORDS[side]}, scene.objects[winner].shape, winner, side))
    return found


def questions_for(scene: Scene, rng: np.random.Generator, k: int = 4) -> list[Question]:
    """Up to ``k`` questions about ``scene`` of different types, each with an unambiguous answer.

    ``count`` is asked with probability ``k / len(QUESTION_TYPES)`` whatever the scene, so its
    answers keep the uniform prior of the object count; the other types are drawn uniformly
    among those the scene can answer, then one question of each type and one of its phrasings
    (`TEMPLATES`) uniformly.
    """
    if not isinstance(scene, Scene):
        fail("scene", "a Scene", type(scene).__name__)
    _check_rng(rng)
    _check_int("k", k, 1)
    candidates = _candidates(scene)
    ask_count = rng.random() < min(1.0, k / len(QUESTION_TYPES))
    others = [t for t in QUESTION_TYPES if t != "count" and candidates[t]]
    types = [others[i] for i in rng.permutation(len(others))[: k - ask_count]]
    questions = []
    for question_type in types:
        fields, answer, obj, about = candidates[question_type][int(rng.integers(len(candidates[question_type])))]
        template = TEMPLATES[question_type][int(rng.integers(len(TEMPLATES[question_type])))]
        questions.append(Question(question_type, template.format(**fields), answer, obj, about))
    if ask_count:
        template = TEMPLATES["count"][int(rng.integers(len(TEMPLATES["count"])))]
        questions.insert(int(rng.integers(len(questions) + 1)),
                         Question("count", template, COUNTS[len(scene.objects) - 1], None, None))
    return questions


def caption_for(scene: Scene) -> str:
    """``A small red circle moves left and a large blue square moves up on a grey background.``"""
    parts = [obj.describe() for obj in scene.objects]
    listed = parts[0] if len(parts) == 1 else ", a ".join(parts[:-1]) + " and a " + parts[-1]
    noise = "noisy " if NOISE[scene.noise] else ""
    return f"A {listed} on a {noise}{scene.background} background."


def answer_prior(rows: Iterable[Mapping], *, key: str = "question_type") -> dict[str, float]:
    """The accuracy of a blind guesser that answers each question with its group's most
    frequent answer, per group and over ``"all"`` question rows.

    Rows are manifest rows; caption rows are left out. ``key="question_type"`` groups by
    ``metadata["question_type"]`` (a guesser that knows the type); ``key="prompt"`` by the
    question text (one that reads the question but not the video). The per-group rate is the
    majority-class rate of that group.
    """
    if key not in ("question_type", "prompt"):
        fail("key", "'question_type' or 'prompt'", repr(key))
    answers: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        if row["task_type"] == "qa":
            group = row["metadata"]["question_type"] if key == "question_type" else row["prompt"]
            answers[group][row["target_text"]] += 1
    if not answers:
        fail("rows", "at least one question row (task_type 'qa')", "none")
    prior = {group: max(c.values()) / sum(c.values()) for group, c in sorted(answers.items())}
    prior["all"] = sum(max(c.values()) for c in answers.values()) / sum(sum(c.values()) for c in answers.values())
    return prior


def clip_rows(clip_id: str, split: str, scene: Scene, questions: list[Question], *, frames: int,
              size: int) -> list[dict]:
    """The manifest rows of one clip: its questions (``qa``), then its caption (``caption``).

    ``metadata`` holds the clip id, the question type (``caption`` for the caption), the object
    and side / direction the answer rests on, the clip's frames and size, and the scene.
    """
    video_path = f"videos/{clip_id}.mp4"
    facts = scene.to_dict()
    rows = []
    items = [(f"q{j}", "qa", q.prompt, q.answer, q.question_type, q.obj, q.about) for j, q in enumerate(questions)]
    items.append(("caption", "caption", CAPTION_PROMPT, caption_for(scene), "caption", None, None))
    for suffix, task_type, prompt, target, question_type, obj, about in items:
        rows.append({
            "id": f"{clip_id}-{suffix}", "video_path": video_path, "task_type": task_type, "prompt": prompt,
            "target_text": target, "dataset": DATASET, "split": split,
            "metadata": {"clip": clip_id, "question_type": question_type, "object": obj, "about": about,
                         "frames": frames, "size": size, "fps": FPS, "scene": facts},
        })
    return rows


def generate_world(out_dir: str | os.PathLike, *, num_train: int, num_val: int, num_heldout: int,
                   seed: int = 0, heldout_seed: int | None = None, frames: int = 8, size: int = 64,
                   questions_per_clip: int = 4, progress: bool = True) -> dict[str, str]:
    """Write a synthetic world into ``out_dir``; return ``{split: manifest path}``.

    Writes ``videos/<split>-<i>.mp4`` for every clip, one manifest per split (`SPLITS`, rows
    from `clip_rows`, ``video_path`` relative to ``out_dir``) and ``world.json`` (the settings,
    the counts and the answer vocabulary). Every file is written to a temporary name and moved
    into place, so an interrupted run never leaves a half-written file under its final name.
    Clip ``i`` of split ``s`` is drawn from ``default_rng([seed, s, i])`` (``heldout_seed``
    instead of ``seed`` for the held-out split, when given); a scene already drawn elsewhere in
    the world is drawn again from the same generator, so splits never share a clip. Files of an
    earlier world in ``out_dir`` that this one does not overwrite (videos of a bigger world)
    are left as they are; the manifests name only this world's videos.
    """
    _check_int("num_train", num_train, 1)
    _check_int("num_val", num_val, 0)
    _check_int("num_heldout", num_heldout, 0)
    _check_int("seed", seed, 0)
    if heldout_seed is not None:
        _check_int("heldout_seed", heldout_seed, 0)
    _check_frames(frames)
    _check_size(size)
    _check_int("questions_per_clip", questions_per_clip, 1)
    from tqdm import tqdm

    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    counts = {"train": num_train, "val": num_val, "heldout": num_heldout}
    seen: set[str] = set()
    manifests, rows_per_split = {}, {}
    with tqdm(total=sum(counts.values()), desc="synthetic world", unit="clip", disable=not progress) as bar:
        for split_index, split in enumerate(SPLITS):
            split_seed = heldout_seed if split == "heldout" and heldout_seed is not None else seed
            lines = []
            for i in range(counts[split]):
                rng = np.random.default_rng([split_seed, split_index, i])
                scene = sample_scene(rng)
                while (key := json.dumps(scene.to_dict())) in seen:
                    scene = sample_scene(rng)
                seen.add(key)
                clip_id = f"{split}-{i:05d}"
                video = os.path.join(out_dir, "videos", f"{clip_id}.mp4")
                _atomic(video, lambda tmp, scene=scene: write_clip(tmp, render_clip(scene, frames, size)))
                rows = clip_rows(clip_id, split, scene, questions_for(scene, rng, questions_per_clip),
                                 frames=frames, size=size)
                lines += [json.dumps(row) + "\n" for row in rows]
                bar.update()
            manifests[split] = os.path.join(out_dir, f"{split}.jsonl")
            rows_per_split[split] = len(lines)
            write_text_atomic(manifests[split], "".join(lines))
    world = {
        "dataset": DATASET, "seed": seed, "heldout_seed": heldout_seed, "frames": frames, "size": size,
        "fps": FPS, "questions_per_clip": questions_per_clip, "clips": counts, "rows": rows_per_split,
        "answers": {t: list(a) for t, a in ANSWERS.items()},
    }
    write_text_atomic(os.path.join(out_dir, "world.json"), json.dumps(world, indent=1) + "\n")
    return manifests


def write_clip(path: str | os.PathLike, frames: np.ndarray) -> None:
    """Encode ``[T, H, W, 3]`` uint8 frames as an mp4 file: mpeg4, yuv420p, `FPS`, `BIT_RATE`.

    `v2l_fast.vlm.video.write_video` leaves the bit rate to the codec's default, at which a
    1-fps mpeg4 clip drifts frame after frame until the small shapes lose their colour (mean
    error 3 → 13 grey levels over 8 frames on a noisy background); H.264 (libx264) keeps the
    colours but its bytes differ from run to run here. At `BIT_RATE` mpeg4 stays within about
    3 levels on every frame and the same frames give the same bytes.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        fail("frames", "a non-empty uint8 array [T, H, W, 3]", f"{frames.dtype} array of shape {list(frames.shape)}")
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = BIT_RATE
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _atomic(path: str, write) -> None:
    """Call ``write(tmp)`` with a temporary path beside ``path`` (same extension), then move
    it onto ``path``."""
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        fail(name, f"an integer ≥ {minimum}", repr(value))


def _check_rng(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        fail("rng", "a numpy.random.Generator", type(rng).__name__)


def _check_frames(frames: object) -> None:
    _check_int("frames", frames, 2)


def _check_size(size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE or size % 2:
        fail("size", f"an even integer ≥ {MIN_SIZE} (pixels per side)", repr(size))
