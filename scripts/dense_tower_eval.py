"""What a dense vision pre-training stage taught the tower (V2 in docs/tiny_backend.md).

    python scripts/dense_tower_eval.py runs/experiments/<name>/training [--spec '{"stem": "conv"}']
    python scripts/dense_tower_eval.py data/cache/base-<key>/training/vision --spec '{"stem": "conv"}'

Loads the last checkpoint of a `base.vision_targets = "dense"` stage (the tower and its temporary
per-token head), renders `--n` held-out synth-train scenes and prints, from the head's outputs: how
often the head's cell is the most likely head cell, the object cells' recall and precision, the
colour and shape accuracy at the true object cells, the box and landmark errors at the head's cell,
and how well a linear map (ridge) reads the pose from the predicted landmarks, against the same map
from the true landmarks (the best those landmarks allow).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from hpelib import evaluate, train
from hpelib import vision_pretrain as vp
from hpelib.backends.tiny import TinyBackend, TinySpec
from hpelib.config import make_config

sys.path.insert(0, str(Path(__file__).parent))
from pose_probe import ridge_mae  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("training_dir", help="the dense stage's checkpoint folder")
    p.add_argument("--spec", default="{}", help="the TinySpec fields the tower was built with, as JSON")
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = make_config("default")
    ckpt = train.latest_checkpoint(Path(a.training_dir))
    if ckpt is None:
        raise SystemExit(f"{a.training_dir}: no checkpoint (latest_checkpoint.txt) to evaluate")
    renderer = train.make_renderer(config)
    scenes = [renderer.render(np.random.default_rng([9, i])) for i in range(a.n)]
    targets, (here, head_out, box_out, colour_out, shape_out, _) = tower_outputs(
        ckpt, TinySpec(**json.loads(a.spec)), scenes)
    stack = lambda k: torch.as_tensor(np.stack([t[k] for t in targets]))  # noqa: E731
    head_cell, obj_cell, colour, shape = stack("head_cell"), stack("obj_cell") > 0, stack("colour"), stack("shape")
    found = here[..., 1] > 0
    print(f"{ckpt}: {a.n} held-out scenes")
    print(f"head cell found (argmax)   {(here[..., 0].argmax(1) == head_cell.argmax(1)).float().mean():.0%}")
    print(f"object cells recall        {(found & obj_cell).sum() / obj_cell.sum():.0%}, "
          f"precision {(found & obj_cell).sum() / found.sum().clamp(min=1):.0%}")
    print(f"colour / shape at objects  {(colour_out[obj_cell].argmax(-1) == colour[obj_cell]).float().mean():.0%} / "
          f"{(shape_out[obj_cell].argmax(-1) == shape[obj_cell]).float().mean():.0%} "
          f"(chance {1 / len(vp.COLOUR_NAMES):.0%} / {1 / len(vp.SHAPES):.0%})")
    print(f"object box MAE             {(box_out[obj_cell] - stack('obj_box')[obj_cell]).abs().mean():.3f} (image widths)")
    obj_iou = [evaluate.box_iou(tuple(b), tuple(t)) for b, t in
               zip(box_out[obj_cell].tolist(), stack("obj_box")[obj_cell].tolist())]
    print(f"object box Acc@0.5         {np.mean(np.asarray(obj_iou) >= 0.5):.0%} at the true cells "
          f"(what an answer copied from the tower's token could reach)")
    pred = head_out[torch.arange(a.n), stack("head_index")].numpy()
    true = np.stack([t["head"] for t in targets])
    const = np.abs(true[:, 4:] - true[:, 4:].mean(0)).mean()
    print(f"head box MAE               {np.abs(pred[:, :4] - true[:, :4]).mean():.3f} (image widths)")
    print(f"landmark MAE               {np.abs(pred[:, 4:] - true[:, 4:]).mean():.3f} (head-box units; "
          f"their mean: {const:.3f})")
    pose = np.array([[s.yaw, s.pitch, s.roll] for s in scenes])
    n_train = int(0.8 * a.n)
    for name, x in (("true landmarks", true[:, 4:]), ("predicted landmarks", pred[:, 4:])):
        mae, _ = ridge_mae(x, pose, n_train)
        print(f"pose from {name:19s} MAE y/p/r {mae.round(1)} mean {mae.mean():.1f} deg (linear, held-out 20 %)")


def tower_outputs(ckpt: Path, spec: TinySpec, scenes: list) -> tuple[list[dict], tuple[torch.Tensor, ...]]:
    """The dense stage's tower and per-token head from checkpoint `ckpt` (a tower of `spec`), run on
    `scenes`: their `dense_targets` and the head's outputs (`vp.DENSE_SPLIT`, `(n, tokens, .)` each)."""
    job = vp.VisionJob(TinyBackend.build(make_config("default"), spec=spec), "dense")
    job.model.load_state_dict(load_file(str(ckpt / "trainable.safetensors")))
    job.model.eval()
    grid = vp.merged_grid(job.backend)
    targets = [vp.dense_targets(s, grid) for s in scenes]
    outs = []
    with torch.no_grad():
        for i in range(0, len(scenes), 50):
            batch = job.collate([job.encode((s.image, t)) for s, t in zip(scenes[i:i + 50], targets[i:i + 50])])
            outs.append(job.model.outputs(batch["pixel_values"], batch["image_grid_thw"]))
    return targets, tuple(torch.cat(parts) for parts in zip(*outs))


if __name__ == "__main__":
    main()
