"""Experiment V1: pre-train a fresh tiny VLM's vision tower alone (`hpelib.vision_pretrain`).

    python scripts/vision_pretrain.py --name v1 --minutes 5
    python scripts/vision_pretrain.py --name v2 --minutes 5 --targets dense

The tower and the temporary head regress the head box, the face parts' boxes and the objects of
rendered scenes for `--minutes`; the whole model (trained tower, still-random language side) is
saved under runs/experiments/<name>/model, so `scripts/pose_probe.py` can ask whether the tower's
output now carries head pose. In a base, `base.vision_minutes` runs the same stage before the
curriculum.
"""

from __future__ import annotations

import argparse
import json

import torch

from hpelib import io, paths, train
from hpelib.backends.tiny import TinyBackend, TinySpec
from hpelib.config import TrainConfig, make_config
from hpelib.vision_pretrain import TARGETS, VISION_STREAM, pretrain_vision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=100_000, help="stop after this many steps if sooner")
    p.add_argument("--spec", default="{}", help="TinySpec fields as JSON, e.g. '{\"stem\": \"conv\"}'")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--targets", choices=TARGETS, default="boxes", help="what the temporary head predicts")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    config = make_config("default")
    backend = TinyBackend.build(config, spec=TinySpec(**json.loads(a.spec)))
    out = paths.runs_dir() / "experiments" / a.name
    stage = TrainConfig(minutes=a.minutes, max_steps=a.steps, lr=a.lr, batch_size=a.batch, warmup_steps=50)
    history = pretrain_vision(backend, train.make_renderer(config), stage, out / "training", a.batch,
                              seed=VISION_STREAM, targets=a.targets)
    backend.save(out / "model")
    io.write_json(out / "experiment.json", {"steps": int(history["step"].iloc[-1]), "minutes": a.minutes,
                                            "loss": float(history["loss"].tail(20).mean()),
                                            "threads": torch.get_num_threads(), "targets": a.targets,
                                            "spec": json.loads(a.spec), "lr": a.lr})
    print(json.dumps(history.iloc[-1].to_dict()))


if __name__ == "__main__":
    main()
