"""How long a curriculum step of a saved tiny base takes, in float32 and under bf16 autocast (B16).

    python scripts/curriculum_step.py data/cache/base-<key>/model [--batches 12] [--repeat 3] [--threads 2]

Freezes the base's tower as `base.freeze_vision` does (`train.freeze_tower`), makes `--batches`
batches of the profile's curriculum (`base.mix`, `base.object_pose`), and times forward
(`train.answer_loss`), backward and AdamW on them, float32 and bf16 interleaved `--repeat` times
after one warm-up pass each; prints the median seconds a step of each. docs/tiny_backend.md
("Binding the words", B16) reports what it found.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hpelib import train
from hpelib.backends.tiny import TinyBackend
from hpelib.config import make_config
from hpelib.data import tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_dir")
    p.add_argument("--profile", default="default")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = make_config(a.profile)
    backend = TinyBackend.load(a.base_dir)
    train.freeze_tower(backend)
    backend.model.train()
    optimizer = torch.optim.AdamW([w for w in backend.model.parameters() if w.requires_grad], lr=1e-4)
    stream = tasks.SampleStream(train.make_renderer(config), tasks.base_mix(config.base.object_pose, config.base.mix),
                                config.base.batch_size, seed=5)
    ready = [backend.collate([backend.encode(s) for s in stream.batch(i)]) for i in range(a.batches)]

    def seconds_a_step(bf16: bool) -> float:
        start = time.perf_counter()
        for batch in ready:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = train.answer_loss(backend.model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return (time.perf_counter() - start) / len(ready)

    times: dict[str, list[float]] = {"float32": [], "bf16 autocast": []}
    for bf16 in (False, True):  # warm-up
        seconds_a_step(bf16)
    for _ in range(a.repeat):
        for name, bf16 in (("float32", False), ("bf16 autocast", True)):
            times[name].append(seconds_a_step(bf16))
    for name, t in times.items():
        print(f"{name:14s} {np.median(t):.3f} s a step (runs: {', '.join(f'{x:.3f}' for x in t)})")


if __name__ == "__main__":
    main()
