"""How much head pose can the LoRA stage build into a base's features at all? An upper bound.

    python scripts/pose_capacity.py data/cache/base-<key>/model --name cap_def [--at head|answer] [--layer 0]
        [--rank 8] [--full | --lora-stem] [--lr 5e-3] [--minutes 4] [--threads 1]

Trains what `02_train_lora` trains (a LoRA of the `lora` section's targets, on the `hpe_rehearsal`
mix; or, with `--full`, every weight) on the language-model loss *plus* a direct regression: a
temporary linear head reads yaw/pitch/roll from the hidden state of the head's own image token
after decoder layer `--layer` (0: the tower's output as the decoder receives it), or with
`--at answer` from the answer's ` yaw:` position, with a smooth L1 loss (weight 10), as the issue's
plain CNN was trained. The head is dropped afterwards; nothing here is a workbook stage. The
held-out MAE of that head on 300 `synth-train` scenes is what the adapter's features can carry
after the same minutes: if even a direct regression stays above the 10-deg bar, no read-out of
those features through answer tokens will go below it. `--save` keeps the LoRA, so
`scripts/angle_readout.py` can show what its answers make of those features. Writes
`runs/experiments/<name>/capacity.json` (the MAE every 50 steps and at the end).
docs/tiny_backend.md (R2, "... what the LoRA stage can learn at all") reports what it found.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch

from hpelib import io, paths, train
from hpelib.backends.tiny import TinyBackend
from hpelib.config import make_config
from hpelib.data import tasks
from hpelib.vision_pretrain import cell_index, merged_grid

ANGLES = ("yaw", "pitch", "roll")
SCALE = torch.tensor([90.0, 45.0, 45.0])  # the regression's targets are angles / SCALE (about unit spread)


def read_rows(backend: TinyBackend, hidden: torch.Tensor, input_ids: torch.Tensor, samples: list,
              at: str) -> torch.Tensor:
    """`hidden` (batch, sequence, width) where the regression reads: `head`, the image token whose
    cell holds each sample's head-box centre (what an attention read-out can select); `answer`, the
    answer's ` yaw:` token (teacher-forced: the position that writes the yaw)."""
    rows = torch.arange(len(samples))
    if at == "answer":
        return hidden[rows, (input_ids == backend.tokenizer.convert_tokens_to_ids(" yaw:")).float().argmax(1)]
    grid = merged_grid(backend)
    cells = torch.tensor([cell_index((s.meta["box"][0] + s.meta["box"][2]) / 2,
                                     (s.meta["box"][1] + s.meta["box"][3]) / 2, grid) for s in samples])
    first = (input_ids == backend.model.config.image_token_id).float().argmax(1)
    return hidden[rows, first + cells]


def held_out_mae(backend: TinyBackend, head: torch.nn.Linear, samples: list, layer: int, at: str) -> np.ndarray:
    """The regression head's MAE per angle (degrees) on `samples` (all head-pose samples)."""
    errors = []
    backend.model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), 50):
            part = samples[i:i + 50]
            batch = backend.collate([backend.encode(s) for s in part])
            batch.pop("labels")
            hidden = backend.model(**batch, output_hidden_states=True).hidden_states[layer]
            feats = read_rows(backend, hidden, batch["input_ids"], part, at)
            y = torch.tensor([[s.meta[k] for k in ANGLES] for s in part], dtype=torch.float)
            errors.append((head(feats) * SCALE - y).abs())
    backend.model.train()
    return torch.cat(errors).mean(0).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_dir")
    p.add_argument("--name", required=True)
    p.add_argument("--at", choices=["head", "answer"], default="head",
                   help="read the pose from the head's image token, or from the answer's ` yaw:` position")
    p.add_argument("--layer", type=int, default=None,
                   help="after which decoder layer (0: the decoder's input); default 0 at the head, the last at the answer")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (alpha = 2 x rank); default: the profile's")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--full", action="store_true", help="train every weight instead of a LoRA")
    what.add_argument("--lora-stem", action="store_true",
                      help="LoRA on a conv stem's convolutions too (`TinySpec.stem` conv; not a workbook target)")
    p.add_argument("--lr", type=float, default=None, help="default: the profile's LoRA learning rate")
    p.add_argument("--weight", type=float, default=10.0, help="the regression loss's weight beside the LM loss")
    p.add_argument("--minutes", type=float, default=4.0, help="training time (held-out checks not counted)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--save", action="store_true", help="also save the LoRA (PEFT format) in the output folder's "
                   "`adapter/`, for `scripts/angle_readout.py`: what its answers make of those features")
    a = p.parse_args()
    if a.layer is None:
        a.layer = 0 if a.at == "head" else -1
    if a.save and a.full:
        p.error("--save keeps a LoRA; with --full there is none (every weight trains)")
    torch.set_num_threads(a.threads)
    config = make_config("default")
    if a.rank:
        config.lora.rank, config.lora.alpha = a.rank, 2 * a.rank
    lr = a.lr or config.lora.train.lr
    backend = TinyBackend.load(a.base_dir)
    torch.manual_seed(config.lora.train.seed)
    if a.full:
        for param in backend.model.parameters():
            param.requires_grad_(True)
    else:
        from peft import get_peft_model

        lora = train.lora_config(config, backend)
        if a.lora_stem:
            if backend.spec.stem != "conv":
                raise SystemExit(f"--lora-stem: {a.base_dir} has no conv stem (TinySpec.stem = {backend.spec.stem!r})")
            convs = [n for n, m in backend.model.named_modules()
                     if ".patch_embed.stem." in n and isinstance(m, torch.nn.Conv2d)]
            lora.target_modules = "|".join([lora.target_modules, *(re.escape(n) for n in convs)])
        backend.model = get_peft_model(backend.model, lora, adapter_name="hpe_rehearsal")
    backend.model.train()
    head = torch.nn.Linear(backend.model.config.text_config.hidden_size, 3)
    params = [q for q in backend.model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW([{"params": params, "lr": lr}, {"params": head.parameters(), "lr": 1e-2}],
                                  betas=(0.9, 0.98))
    renderer = train.make_renderer(config)
    stream = tasks.SampleStream(renderer, tasks.lora_mix(0.2), config.lora.train.batch_size,
                                seed=config.lora.train.seed + 1)
    held_out = [tasks.task_hpe(renderer.render(np.random.default_rng([7, i])), None) for i in range(a.n_eval)]
    warmup, trained_s, step, total, log = config.lora.train.warmup_steps, 0.0, 0, None, []
    while trained_s < a.minutes * 60:
        t0 = time.time()
        if step == warmup:  # the schedule's length from the speed so far, as `train.fit` sets it
            total = int(a.minutes * 60 / (trained_s / warmup))
        factor = train.lr_factor(step, warmup, total)
        for group, base_lr in zip(optimizer.param_groups, (lr, 1e-2)):
            group["lr"] = base_lr * factor
        samples = stream.batch(step)
        batch = backend.collate([backend.encode(s) for s in samples])
        pose = [i for i, s in enumerate(samples) if s.task == "hpe"]
        out = backend.model(**batch, output_hidden_states=True)
        y = torch.tensor([[samples[i].meta[k] for k in ANGLES] for i in pose], dtype=torch.float) / SCALE
        feats = read_rows(backend, out.hidden_states[a.layer][pose], batch["input_ids"][pose],
                          [samples[i] for i in pose], a.at)
        regression = torch.nn.functional.smooth_l1_loss(head(feats), y) if pose else torch.zeros(())
        (out.loss + a.weight * regression).backward()
        torch.nn.utils.clip_grad_norm_(params + list(head.parameters()), config.lora.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        trained_s += time.time() - t0
        if step % 50 == 0:
            mae = held_out_mae(backend, head, held_out, a.layer, a.at)
            log.append({"step": step, "trained_s": round(trained_s, 1), "lm_loss": out.loss.item(),
                        **{f"mae_{k}": float(v) for k, v in zip(ANGLES, mae)}, "mae_mean": float(mae.mean())})
            print(log[-1], flush=True)
    mae = held_out_mae(backend, head, held_out, a.layer, a.at)
    result = {"base_dir": a.base_dir, "at": a.at, "layer": a.layer, "full": a.full, "rank": None if a.full else config.lora.rank,
              "lora_stem": a.lora_stem, "trained_params": sum(q.numel() for q in params),
              "lr": lr, "minutes": a.minutes, "threads": a.threads, "steps": step,
              "final": {**{f"mae_{k}": float(v) for k, v in zip(ANGLES, mae)}, "mae_mean": float(mae.mean())},
              "history": log}
    out_dir = paths.runs_dir() / "experiments" / a.name
    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_json(out_dir / "capacity.json", result)
    if a.save:
        train.save_adapter(backend.model, "hpe_rehearsal", out_dir / "adapter")
    print("final", result["final"])


if __name__ == "__main__":
    main()
