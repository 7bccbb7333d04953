"""Vision pre-training of the tiny base: the tower first, with a temporary regression head.

Real VLMs start from a pretrained image encoder (LLaVA's CLIP, CogVLM's EVA). The tiny base can
do the same in CPU minutes (`base.vision_minutes > 0`): before any language-model loss, the fresh
Qwen3-VL vision tower and a temporary MLP on its merged image tokens regress, for every rendered
scene, where things are (`scene_targets`): the head box, the boxes of the face parts
(`synth.FACE_PARTS`: face, eyes, nose, mouth; what a part-level grounding model knows) and up to
`N_OBJECTS` objects (presence, and the box when present; sorted left to right). Never an angle:
the base still has not been taught head pose. The head is then dropped and the whole model trains
on the base curriculum through the language-model loss, as before.

Two kinds of targets (`base.vision_targets`):

- `"boxes"` (V1): one MLP on all merged tokens at once regresses the boxes above.
- `"dense"` (V2): a small head on *each* merged token says what is centred in that token's cell,
  as a one-stage detector (CenterNet) does: whether the head's or an object's centre lies there;
  at the head's cell its box and its 68 landmarks (image points relative to the head box: where
  the eyes, nose and mouth are, a keypoint detector's skill, still not an angle); at an object's
  cell its box, colour, shape and the orientation of its axis (what the curriculum's `orient` task
  asks). Each token must then describe its own cell, which is what the language model's attention
  reads from.

It runs in `train.fit`'s loop (schedule, checkpoints and resume, `history.csv`, `loss.png`,
progress bar) on a small module (`VisionPretrainer`) and a job object with the
`encode`/`collate` a backend has.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from hpelib import prompts
from hpelib.backends import Sample
from hpelib.config import VISION_TARGETS
from hpelib.data import tasks
from hpelib.data.synth import COLORS, FACE_PARTS, SHAPES

N_OBJECTS = 3  # object slots of the target; scenes draw 0-3 objects
PARTS = tuple(sorted(FACE_PARTS))
N_BOXES = 1 + len(PARTS) + N_OBJECTS
BOX_WEIGHT = 10.0  # smooth L1 on boxes (relative units, beta 0.05) x this, + the presence BCE
VISION_STREAM = 3  # keeps the vision stage's scenes apart from the curriculum's (tasks.TRAIN_STREAM)
HEAD_WIDTH = 512
TARGETS = VISION_TARGETS  # base.vision_targets
N_LANDMARKS = 68
COLOUR_NAMES = tuple(COLORS)
DENSE_WIDTH = 256  # the dense head's hidden width, per token
# per token: head-here and object-here logits, the head's box and landmarks, an object's box,
# colour, shape and axis (cos 2 tilt, sin 2 tilt, depth / 90)
DENSE_SPLIT = (2, 4 + 2 * N_LANDMARKS, 4, len(COLOUR_NAMES), len(SHAPES), 3)
DENSE_OUT = sum(DENSE_SPLIT)


def scene_targets(scene) -> tuple[np.ndarray, np.ndarray]:
    """`(boxes (N_BOXES, 4), present (N_OBJECTS,))` of one scene: the head's box, the face parts'
    boxes (in `PARTS` order), then the object slots (zero boxes where absent)."""
    parts = (getattr(scene, "meta", None) or {}).get("parts")
    if not parts or any(p not in parts for p in PARTS):
        raise ValueError(f"vision pre-training needs the face parts' boxes in scene.meta['parts'] ({PARTS}); "
                         f"this scene has {sorted(parts or {})}")
    boxes = [tasks.head_box(scene)] + [parts[p] for p in PARTS]
    objs = sorted(tasks.scene_objects(scene), key=lambda o: o["box"][0])[:N_OBJECTS]
    present = np.zeros(N_OBJECTS, np.float32)
    for i in range(N_OBJECTS):
        boxes.append(objs[i]["box"] if i < len(objs) else (0.0, 0.0, 0.0, 0.0))
        present[i] = i < len(objs)
    return np.asarray(boxes, np.float32), present


def cell_index(x: float, y: float, grid: int) -> int:
    """Index of the merged token whose cell holds the relative image point `(x, y)` (row-major,
    the order of Qwen-VL's merged image tokens)."""
    col, row = (min(grid - 1, max(0, int(v * grid))) for v in (x, y))
    return row * grid + col


def dense_targets(scene, grid: int) -> dict[str, np.ndarray]:
    """Per-cell targets of one scene on the `grid x grid` merged tokens (see the module docstring):
    `head_cell`, `obj_cell` `(cells,)` 0/1; `head_index` the head's cell; `head` `(4 + 136,)` its
    box then its landmarks relative to the box; `obj_box` `(cells, 4)`, `colour`, `shape`
    `(cells,)` class indices (-1: no object), `axis` `(cells, 3)` and `axis_mask` `(cells,)`. Where
    two objects share a cell the larger one is its target."""
    landmarks = (getattr(scene, "meta", None) or {}).get("landmarks")
    if landmarks is None or np.shape(landmarks) != (N_LANDMARKS, 2):
        raise ValueError(f"dense vision pre-training needs the head's {N_LANDMARKS} landmarks in "
                         f"scene.meta['landmarks'] as ({N_LANDMARKS}, 2) image points; this scene has "
                         f"{None if landmarks is None else np.shape(landmarks)}")
    cells = grid * grid
    x0, y0, x1, y1 = tasks.head_box(scene)
    rel = (np.asarray(landmarks, np.float32) - [x0, y0]) / [max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)]
    t = {"head_cell": np.zeros(cells, np.float32), "obj_cell": np.zeros(cells, np.float32),
         "head_index": np.int64(cell_index((x0 + x1) / 2, (y0 + y1) / 2, grid)),
         "head": np.concatenate([[x0, y0, x1, y1], rel.reshape(-1)]).astype(np.float32),
         "obj_box": np.zeros((cells, 4), np.float32), "colour": np.full(cells, -1, np.int64),
         "shape": np.full(cells, -1, np.int64), "axis": np.zeros((cells, 3), np.float32),
         "axis_mask": np.zeros(cells, np.float32)}
    t["head_cell"][t["head_index"]] = 1.0
    area = lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1])  # noqa: E731
    for o in sorted(tasks.scene_objects(scene), key=area, reverse=True):
        bx0, by0, bx1, by1 = o["box"]
        c = cell_index((bx0 + bx1) / 2, (by0 + by1) / 2, grid)
        if t["obj_cell"][c] or o["colour"] not in COLOUR_NAMES or o["shape"] not in SHAPES:
            continue
        t["obj_cell"][c] = 1.0
        t["obj_box"][c] = o["box"]
        t["colour"][c], t["shape"][c] = COLOUR_NAMES.index(o["colour"]), SHAPES.index(o["shape"])
        if o["axis"] is not None and o["shape"] != "sphere":
            tilt, depth = tasks.axis_angles(o["axis"])
            t["axis"][c] = [np.cos(np.radians(2 * tilt)), np.sin(np.radians(2 * tilt)), depth / 90.0]
            t["axis_mask"][c] = 1.0
    return t


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class DenseVisionPretrainer(torch.nn.Module):
    """The tower (shared with the model, trained in place) and a temporary per-token head (`"dense"`)."""

    def __init__(self, visual: torch.nn.Module, tokens: int):
        super().__init__()
        self.visual = visual
        self.tokens = tokens
        self.head = torch.nn.Sequential(torch.nn.Linear(visual.config.out_hidden_size, DENSE_WIDTH), torch.nn.GELU(),
                                        torch.nn.Linear(DENSE_WIDTH, DENSE_OUT))

    def outputs(self, pixel_values, image_grid_thw) -> tuple[torch.Tensor, ...]:
        """Per image and token (`(n, tokens, .)` each, `DENSE_SPLIT`): head-here / object-here
        logits, the head's box and landmarks, an object's box, colour and shape logits, its axis."""
        feats = self.visual(pixel_values, grid_thw=image_grid_thw, return_dict=True).pooler_output
        out = self.head(feats.reshape(len(image_grid_thw), self.tokens, -1))
        return torch.split(out, DENSE_SPLIT, dim=-1)

    def forward(self, pixel_values, image_grid_thw, head_cell, obj_cell, head_index, head, obj_box, colour, shape,
                axis, axis_mask) -> SimpleNamespace:
        n = len(head_cell)
        here, head_out, box_out, colour_out, shape_out, axis_out = self.outputs(pixel_values, image_grid_thw)
        loss = (F.binary_cross_entropy_with_logits(here[..., 0], head_cell)
                + F.binary_cross_entropy_with_logits(here[..., 1], obj_cell))
        at_head = head_out[torch.arange(n), head_index]
        loss = loss + BOX_WEIGHT * F.smooth_l1_loss(at_head, head, beta=0.05)
        box_err = F.smooth_l1_loss(box_out, obj_box, reduction="none", beta=0.05).mean(-1)
        loss = loss + BOX_WEIGHT * _masked_mean(box_err, obj_cell)
        if bool((colour >= 0).any()):
            loss = loss + F.cross_entropy(colour_out[colour >= 0], colour[colour >= 0])
            loss = loss + F.cross_entropy(shape_out[shape >= 0], shape[shape >= 0])
        axis_err = F.smooth_l1_loss(axis_out, axis, reduction="none", beta=0.05).mean(-1)
        loss = loss + BOX_WEIGHT * _masked_mean(axis_err, axis_mask)
        return SimpleNamespace(loss=loss, head=at_head)


class VisionPretrainer(torch.nn.Module):
    """The tower (shared with the model, trained in place) and the temporary head."""

    def __init__(self, visual: torch.nn.Module, tokens: int):
        super().__init__()
        self.visual = visual
        width = visual.config.out_hidden_size * tokens
        self.head = torch.nn.Sequential(torch.nn.Linear(width, HEAD_WIDTH), torch.nn.GELU(),
                                        torch.nn.Linear(HEAD_WIDTH, 4 * N_BOXES + N_OBJECTS))

    def forward(self, pixel_values, image_grid_thw, boxes, present) -> SimpleNamespace:
        n = len(boxes)
        feats = self.visual(pixel_values, grid_thw=image_grid_thw, return_dict=True).pooler_output
        pred = self.head(feats.reshape(n, -1))
        pred_boxes = pred[:, :4 * N_BOXES].reshape(n, N_BOXES, 4)
        weight = torch.cat([torch.ones(n, N_BOXES - N_OBJECTS, device=present.device), present], dim=1)
        err = F.smooth_l1_loss(pred_boxes, boxes, reduction="none", beta=0.05).mean(-1)
        box_loss = (err * weight).sum() / weight.sum()
        presence = F.binary_cross_entropy_with_logits(pred[:, 4 * N_BOXES:], present)
        return SimpleNamespace(loss=BOX_WEIGHT * box_loss + presence, pred_boxes=pred_boxes)


class TargetStream:
    """Batches of `(image, targets)`, `targets` a dict of arrays (`scene_targets` or
    `dense_targets`, by `targets`); batch `step` depends only on `(seed, step, part)`, and
    each render serves twice (as is and mirrored), as `tasks.SampleStream` does."""

    def __init__(self, renderer, batch_size: int, seed: int = 0, targets: str = "boxes", grid: int = 4):
        if targets not in TARGETS:
            raise ValueError(f"base.vision_targets is {targets!r}; expected one of {TARGETS}")
        self.renderer, self.batch_size, self.seed = renderer, batch_size, seed
        self.targets, self.grid = targets, grid

    def _targets(self, scene) -> dict[str, np.ndarray]:
        if self.targets == "dense":
            return dense_targets(scene, self.grid)
        boxes, present = scene_targets(scene)
        return {"boxes": boxes, "present": present}

    def batch(self, step: int, part: int = 0) -> list[tuple]:
        rng = np.random.default_rng([self.seed, VISION_STREAM, step, part])
        out = []
        while len(out) < self.batch_size:
            scene = self.renderer.render(rng)
            for view in (scene, tasks.mirror_scene(scene)):
                out.append((view.image, self._targets(view)))
        return out[:self.batch_size]


class VisionJob:
    """What `train.fit` needs of a backend, for the vision stage: `model`, `device`, `encode`, `collate`."""

    def __init__(self, backend, targets: str = "boxes"):
        self.backend = backend
        pretrainer = DenseVisionPretrainer if targets == "dense" else VisionPretrainer
        self.model = pretrainer(backend.model.model.visual, backend.num_image_tokens)
        self.device = backend.device

    def encode(self, item) -> dict[str, torch.Tensor]:
        image, targets = item
        enc = self.backend.encode(Sample(image, prompts.HPE_PROMPT, None, "hpe"))  # the pixels only
        return {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
                **{k: torch.as_tensor(v)[None] for k, v in targets.items()}}

    def collate(self, encoded: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.cat([e[k] for e in encoded]) for k in encoded[0]}


def merged_grid(backend) -> int:
    """Side of the square grid of merged image tokens (`num_image_tokens` = its square)."""
    grid = int(round(backend.num_image_tokens ** 0.5))
    if grid * grid != backend.num_image_tokens:
        raise ValueError(f"dense vision targets need a square grid of image tokens; this model has "
                         f"{backend.num_image_tokens}")
    return grid


def pretrain_vision(backend, renderer, train_config, out_dir: str | os.PathLike, batch_size: int, seed: int = 0,
                    progress: bool = True, targets: str = "boxes"):
    """Train `backend`'s vision tower in place for `train_config.minutes` (see the module docstring);
    resumable from `out_dir`'s checkpoints. `batch_size`: this process's scenes per step;
    `targets`: one of `TARGETS`. Returns `train.fit`'s history (`loss` per step)."""
    from hpelib import train

    grid = merged_grid(backend) if targets == "dense" else 0
    stream = TargetStream(renderer, batch_size, seed=seed, targets=targets, grid=grid)
    job = VisionJob(backend, targets)
    return train.fit(job, stream, [], train_config, out_dir, desc="base (vision)", progress=progress)


def load_tower(backend, out_dir: str | os.PathLike) -> None:
    """Copy the vision tower of the vision stage's last checkpoint in `out_dir` into `backend`."""
    from safetensors.torch import load_file

    from hpelib import train

    ckpt = train.latest_checkpoint(Path(out_dir))
    if ckpt is None:
        raise FileNotFoundError(f"{out_dir}: no vision pre-training checkpoint to load the tower from")
    weights = {k[len("visual."):]: v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()
               if k.startswith("visual.")}
    visual = backend.model.model.visual
    missing = sorted(set(n for n, _ in visual.named_parameters()) - set(weights))
    if missing:
        raise ValueError(f"{ckpt}: the checkpoint lacks vision tower weights, e.g. {missing[:3]}")
    visual.load_state_dict(weights, strict=False)  # buffers (rotary tables) are rebuilt, not saved
