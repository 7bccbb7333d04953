"""Experiment V1: pre-train the tiny VLM's vision tower alone with a temporary regression head.

    python scripts/vision_pretrain.py --name v1 --minutes 5 [--targets head,parts,objects]

The issue's LLaVA-style step: before any language-model loss, the vision tower (a fresh tiny
Qwen3-VL's) and a temporary MLP on its 16 merged tokens regress pose-free targets of each rendered
scene: the head box, the boxes of the face parts (`synth.FACE_PARTS`), and up to three objects
(presence and box, sorted by x0). Smooth L1 on boxes, BCE on presence. The whole model (with the
trained tower and a still-random language side) is saved under runs/experiments/<name>/model, so
`scripts/pose_probe.py` can ask whether the tower's output now carries head pose.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from hpelib import io, paths, prompts, train
from hpelib.backends import Sample
from hpelib.backends.tiny import TinyBackend
from hpelib.config import make_config
from hpelib.data import tasks
from hpelib.data.synth import FACE_PARTS

N_OBJECTS = 3


def scene_targets(scene, parts: bool, objects: bool) -> tuple[np.ndarray, np.ndarray]:
    """`(boxes (K, 4), present (N_OBJECTS,))` of one scene: head, parts, object slots (zeros when absent)."""
    boxes = [tasks.head_box(scene)]
    if parts:
        boxes += [scene.meta["parts"][name] for name in sorted(FACE_PARTS)]
    present = np.zeros(N_OBJECTS, np.float32)
    if objects:
        objs = sorted(tasks.scene_objects(scene), key=lambda o: o["box"][0])[:N_OBJECTS]
        for i in range(N_OBJECTS):
            boxes.append(objs[i]["box"] if i < len(objs) else (0.0, 0.0, 0.0, 0.0))
            present[i] = i < len(objs)
    return np.asarray(boxes, np.float32), present


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--targets", default="head,parts,objects")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    want = set(a.targets.split(","))
    config = make_config("default")
    backend = TinyBackend.build(config, seed=0)
    visual = backend.model.model.visual
    renderer = train.make_renderer(config)
    rng = np.random.default_rng(123)
    scene0 = renderer.render(rng)
    k = len(scene_targets(scene0, "parts" in want, "objects" in want)[0])
    width = visual.config.out_hidden_size * backend.num_image_tokens
    head = torch.nn.Sequential(torch.nn.Linear(width, 512), torch.nn.GELU(), torch.nn.Linear(512, 4 * k + N_OBJECTS))
    params = list(visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
    out = paths.runs_dir() / "experiments" / a.name
    out.mkdir(parents=True, exist_ok=True)
    history, t0, step = [], time.time(), 0
    visual.train()
    while time.time() - t0 < a.minutes * 60:
        scenes = [renderer.render(rng) for _ in range(a.batch // 2)]
        scenes += [tasks.mirror_scene(s) for s in scenes]
        enc = [backend.encode(Sample(s.image, prompts.HPE_PROMPT, None, "hpe")) for s in scenes]
        pixels = torch.cat([e["pixel_values"] for e in enc])
        grid = torch.cat([e["image_grid_thw"] for e in enc])
        tg = [scene_targets(s, "parts" in want, "objects" in want) for s in scenes]
        boxes = torch.from_numpy(np.stack([t[0] for t in tg]))
        present = torch.from_numpy(np.stack([t[1] for t in tg]))
        feats = visual(pixels, grid_thw=grid, return_dict=True).pooler_output.reshape(len(scenes), -1)
        pred = head(feats)
        pb = pred[:, :4 * k].reshape(len(scenes), k, 4)
        weight = torch.ones(len(scenes), k)
        if "objects" in want:
            weight[:, -N_OBJECTS:] = present
        box_loss = (F.smooth_l1_loss(pb, boxes, reduction="none", beta=0.05).mean(-1) * weight).sum() / weight.sum()
        loss = box_loss * 10
        if "objects" in want:
            loss = loss + F.binary_cross_entropy_with_logits(pred[:, 4 * k:], present)
        lr = a.lr * train.lr_factor(step, 50, None)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        head_err = float((pb[:, 0] - boxes[:, 0]).abs().mean().detach())
        history.append({"step": step, "loss": float(loss), "head_l1": head_err, "elapsed_s": time.time() - t0})
        if step % 50 == 0:
            print(json.dumps(history[-1]), flush=True)
    visual.eval()
    backend.save(out / "model")
    io.write_json(out / "experiment.json", {"targets": sorted(want), "steps": step, "minutes": a.minutes,
                                            "last": history[-1], "threads": torch.get_num_threads()})
    print(json.dumps(history[-1]))


if __name__ == "__main__":
    main()
