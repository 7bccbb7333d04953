"""Scenes -> training samples: the tasks, the task mixer, and the fixed held-out evaluation sets.

Tasks (each a function `scene, rng, decimals -> Sample | None`):

- `hpe`: `HPE_PROMPT` -> `[[x0,y0,x1,y1]] yaw:.. pitch:.. roll:..` (`prompts.format_hpe`).
- `box`: grounding of the head or of one of the coloured objects, `grounding_prompt(target)` ->
  `[[x0,y0,x1,y1]]`; `box_head` / `box_object` ask for one kind only (for evaluation).
- base curriculum (general visual features, never head pose): `orient` (the axis direction of a
  rigid object, as two angles), `colour` (the colour of the object of a shape), `count` (how many
  objects), `shape` (which shape has a colour); `pose_object` (a cube's box and its yaw, pitch
  and roll in the head-pose answer's words, `base.object_pose`); `box_list` (`Locate the objects.`
  -> every object named and boxed, left to right).

A `TaskMix` draws whole batches: each batch holds each task in proportion to its weight
(largest-remainder rounding, so `{"hpe": 0.8, "box": 0.2}` at batch 32 is always 26 + 6), and
every batch is a pure function of `(seed, step)`: a resumed run sees exactly the batches an
uninterrupted one would. Held-out sets come from another seed stream (`EVAL_STREAM`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import numpy as np

from hpelib import prompts
from hpelib.backends.base import Sample

TRAIN_STREAM = 0  # np.random.default_rng([seed, TRAIN_STREAM, step]) draws training batch `step`
EVAL_STREAM = 1  # ... [seed, EVAL_STREAM, i] draws held-out sample i: never a training scene

COUNT_PROMPT = "How many objects?"
HEAD = prompts.HEAD


# --------------------------------------------------------------------------- scene access
def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def scene_objects(scene) -> list[dict[str, Any]]:
    """The scene's visible objects as dicts: `name` ("red cube"), `shape`, `colour`, `box`
    (relative x0, y0, x1, y1), `axis` (unit 3-vector of the object's symmetry axis in the
    camera frame, or None) and `angles` (its yaw, pitch and roll as drawn, or None)."""
    out = []
    for o in _get(scene, "objects", None) or []:
        name = _get(o, "name")
        shape = _get(o, "shape") or (name.split()[-1] if name else None)
        colour = _get(o, "colour") or _get(o, "color")
        if not isinstance(colour, str):  # an RGB triple or nothing: the name says it
            colour = " ".join(name.split()[:-1]) if name else None
        box = _get(o, "box")
        if box is None or name is None:
            continue
        axis = _get(o, "axis")
        rotation = _get(o, "rotation")
        if axis is None and rotation is not None:
            axis = np.asarray(rotation, np.float64)[:, 1]  # the model's +y axis in camera frame
        angles = tuple(_get(o, k) for k in ("yaw", "pitch", "roll"))
        out.append({"name": name, "shape": shape, "colour": colour, "box": tuple(map(float, box)),
                    "axis": None if axis is None else np.asarray(axis, np.float64),
                    "angles": None if None in angles else tuple(map(float, angles))})
    return out


def head_box(scene) -> tuple[float, float, float, float]:
    box = _get(scene, "head_box")
    if box is None:
        box = _get(scene, "box")
    return tuple(map(float, box))


# --------------------------------------------------------------------------- tasks
def _meta(scene, **extra) -> dict[str, Any]:
    domain = _get(scene, "domain") or _get(_get(scene, "meta", {}) or {}, "domain", "")
    return {"domain": domain, **extra}


def task_hpe(scene, rng: np.random.Generator, decimals: int = 0) -> Sample:
    yaw, pitch, roll = (float(_get(scene, k)) for k in ("yaw", "pitch", "roll"))
    box = head_box(scene)
    return Sample(_get(scene, "image"), prompts.HPE_PROMPT,
                  prompts.format_hpe(box, yaw, pitch, roll, decimals=decimals), "hpe",
                  _meta(scene, box=box, yaw=yaw, pitch=pitch, roll=roll, target=HEAD))


def _box_sample(scene, target: str, box, kind: str) -> Sample:
    return Sample(_get(scene, "image"), prompts.grounding_prompt(target), prompts.format_box(box), "box",
                  _meta(scene, box=tuple(box), target=target, target_kind=kind))


def task_box_head(scene, rng, decimals: int = 0) -> Sample:
    return _box_sample(scene, HEAD, head_box(scene), "head")


def task_box_object(scene, rng, decimals: int = 0) -> Sample | None:
    # only objects whose name is unique in the scene: "the red cube" must mean one thing
    objs = [o for o in scene_objects(scene) if sum(p["name"] == o["name"] for p in scene_objects(scene)) == 1]
    if not objs:
        return None
    o = objs[rng.integers(len(objs))]
    return _box_sample(scene, o["name"], o["box"], "object")


LIST_PROMPT = "Locate the objects."  # every word already in the corpus: the tokenizer stays the same


def task_box_list(scene, rng, decimals: int = 0) -> Sample | None:
    """`Locate the objects.` -> `red cube [[..]] blue cone [[..]]`: every object of the scene, left to
    right, each named and then boxed (as a grounded caption). Each sample asks for the box of every
    object after its name, where `box_object` asks for one; the head is not listed."""
    objs = sorted(scene_objects(scene), key=lambda o: (o["box"][0] + o["box"][2], o["box"][1]))
    if not objs:
        return None
    answer = " ".join(f"{o['name']} {prompts.format_box(o['box'])}" for o in objs)
    return Sample(_get(scene, "image"), LIST_PROMPT, answer, "box_list",
                  _meta(scene, boxes=[o["box"] for o in objs], targets=[o["name"] for o in objs]))


def task_part(scene, rng, decimals: int = 0) -> Sample | None:
    """Grounding of one face part (`face`, `eyes`, `nose`, `mouth`: `synth.FACE_PARTS`), as a
    referring-expression grounding model does; the answer is a box, never an angle."""
    parts = (_get(scene, "meta", {}) or {}).get("parts")
    if not parts:
        return None
    names = sorted(parts)
    name = names[rng.integers(len(names))]
    return _box_sample(scene, name, parts[name], "part")


def task_box(scene, rng, decimals: int = 0) -> Sample | None:
    """Grounding: the head in half the samples, an object in the other half (when any)."""
    if rng.random() < 0.5:
        return task_box_head(scene, rng, decimals)
    return task_box_object(scene, rng, decimals) or task_box_head(scene, rng, decimals)


def axis_angles(axis: np.ndarray) -> tuple[int, int]:
    """A symmetry axis (unit, camera frame, sign-free) as two integer angles in degrees.

    `tilt`: the axis's angle in the image plane from image-up, in [-90, 90) (a line, so +-90 are
    one); `depth`: how far it leans toward the camera, in [0, 90].
    """
    x, y, z = (float(v) for v in axis)
    if y < 0 or (y == 0 and x < 0):
        x, y, z = -x, -y, -z
    tilt = math.degrees(math.atan2(-x, y))  # counter-clockwise from image-up, positive to the left
    tilt = (tilt + 90.0) % 180.0 - 90.0
    depth = math.degrees(math.asin(min(1.0, abs(z))))
    return int(round(tilt)) if round(tilt) != 90 else -90, int(round(depth))


def task_orient(scene, rng, decimals: int = 0) -> Sample | None:
    """`How is the red cone turned?` -> `tilt:-35 depth:20` (rigid-object orientation; not head pose)."""
    objs = [o for o in scene_objects(scene) if o["axis"] is not None and o["shape"] != "sphere"
            and sum(p["name"] == o["name"] for p in scene_objects(scene)) == 1]
    if not objs:
        return None
    o = objs[rng.integers(len(objs))]
    tilt, depth = axis_angles(o["axis"])
    return Sample(_get(scene, "image"), f"How is the {o['name']} turned?", f"tilt:{tilt} depth:{depth}", "orient",
                  _meta(scene, target=o["name"], tilt=tilt, depth=depth))


def _cube_symmetries() -> np.ndarray:
    """The 24 rotations that map a cube onto itself: signed permutation matrices of determinant 1."""
    out = []
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        for signs in np.ndindex(2, 2, 2):
            m = np.zeros((3, 3))
            m[range(3), perm] = [1.0 - 2.0 * v for v in signs]
            if np.linalg.det(m) > 0:
                out.append(m)
    return np.stack(out)


CUBE_SYMMETRIES = _cube_symmetries()


def cube_pose(yaw: float, pitch: float, roll: float) -> tuple[float, float, float]:
    """A cube's visible pose: of the 24 rotations that draw the same cube as `R(yaw, pitch, roll)`
    (`R S` for each symmetry `S`), the one closest to no rotation, as head-pose angles.

    A cube's pose is only defined up to its symmetries; the smallest rotation (at most ~63 deg)
    is the one answer an image can support. Mirroring commutes with it: the mirrored cube's pose
    is this one with yaw and roll negated (`M S M` is again a symmetry, M = diag(-1, 1, 1)).
    """
    from hpelib.geometry import euler_to_matrix, matrix_to_euler

    candidates = euler_to_matrix(yaw, pitch, roll) @ CUBE_SYMMETRIES
    best = candidates[int(np.argmax(np.trace(candidates, axis1=1, axis2=2)))]
    y, p, r = matrix_to_euler(best)
    return float(y), float(p), float(r)


def task_pose_object(scene, rng, decimals: int = 0) -> Sample | None:
    """`Locate the red cube and give its pose.` -> `[[x0,y0,x1,y1]] yaw:.. pitch:.. roll:..`.

    Rigid-object pose in the words of the head-pose answer, for cubes (a cube's three axes fix
    all three angles up to its symmetries, `cube_pose`; a cone or cylinder has no yaw to see).
    A pretrained VLM has met these words; a base that never wrote them gives its adapters a
    field name to lift from ~0 (docs/tiny_backend.md, "A base that has written the pose's words").
    Not head pose: no head angle enters a base that trains on it.
    """
    objs = [o for o in scene_objects(scene) if o["shape"] == "cube" and o["angles"] is not None
            and sum(p["name"] == o["name"] for p in scene_objects(scene)) == 1]
    if not objs:
        return None
    o = objs[rng.integers(len(objs))]
    yaw, pitch, roll = cube_pose(*o["angles"])
    return Sample(_get(scene, "image"), prompts.pose_prompt(o["name"]),
                  prompts.format_hpe(o["box"], yaw, pitch, roll, decimals=decimals), "pose_object",
                  _meta(scene, box=o["box"], yaw=yaw, pitch=pitch, roll=roll, target=o["name"], target_kind="object"))


def task_colour(scene, rng, decimals: int = 0) -> Sample | None:
    objs = scene_objects(scene)
    unique = [o for o in objs if o["shape"] and o["colour"] and sum(p["shape"] == o["shape"] for p in objs) == 1]
    if not unique:
        return None
    o = unique[rng.integers(len(unique))]
    return Sample(_get(scene, "image"), f"What colour is the {o['shape']}?", o["colour"], "colour",
                  _meta(scene, target=o["shape"]))


def task_count(scene, rng, decimals: int = 0) -> Sample:
    n = len(scene_objects(scene))
    return Sample(_get(scene, "image"), COUNT_PROMPT, str(n), "count", _meta(scene, count=n))


TASKS: dict[str, Callable[..., Sample | None]] = {
    "hpe": task_hpe,
    "box": task_box,
    "box_head": task_box_head,
    "box_object": task_box_object,
    "box_part": task_part,
    "box_list": task_box_list,
    "orient": task_orient,
    "pose_object": task_pose_object,
    "colour": task_colour,
    "count": task_count,
}

# The base curriculum of the tiny backend: grounding (heads and objects) plus general visual
# skills; no head pose anywhere. Weights: grounding dominates, as in a grounding generalist.
BASE_MIX = {"box": 0.6, "orient": 0.2, "colour": 0.1, "count": 0.1}


def curriculum(mix: dict[str, float] | None = None) -> dict[str, float]:
    """The base curriculum's task weights: `mix` (`base.mix`) or, when it is empty, `BASE_MIX`.
    A base never sees head pose (`hpe`), and cube poses have their own weight (`base.object_pose`)."""
    if not mix:
        return dict(BASE_MIX)
    allowed = sorted(set(TASKS) - {"hpe", "pose_object"})
    unknown = sorted(set(mix) - set(allowed))
    if unknown:
        raise ValueError(f"base.mix names {unknown}; expected tasks from {allowed} (a base is never taught "
                         f"head pose, and cube poses are weighed by base.object_pose)")
    return {k: float(w) for k, w in mix.items()}


def base_mix(object_pose: float = 0.0, mix: dict[str, float] | None = None) -> dict[str, float]:
    """The base curriculum (`curriculum(mix)`), plus `object_pose` (a weight beside its weights, which
    sum to 1 in `BASE_MIX`) of cube poses in the head-pose answer's words (`task_pose_object`) when
    it is > 0."""
    if not (isinstance(object_pose, (int, float)) and object_pose >= 0):
        raise ValueError(f"object_pose must be a number >= 0, got {object_pose!r}")
    weights = curriculum(mix)
    return {**weights, "pose_object": float(object_pose)} if object_pose > 0 else weights


def lora_mix(rehearsal_ratio: float) -> dict[str, float]:
    """The LoRA stage's mix: head pose, plus `rehearsal_ratio` of grounding samples."""
    if not 0 <= rehearsal_ratio < 1:
        raise ValueError(f"rehearsal_ratio must be in [0, 1), got {rehearsal_ratio}")
    return {"hpe": 1.0 - rehearsal_ratio, "box": rehearsal_ratio} if rehearsal_ratio > 0 else {"hpe": 1.0}


# --------------------------------------------------------------------------- mixing and streams
def allocate(weights: dict[str, float], n: int) -> dict[str, int]:
    """Split `n` samples over tasks in proportion to `weights` (largest remainder, ties by name)."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items() if w > 0}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    rest = n - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))[:rest]:
        counts[k] += 1
    return counts


@dataclass
class TaskMix:
    """Task weights, e.g. `TaskMix({"hpe": 0.8, "box": 0.2})`; validated, normalised on use."""

    weights: dict[str, float] = field(default_factory=lambda: dict(BASE_MIX))

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("TaskMix needs at least one task")
        for k, w in self.weights.items():
            if k not in TASKS:
                raise ValueError(f"unknown task {k!r}; tasks are {sorted(TASKS)}")
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"weight of task {k!r} must be a number >= 0, got {w!r}")
        if sum(self.weights.values()) <= 0:
            raise ValueError(f"TaskMix weights must not all be 0, got {self.weights}")


def mirror_scene(scene) -> SimpleNamespace:
    """The scene mirrored left-right: a second, free training view of one render.

    Mirroring x maps `R = Rz(roll) Ry(yaw) Rx(pitch)` to `M R M = Rz(-roll) Ry(-yaw) Rx(pitch)`
    (M = diag(-1, 1, 1)), so yaw and roll change sign, pitch stays, for the head and the objects;
    boxes and object axes mirror.
    """
    x0, y0, x1, y1 = head_box(scene)
    objects = []
    for o in _get(scene, "objects", None) or []:
        o = dict(o)
        bx0, by0, bx1, by1 = o["box"]
        o["box"] = [1.0 - bx1, by0, 1.0 - bx0, by1]
        if o.get("axis") is not None:
            ax = np.asarray(o["axis"], np.float64) * np.array([-1.0, 1.0, 1.0])
            o["axis"] = ax.tolist()
        for k in ("yaw", "roll"):
            if o.get(k) is not None:
                o[k] = 0.0 - float(o[k])
        o.pop("rotation", None)
        objects.append(o)
    meta = dict(_get(scene, "meta", {}) or {}, mirrored=True)
    if meta.get("parts"):  # every part is left-right symmetric: its mirror is the same part
        meta["parts"] = {k: [1.0 - b[2], b[1], 1.0 - b[0], b[3]] for k, b in meta["parts"].items()}
    if meta.get("landmarks") is not None:  # (68, 2) image points: x mirrors, left and right swap names
        from hpelib.data.render import landmark_mirror

        lm = np.asarray(meta["landmarks"], np.float32)[landmark_mirror()]
        meta["landmarks"] = np.stack([1.0 - lm[:, 0], lm[:, 1]], axis=1)
    flip = lambda a: 0.0 - float(a)  # noqa: E731  (0.0 - 0.0 keeps +0.0)
    return SimpleNamespace(image=np.ascontiguousarray(_get(scene, "image")[:, ::-1]),
                           box=(1.0 - x1, y0, 1.0 - x0, y1), yaw=flip(_get(scene, "yaw")),
                           pitch=float(_get(scene, "pitch")), roll=flip(_get(scene, "roll")),
                           objects=objects, meta=meta)


class SampleStream:
    """Training batches rendered on the fly: `stream.batch(step)` -> `list[Sample]`.

    Batch `step` depends only on `(seed, step, part)`, so resuming at step k reproduces the rest
    of an uninterrupted run. Each render serves two samples: the scene and its mirror image
    (`mirror_scene`), which halves the rendering cost (~30 ms a scene on 2 busy cores, as much as
    a training step of the tiny VLM). A task that does not apply to a view (no object to ask
    about) takes a fresh render.

    Args:
        renderer: has `render(rng) -> scene` (a `hpelib.data.synth.SceneRenderer`).
        mix: a `TaskMix` or a dict of weights.
        batch_size: samples per batch.
        seed: the training seed.
        decimals: digits after the point of the angles in answers.
        mirror: serve each render twice (as is and mirrored).
    """

    def __init__(self, renderer, mix: TaskMix | dict, batch_size: int, seed: int = 0, decimals: int = 0,
                 mirror: bool = True):
        self.renderer = renderer
        self.mix = mix if isinstance(mix, TaskMix) else TaskMix(dict(mix))
        self.batch_size = batch_size
        self.seed = seed
        self.decimals = decimals
        self.mirror = mirror
        self.counts = allocate(self.mix.weights, batch_size)

    def batch(self, step: int, part: int = 0) -> list[Sample]:
        """Batch `step`; `part` tells data-parallel processes apart (each draws its own scenes)."""
        rng = np.random.default_rng([self.seed, TRAIN_STREAM, step, part])
        tasks = [t for t, c in sorted(self.counts.items()) for _ in range(c)]
        rng.shuffle(tasks)
        views: list = []
        out = []
        for task in tasks:
            if not views:
                scene = self.renderer.render(rng)
                views = [scene, mirror_scene(scene)] if self.mirror else [scene]
            sample = TASKS[task](views.pop(0), rng, self.decimals)
            out.append(sample if sample is not None else _render_task(self.renderer, task, rng, self.decimals))
        return out


def _render_task(renderer, task: str, rng: np.random.Generator, decimals: int, max_tries: int = 200) -> Sample:
    """One sample of `task` from fresh renders (re-rendering while the task does not apply: a cube, which
    `pose_object` needs, is in ~1 of 4 `synth-train` scenes, so 20 tries failed 1 sample in ~150)."""
    for _ in range(max_tries):
        sample = TASKS[task](renderer.render(rng), rng, decimals)
        if sample is not None:
            return sample
    raise RuntimeError(f"task {task!r}: no applicable scene in {max_tries} renders; does the domain draw objects?")


def eval_set(renderer, tasks: Iterable[str] | dict[str, int], n: int = 64, seed: int = 0,
             decimals: int = 0) -> list[Sample]:
    """A fixed held-out set: `n` samples per task (or `{task: n}`), from the `EVAL_STREAM` seeds.

    The same arguments always give the same samples, and never a training scene.
    """
    sizes = dict(tasks) if isinstance(tasks, dict) else {t: n for t in tasks}
    out: list[Sample] = []
    for j, (task, k) in enumerate(sorted(sizes.items())):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {sorted(TASKS)}")
        for i in range(k):
            rng = np.random.default_rng([seed, EVAL_STREAM, j, i])
            out.append(_render_task(renderer, task, rng, decimals))
    return out


# --------------------------------------------------------------------------- vocabulary
PART_WORDS = ("face", "eyes", "nose", "mouth")
SHAPE_WORDS = ("cube", "sphere", "cone", "cylinder", "torus")
COLOUR_WORDS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black", "cyan", "magenta",
                "pink", "brown", "grey", "gray")


def corpus() -> list[str]:
    """Every prompt and answer text pattern the tasks produce (the tiny tokenizer's corpus).

    `pose_object`'s prompts (`Locate the red cube and give its pose.`) are left out: every word of
    them is here already, so the tokenizer is the same, and leaving them out keeps the corpus's
    hash, which is in every cached base's key (`train.base_key`; tests check they tokenize)."""
    shapes, colours = list(SHAPE_WORDS), list(COLOUR_WORDS)
    try:  # the renderer's own names, when it defines them
        from hpelib.data import synth

        shapes += list(getattr(synth, "SHAPES", ()))
        colours += list(getattr(synth, "COLORS", {}))
    except Exception:
        pass
    texts = [prompts.HPE_PROMPT, prompts.grounding_prompt(HEAD), COUNT_PROMPT, "tilt:0 depth:0",
             "yaw:0 pitch:0 roll:0"] + [prompts.grounding_prompt(p) for p in PART_WORDS]
    for s in shapes:
        texts += [f"What colour is the {s}?"]
        for c in colours:
            texts += [prompts.grounding_prompt(f"{c} {s}"), f"How is the {c} {s} turned?"]
    return texts
