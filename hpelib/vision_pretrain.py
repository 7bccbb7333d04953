"""Vision pre-training of the tiny base: the tower first, with a temporary regression head.

Real VLMs start from a pretrained image encoder (LLaVA's CLIP, CogVLM's EVA). The tiny base can
do the same in CPU minutes (`base.vision_minutes > 0`): before any language-model loss, the fresh
Qwen3-VL vision tower and a temporary MLP on its merged image tokens regress, for every rendered
scene, where things are (`scene_targets`): the head box, the boxes of the face parts
(`synth.FACE_PARTS`: face, eyes, nose, mouth; what a part-level grounding model knows) and up to
`N_OBJECTS` objects (presence, and the box when present; sorted left to right). Never an angle:
the base still has not been taught head pose. The head is then dropped and the whole model trains
on the base curriculum through the language-model loss, as before.

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
from hpelib.data import tasks
from hpelib.data.synth import FACE_PARTS

N_OBJECTS = 3  # object slots of the target; scenes draw 0-3 objects
PARTS = tuple(sorted(FACE_PARTS))
N_BOXES = 1 + len(PARTS) + N_OBJECTS
BOX_WEIGHT = 10.0  # smooth L1 on boxes (relative units, beta 0.05) x this, + the presence BCE
VISION_STREAM = 3  # keeps the vision stage's scenes apart from the curriculum's (tasks.TRAIN_STREAM)
HEAD_WIDTH = 512


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
    """Batches of `(image, boxes, present)`; batch `step` depends only on `(seed, step, part)`, and
    each render serves twice (as is and mirrored), as `tasks.SampleStream` does."""

    def __init__(self, renderer, batch_size: int, seed: int = 0):
        self.renderer, self.batch_size, self.seed = renderer, batch_size, seed

    def batch(self, step: int, part: int = 0) -> list[tuple]:
        rng = np.random.default_rng([self.seed, VISION_STREAM, step, part])
        out = []
        while len(out) < self.batch_size:
            scene = self.renderer.render(rng)
            for view in (scene, tasks.mirror_scene(scene)):
                out.append((view.image, *scene_targets(view)))
        return out[:self.batch_size]


class VisionJob:
    """What `train.fit` needs of a backend, for the vision stage: `model`, `device`, `encode`, `collate`."""

    def __init__(self, backend):
        self.backend = backend
        self.model = VisionPretrainer(backend.model.model.visual, backend.num_image_tokens)
        self.device = backend.device

    def encode(self, item) -> dict[str, torch.Tensor]:
        image, boxes, present = item
        enc = self.backend.encode(Sample(image, prompts.HPE_PROMPT, None, "hpe"))  # the pixels only
        return {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"],
                "boxes": torch.from_numpy(boxes)[None], "present": torch.from_numpy(present)[None]}

    def collate(self, encoded: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.cat([e[k] for e in encoded]) for k in encoded[0]}


def pretrain_vision(backend, renderer, train_config, out_dir: str | os.PathLike, batch_size: int, seed: int = 0,
                    progress: bool = True):
    """Train `backend`'s vision tower in place for `train_config.minutes` (see the module docstring);
    resumable from `out_dir`'s checkpoints. `batch_size`: this process's scenes per step.
    Returns `train.fit`'s history (`loss` per step)."""
    from hpelib import train

    job = VisionJob(backend)
    stream = TargetStream(renderer, batch_size, seed=seed)
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
