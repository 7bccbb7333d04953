"""Experiments behind docs/tiny_backend.md: one base or LoRA training run with config overrides.

    OMP_WAIT_POLICY=PASSIVE python scripts/tiny_experiment.py base --name b1 --threads 1 \
        --set base.minutes=30
    python scripts/tiny_experiment.py lora --name l1 --base-dir data/cache/base-.../model \
        --rehearsal 0.2 --set lora.train.minutes=8
    python scripts/tiny_experiment.py lora --full --name f1 --base-dir ... --set lora.train.lr=5e-4

`lora --full` trains every weight of the base (no PEFT) on the adapter's mix, with the `lora.train`
settings: what LoRA could reach at most. On a GPU: `--set 'model.device="cuda"' lora.train.prefetch=true
lora.train.prefetch_workers=4` (one process cannot render as fast as a GPU trains).

Writes everything under runs/experiments/<name>/ (history.csv, loss.png, final metrics).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hpelib import io, paths, train
from hpelib.backends import get_backend_class
from hpelib.config import make_config
from hpelib.data import tasks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["base", "lora"])
    p.add_argument("--name", required=True)
    p.add_argument("--profile", default="default")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--base-dir")
    p.add_argument("--rehearsal", type=float, default=0.2)
    p.add_argument("--adapter", default="hpe_rehearsal")
    p.add_argument("--full", action="store_true", help="lora stage: train every weight instead of an adapter")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--spec", help='JSON TinySpec fields replacing its defaults (base stage; model.tiny_spec), '
                   'e.g. \'{"number_code": 0.3}\'')
    p.add_argument("--train-domain", help='JSON synth-train DomainSpec fields, e.g. \'{"n_objects": [1, 1]}\'; the '
                   "base is then cached under the experiment's own data folder, not data/cache")
    p.add_argument("--base-mix", help='JSON task weights replacing tasks.BASE_MIX, e.g. \'{"box": 0.5, "box_part": 0.25}\' '
                   "(the same as --set base.mix=...)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.train_domain:  # the cache key knows the domain by name only: keep this base out of data/cache
        import os

        from hpelib.data import synth
        synth.override_domain("synth-train", json.loads(a.train_domain))
        data = paths.runs_dir() / "experiments" / a.name / "data"
        (data / "assets").mkdir(parents=True, exist_ok=True)
        if not (data / "assets" / "menpo3d").exists():
            os.symlink(paths.assets_dir() / "menpo3d", data / "assets" / "menpo3d")
        os.environ["HPE_DATA_DIR"] = str(data)
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    if a.spec:  # the same as `--set model.tiny_spec=...`: the base built and its cache key take these fields
        overrides["model.tiny_spec"] = json.loads(a.spec)
    if a.base_mix:  # the same as `--set base.mix=...`: the curriculum's weights, in the base's key
        overrides["base.mix"] = json.loads(a.base_mix)
    config = make_config(a.profile, overrides)
    out = paths.runs_dir() / "experiments" / a.name
    t0 = time.time()
    if a.stage == "base":
        _, history = train.train_base(config, out)
        trained = None  # the base comes back loaded from its cache, every weight marked trainable
    elif a.full:
        backend = get_backend_class(config.model.backend).load(a.base_dir, device=str(train.resolve_device(config)))
        stream = tasks.SampleStream(train.make_renderer(config), tasks.lora_mix(a.rehearsal),
                                    config.lora.train.batch_size, seed=config.lora.train.seed + 1,
                                    decimals=config.angle_decimals)
        history = train.fit(backend, stream, train.lora_eval_set(config), config.lora.train, out / "training",
                            desc="every weight")
    else:
        backend, history = train.train_lora(config, a.base_dir, a.adapter, a.rehearsal, out)
    if a.stage == "lora":
        trained = sum(p.numel() for p in backend.model.parameters() if p.requires_grad)
    last = history.iloc[-1].dropna().to_dict()
    io.write_json(out / "experiment.json", {"stage": a.stage, "overrides": overrides, "wall_s": time.time() - t0,
                                            "threads": torch.get_num_threads(), "trained_params": trained,
                                            "final": last})
    print(json.dumps(last, indent=1))


if __name__ == "__main__":
    main()
