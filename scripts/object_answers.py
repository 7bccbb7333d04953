"""Where does a tiny base's box go when asked for an object? Binding versus localisation.

    python scripts/object_answers.py data/cache/base-<key>/model [--n 200] [--device cuda]
    python scripts/object_answers.py data/cache/base-<key>/model --tower data/cache/base-<key>/training/vision

Renders `n` held-out synth-train scenes with at least one uniquely named object, asks for one of
them (`Where is the red cube?`) and sorts each answer by the box it overlaps best (IoU >= 0.5):
the asked object, another object of the scene, the head, or nothing. Answers on other objects mean
the model localises objects but does not bind the words to them; answers on nothing mean it does
not localise them either (the share whose centre falls inside the asked object tells a poor box from
a wrong place). Last, the Acc@0.5 by the object's size. `--tower` (a dense vision stage's folder,
the base's own) splits the answers by what that stage's per-token head says at the asked object's
cell: whether it marks an object there, and its colour. Misses where the tower found the object
are the language side's; the others the tower's. docs/tiny_backend.md reports what it found.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np

from hpelib import evaluate, prompts, train
from hpelib.backends.tiny import TinyBackend, TinySpec
from hpelib.config import make_config
from hpelib.data import tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_dir")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--device", default="cpu", help="where the base answers: cpu, cuda or auto")
    p.add_argument("--tower", help="the base's dense vision stage (data/cache/base-<key>/training/vision)")
    a = p.parse_args()
    tower = a.tower and train.latest_checkpoint(Path(a.tower))
    if a.tower and tower is None:  # before minutes of rendering and answering
        raise SystemExit(f"{a.tower}: no checkpoint (latest_checkpoint.txt) of a vision stage")
    config = make_config("default")
    renderer = train.make_renderer(config)
    samples, other_objects, heads, scenes = [], [], [], []
    i = 0
    while len(samples) < a.n:
        rng = np.random.default_rng([11, i])
        i += 1
        scene = renderer.render(rng)
        sample = tasks.task_box_object(scene, rng)
        if sample is None:
            continue
        samples.append(sample)
        scenes.append(scene)
        other_objects.append([o for o in tasks.scene_objects(scene) if o["name"] != sample.meta["target"]])
        heads.append(tasks.head_box(scene))
    base = TinyBackend.load(a.base_dir, device=a.device)
    answers = evaluate.generate_answers(base, samples, batch_size=50)
    kinds, shared = collections.Counter(), collections.Counter()
    for sample, answer, others, head in zip(samples, answers, other_objects, heads):
        box = prompts.parse_response(answer).box
        hit = [o for o in others if box is not None and evaluate.box_iou(box, o["box"]) >= 0.5]
        if box is None:
            kinds["no box"] += 1
        elif evaluate.box_iou(box, sample.meta["box"]) >= 0.5:
            kinds["the asked object"] += 1
        elif evaluate.box_iou(box, head) >= 0.5:
            kinds["the head"] += 1
        elif hit:
            kinds["another object"] += 1
            colour, shape = sample.meta["target"].split()
            shared["its colour" if hit[0]["colour"] == colour else "its shape" if hit[0]["shape"] == shape
                   else "neither"] += 1
        else:
            kinds["nothing (IoU < 0.5 with every box)"] += 1
    for kind, count in kinds.most_common():
        print(f"{kind:36s} {count:4d}  {count / len(samples):5.0%}")
    # binding: does the other object share the asked one's colour (the shape word unread) or its shape?
    print("another object sharing the asked one's " + ", ".join(f"{k}: {v}" for k, v in shared.most_common()))
    # how often could the colour alone have told them apart?
    unique = sum(sum(o["colour"] == s.meta["target"].split()[0] for o in others) == 0
                 for s, others in zip(samples, other_objects))
    print(f"prompts whose object is the only one of its colour in the scene: {unique / len(samples):.0%}")
    # coarser: is the answer's centre inside the asked object's box (found, but a poor box)?
    centred = sum(_centre_inside(prompts.parse_response(ans).box, s.meta["box"]) for s, ans in zip(samples, answers))
    print(f"answer's centre inside the asked object's box: {centred / len(samples):.0%}; "
          f"distinct answers: {len(set(answers))} of {len(answers)}")
    # by the object's size (the side of a square of its box's area, in pixels of the image)
    px = make_config("default").data.image_size
    sides = np.array([((b[2] - b[0]) * (b[3] - b[1])) ** 0.5 * px for b in (s.meta["box"] for s in samples)])
    boxes = [prompts.parse_response(ans).box for ans in answers]
    hits = np.array([box is not None and evaluate.box_iou(box, s.meta["box"]) >= 0.5 for s, box in zip(samples, boxes)])
    for lo, hi in ((0, 16), (16, 24), (24, 32), (32, 48), (48, px)):
        m = (sides >= lo) & (sides < hi)
        if m.any():
            print(f"objects {lo:3d}-{hi:3d} px: {m.sum():4d}, Acc@0.5 {hits[m].mean():4.0%}")
    if tower:
        _tower_split(tower, base.spec, scenes, samples, hits)


def _tower_split(ckpt: Path, spec: TinySpec, scenes: list, samples: list, hits: np.ndarray) -> None:
    """The answers' Acc@0.5 split by what the dense vision stage's own head says at the asked object's cell."""
    import sys

    from hpelib import vision_pretrain as vp

    sys.path.insert(0, str(Path(__file__).parent))
    from dense_tower_eval import tower_outputs

    _, (here, _, _, colour_out, _, _) = tower_outputs(ckpt, spec, scenes)
    grid = int(round(here.shape[1] ** 0.5))
    cells = [vp.cell_index((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, grid) for b in (s.meta["box"] for s in samples)]
    rows = np.arange(len(samples))
    found = (here[rows, cells, 1] > 0).numpy()
    colour_ok = (colour_out[rows, cells].argmax(-1).numpy()
                 == np.array([vp.COLOUR_NAMES.index(s.meta["target"].split()[0]) for s in samples]))
    print(f"the tower's head at the asked object's cell ({ckpt}):")
    for name, m in (("marks an object, its colour right", found & colour_ok),
                    ("marks an object, another colour", found & ~colour_ok), ("marks no object", ~found)):
        if m.any():
            print(f"  {name:36s} {m.sum():4d} ({m.mean():4.0%}), the base's Acc@0.5 there {hits[m].mean():4.0%}")


def _centre_inside(box, target) -> bool:
    if box is None:
        return False
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return target[0] <= cx <= target[2] and target[1] <= cy <= target[3]


if __name__ == "__main__":
    main()
