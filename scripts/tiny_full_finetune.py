"""Run L5 of docs/tiny_backend.md: full fine-tuning (no LoRA) of a cached base on the hpe_rehearsal mix,
to tell a LoRA limit from a model limit. From the repository root:

    OMP_WAIT_POLICY=PASSIVE python scripts/tiny_full_finetune.py MINUTES LR BASE_MODEL_DIR

Writes its history to runs/experiments/full_ft_<lr>/ and prints the held-out evaluations.
"""

from __future__ import annotations

import argparse

import torch

from hpelib import paths, train
from hpelib.backends.tiny import TinyBackend
from hpelib.config import make_config
from hpelib.data import tasks

COLUMNS = ["step", "elapsed_s", "hpe/valid_rate", "hpe/acc50", "hpe/mae_yaw", "hpe/mae_pitch", "hpe/mae_roll",
           "hpe/mae_mean", "box_head/acc50"]


def main(minutes: float, lr: float, base_dir: str) -> None:
    torch.set_num_threads(2)
    config = make_config("default", {"lora.train.minutes": minutes, "lora.train.lr": lr, "lora.train.eval_every": 100})
    backend = TinyBackend.load(base_dir)  # every weight trainable: no PEFT wrapper
    stream = tasks.SampleStream(train.make_renderer(config), tasks.lora_mix(0.2), config.lora.train.batch_size,
                                seed=config.lora.train.seed + 1)
    history = train.fit(backend, stream, train.lora_eval_set(config), config.lora.train,
                        paths.runs_dir() / "experiments" / f"full_ft_{lr:g}", desc="full fine-tuning")
    print(history.dropna(subset=["hpe/valid_rate"])[COLUMNS].to_string())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("minutes", type=float, help="training budget")
    parser.add_argument("lr", type=float, help="peak learning rate")
    parser.add_argument("base_dir", help="a cached tiny base's model folder")
    args = parser.parse_args()
    main(args.minutes, args.lr, args.base_dir)
