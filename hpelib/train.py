"""Training: the base pre-training (`01_train_base`) and LoRA fine-tuning (`02_train_lora`).

One loop (`fit`) serves both stages, on `accelerate` (CPU here, GPUs, or several data-parallel
processes under torchrun / `accelerate launch --multi_gpu`; `base.processes` starts them itself):

- batches rendered on the fly by a `tasks.SampleStream` (a task mix; for LoRA, head pose plus a
  rehearsal ratio of grounding samples), each batch a pure function of `(seed, step)`;
- AdamW, linear warmup then cosine decay to `MIN_LR_FRACTION` of the peak; gradient
  accumulation and clipping;
- a wall-clock budget (`minutes`) or `max_steps`, whichever comes first. The cosine needs a
  length: after `CALIBRATION_STEPS` steps the loop measures its speed and fixes
  `total_steps = min(max_steps, steps that fit the budget)`; the number is stored in every
  checkpoint, so a resumed run continues the same schedule;
- a held-out evaluation every `eval_every` steps (valid-format rate, pose MAE, box Acc@0.5);
- checkpoints every `checkpoint_every` steps, written to a temporary folder and renamed
  (trainable weights as safetensors, optimiser, step, schedule, RNG states, history); a run
  started again in the same folder resumes from the latest one;
- a tqdm bar, `history.csv` and `loss.png` in the output folder.

Entry points: `train_base(config, out_dir)` (cached by a hash of what defines the base) and
`train_lora(config, base_dir, adapter_name, rehearsal_ratio, out_dir)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from hpelib import io, paths, prompts
from hpelib.backends.base import Backend, Sample, get_backend_class
from hpelib.config import Config, TrainConfig, config_from_dict, make_config
from hpelib.data import tasks
from hpelib.data.prefetch import BackgroundStream
from hpelib.evaluate import box_iou, generate_answers
from hpelib.geometry import angle_difference

MIN_LR_FRACTION = 0.05  # the cosine ends at 5 % of the peak learning rate, not 0
CALIBRATION_STEPS = 8  # steps timed before the schedule's length is fixed from the budget
RECALIBRATE_EVERY = 50  # steps between re-estimates of the schedule's length
CHECKPOINT_PREFIX = "checkpoint-"
LATEST = "latest_checkpoint.txt"
HISTORY_CSV = "history.csv"
LOSS_PNG = "loss.png"
DONE = "training_done.json"
SETTINGS_JSON = "settings.json"  # what a training in a folder was started with (fit)
STATUS_JSON = "status.json"  # step, total, loss, elapsed_s: rewritten every step, for watchers of a run
BASE_VERSION = 2  # bump when base training code changes what a cached base is (2: Qwen3-VL tiny)

# the base's held-out tasks (heads and objects separately) and the LoRA stage's
BASE_EVAL_TASKS = ("box_head", "box_object")
LORA_EVAL_TASKS = ("hpe", "box_head", "box_object")
BOX_TASKS = ("hpe", "pose_object", "box", "box_head", "box_object", "box_part")  # answers that carry a box: by IoU
POSE_TASKS = ("hpe", "pose_object")  # answers in the head-pose grammar: a box and three angles


# ------------------------------------------------------------------------------------ schedule
def lr_factor(step: int, warmup_steps: int, total_steps: int | None) -> float:
    """Learning-rate multiplier at optimiser step `step` (0-based).

    Linear warmup over `warmup_steps`, then a cosine from 1 to `MIN_LR_FRACTION` at
    `total_steps`; while `total_steps` is unknown (calibration) the factor stays at the warmup's.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if total_steps is None:
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------ scoring
def score_answers(samples: Sequence[Sample], answers: Sequence[str]) -> pd.DataFrame:
    """One row per sample: `task`, `target_kind`, `answer`, `kind`, `valid`, `iou`, `err_yaw`,
    `err_pitch`, `err_roll` (wrap-aware absolute errors; NaN where the answer is not valid)."""
    rows = []
    for s, a in zip(samples, answers):
        task = "hpe" if s.task in POSE_TASKS else "box" if s.task == "box" else None
        r = prompts.parse_response(a, task=task)
        name = f"box_{s.meta['target_kind']}" if s.task == "box" and s.meta.get("target_kind") else s.task
        row = {"task": name, "target_kind": s.meta.get("target_kind", "head" if s.task == "hpe" else ""),
               "prompt": s.prompt, "answer": a, "truth": s.answer, "kind": r.kind,
               "valid": r.kind == task if task else a.strip() == (s.answer or "").strip(),
               "iou": np.nan, "err_yaw": np.nan, "err_pitch": np.nan, "err_roll": np.nan}
        if task and row["valid"] and "box" in s.meta:
            row["iou"] = float(box_iou([r.box], [s.meta["box"]])[0])
        if task == "hpe" and row["valid"]:
            for k in ("yaw", "pitch", "roll"):
                row[f"err_{k}"] = float(abs(angle_difference(getattr(r, k), s.meta[k])))
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame) -> dict[str, float]:
    """Held-out metrics from `score_answers`: per task `valid_rate`, `acc50` (boxes; an invalid
    answer is a miss) and for `hpe` and `pose_object` the MAE per angle and `mae_mean` (valid answers)."""
    out: dict[str, float] = {}
    for task, g in table.groupby("task"):
        out[f"{task}/valid_rate"] = float(g["valid"].mean())
        if task in BOX_TASKS:
            out[f"{task}/acc50"] = float((g["iou"].fillna(0.0) >= 0.5).mean())
        if task in POSE_TASKS:
            for k in ("yaw", "pitch", "roll"):
                out[f"{task}/mae_{k}"] = float(g[f"err_{k}"].mean())
            out[f"{task}/mae_mean"] = float(np.mean([out[f"{task}/mae_{k}"] for k in ("yaw", "pitch", "roll")]))
        if task not in BOX_TASKS:
            out[f"{task}/exact"] = float(g["valid"].mean())
    out["valid_rate"] = float(table["valid"].mean()) if len(table) else float("nan")
    return out


def evaluate_samples(backend: Backend, samples: Sequence[Sample], batch_size: int = 32,
                     max_new_tokens: int | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Generate answers for `samples` (`evaluate.generate_answers`: batched by task, the token cap
    sized to the reference answers when None) and score them: `(table, metrics)` (see `summarize`)."""
    answers = generate_answers(backend, samples, batch_size, max_new_tokens, progress=False)
    table = score_answers(samples, answers)
    return table, summarize(table)


# ------------------------------------------------------------------------------------ checkpoints
@dataclass
class LoopState:
    """What a checkpoint restores besides weights and optimiser."""

    step: int = 0  # optimiser steps done
    total_steps: int | None = None  # schedule length, fixed after calibration
    elapsed_s: float = 0.0  # training wall time spent so far (all sessions)
    history: list = dataclasses.field(default_factory=list)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, model: torch.nn.Module, optimizer, state: LoopState, keep: int = 1) -> Path:
    """Write `out_dir/checkpoint-<step>/` atomically (temp folder + rename), point `LATEST` at it,
    and delete older checkpoints beyond `keep`."""
    from safetensors.torch import save_file

    final = out_dir / f"{CHECKPOINT_PREFIX}{state.step:07d}"
    tmp = out_dir / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, tmp / "rng.pt")
    io.write_json(tmp / "state.json", dataclasses.asdict(state))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    io.write_text(out_dir / LATEST, final.name + "\n")
    old = sorted(p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p != final)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(out_dir) / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer) -> LoopState:
    """Restore trainable weights, optimiser and RNG states; return the loop state."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{path}: checkpoint holds weights the model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    return LoopState(**json.loads((path / "state.json").read_text()))


# ------------------------------------------------------------------------------------ the loop
def _param_groups(model: torch.nn.Module, weight_decay: float, lora_plus_ratio: float = 1.0) -> list[dict]:
    """AdamW's groups: weight decay on matrices only; with `lora_plus_ratio` != 1 LoRA's B matrices
    in a group of their own whose learning rate is that many times the schedule's (`lr_scale`)."""
    decay, no_decay, lora_b = [], [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if lora_plus_ratio != 1 and ".lora_B." in n:
            lora_b.append(p)
        else:
            (no_decay if p.ndim < 2 or "norm" in n.lower() or "embed" in n.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lora_plus_ratio != 1:
        if not lora_b:
            raise ValueError(f"lora_plus_ratio={lora_plus_ratio}: the model has no trainable LoRA B matrices "
                             "(`.lora_B.`); set it to 1 for training without LoRA")
        groups.append({"params": lora_b, "weight_decay": weight_decay, "lr_scale": lora_plus_ratio})
    return groups


def fit(backend: Backend, stream: tasks.SampleStream, eval_samples: Sequence[Sample], train: TrainConfig,
        out_dir: str | os.PathLike, desc: str = "train", progress: bool = True,
        stop_after_steps: int | None = None, settings: dict[str, Any] | None = None) -> pd.DataFrame:
    """Train `backend.model`'s trainable parameters on `stream` under the budget in `train`.

    Resumes from the latest checkpoint in `out_dir` if there is one, and if that training had the
    same `settings`; one made with other settings is moved aside (`<out_dir>.replaced-<time>`, kept,
    with a note naming what changed) and training starts afresh.

    Args:
        backend: the model (its trainable parameters are trained: all for the base, LoRA's for
            an adapter) and how to encode samples.
        stream: the training batches; `stream.batch_size` is the batch per optimiser micro-step.
        eval_samples: the fixed held-out samples scored every `train.eval_every` steps.
        train: budget, optimiser and schedule.
        out_dir: checkpoints, `history.csv`, `loss.png`.
        stop_after_steps: stop (as if interrupted) after this many steps in this call; for tests.
        settings: what defines this training besides `train` (e.g. the LoRA shape, the base);
            with `train` it is written to `out_dir/settings.json` and compared before resuming.

    Returns:
        The history: one row per optimiser step (`step`, `loss`, `lr`, `elapsed_s`) with the
        held-out metrics on evaluation steps.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    wanted = json.loads(json.dumps({"train": dataclasses.asdict(train), **(settings or {})}, default=str))
    for name in ("prefetch", "prefetch_workers", "eval_every", "eval_samples", "checkpoint_every"):
        del wanted["train"][name]  # how batches are made and how often it is checked: resuming is fine
    accelerator = Accelerator(gradient_accumulation_steps=train.grad_accum,
                              cpu=backend.device.type == "cpu")
    if accelerator.is_main_process:
        _set_aside_if_other_settings(out_dir, wanted)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / SETTINGS_JSON).exists():
            io.write_json(out_dir / SETTINGS_JSON, wanted)
    accelerator.wait_for_everyone()
    torch.manual_seed(train.seed)
    model = backend.model
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, train.weight_decay, train.lora_plus_ratio), lr=train.lr,
                                  betas=(0.9, 0.98))

    state = LoopState()
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    targets = None  # soft number targets and/or weighted angle tokens; None: the model's own loss
    if train.angle_sigma > 0 or train.box_sigma > 0 or train.angle_weight != 1:
        from hpelib.soft_targets import NumberTargets

        targets = NumberTargets.from_tokenizer(backend.tokenizer, train.angle_sigma, train.box_sigma,
                                               train.angle_weight)
    # the vision stage's job (hpelib.vision_pretrain) is no Backend: its loss is its own head's
    answer_only = bool(getattr(backend, "answer_logits_only", False))
    is_main = accelerator.is_main_process
    part = accelerator.process_index
    budget_s = train.minutes * 60.0

    def evaluate() -> dict[str, float]:
        if not eval_samples:
            return {}
        unwrapped = accelerator.unwrap_model(model)
        saved, backend.model = backend.model, unwrapped
        try:
            _, metrics = evaluate_samples(backend, eval_samples, batch_size=max(train.batch_size, 32))
        finally:
            backend.model = saved
        unwrapped.train()
        return metrics

    # train.prefetch: the same batches, made ahead in background processes (closed at the end)
    with BackgroundStream(stream, workers=train.prefetch_workers) if train.prefetch \
            else contextlib.nullcontext(stream) as stream:
        steps_this_call = 0
        bar = tqdm(total=state.total_steps or train.max_steps, initial=state.step, desc=desc, disable=not (progress and is_main),
                   dynamic_ncols=True)
        t_session = time.time()
        elapsed0 = state.elapsed_s
        calib_t0, calib_step0 = None, 0
        while state.step < (state.total_steps or train.max_steps):
            if state.elapsed_s >= budget_s:
                break
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                break
            if calib_t0 is None and steps_this_call == 1:  # the first step of a session is slow
                calib_t0, calib_step0 = (time.time(), state.elapsed_s), state.step
            lr = train.lr * lr_factor(state.step, train.warmup_steps, state.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            losses = []
            for micro in range(train.grad_accum):
                samples = stream.batch(state.step * train.grad_accum + micro, part=part)
                batch = backend.collate([backend.encode(s) for s in samples])
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=train.autocast_bf16):
                        if answer_only:
                            loss = answer_loss(model, batch, targets)
                        elif targets is None:
                            loss = model(**batch).loss
                        else:
                            labels = batch.pop("labels")
                            loss = targets.loss(model(**batch).logits, labels)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                losses.append(float(loss.detach()))
            state.step += 1
            steps_this_call += 1
            state.elapsed_s = elapsed0 + (time.time() - t_session)
            row: dict[str, Any] = {"step": state.step, "loss": float(np.mean(losses)), "lr": lr,
                                   "elapsed_s": round(state.elapsed_s, 2)}
            # calibration: fix the schedule's length from the measured speed, and re-estimate it
            # every RECALIBRATE_EVERY steps (a shared CPU's speed drifts); the cosine then stretches
            # or shrinks so that it still ends when the budget does
            recalibrate = state.total_steps is not None and state.step % RECALIBRATE_EVERY == 0 \
                and state.total_steps < train.max_steps
            if (state.total_steps is None and state.step >= CALIBRATION_STEPS + 1 and calib_t0 is not None) or recalibrate:
                if calib_t0 is not None and state.step > 1:
                    per_step = (state.elapsed_s - calib_t0[1]) / max(state.step - calib_step0, 1)
                else:
                    per_step = state.elapsed_s / state.step
                per_step *= 1.08  # room for the held-out evaluations
                fit_steps = state.step + int(max(budget_s - state.elapsed_s, 0) / max(per_step, 1e-6))
                total = int(max(min(train.max_steps, fit_steps), state.step + 1))
                if accelerator.num_processes > 1:
                    total = int(accelerator.gather(torch.tensor([total], device=accelerator.device)).min().item())
                state.total_steps = total
                bar.total = state.total_steps
            if state.total_steps is None and state.step >= train.max_steps:
                state.total_steps = train.max_steps
            last = state.step >= (state.total_steps or train.max_steps) or state.elapsed_s >= budget_s
            if accelerator.num_processes > 1:  # every process must stop at the same step
                last = bool(accelerator.gather(torch.tensor([int(last)], device=accelerator.device)).max().item())
                if last:
                    state.total_steps = state.step
            if state.step % train.eval_every == 0 or last:
                row.update(evaluate())
            state.history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}")
            if is_main:
                io.write_json(out_dir / STATUS_JSON, {"step": state.step, "total": state.total_steps or train.max_steps,
                                                      "loss": row["loss"], "elapsed_s": row["elapsed_s"],
                                                      "processes": accelerator.num_processes})
            if is_main and (state.step % train.checkpoint_every == 0 or last):
                save_checkpoint(out_dir, accelerator.unwrap_model(model), optimizer, state)
                write_history(out_dir, state.history)
            accelerator.wait_for_everyone()
        bar.close()
    if is_main:
        write_history(out_dir, state.history)
    backend.model = accelerator.unwrap_model(model)
    history = pd.DataFrame(state.history)
    history.attrs["finished"] = stop_after_steps is None or steps_this_call < stop_after_steps
    return history


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], soft=None) -> torch.Tensor:
    """`model(**batch).loss` (the mean cross-entropy of the labelled tokens), with the vocabulary
    projection only at the positions whose next token is labelled: the answer's, about a third of a
    tiny LoRA batch's positions. 13 % of a tiny adapter's step (docs/tiny_backend.md, "A step twice as
    cheap"). Needs a forward that takes a boolean `logits_to_keep` mask (`Backend.answer_logits_only`).
    With `soft` (`soft_targets.NumberTargets`), its loss instead (soft number targets, weighted angle
    tokens)."""
    batch = dict(batch)
    labels = batch.pop("labels")
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    logits = model(**batch, logits_to_keep=keep).logits  # (labelled positions, vocabulary)
    if soft is not None:
        return soft.loss_at(logits, labels, keep[:, :-1])
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])


def _set_aside_if_other_settings(out_dir: Path, wanted: dict[str, Any]) -> None:
    """Move a training folder made with other settings to `<out_dir>.replaced-<time>` (nothing is
    deleted), saying what changed, so that `fit` starts afresh instead of resuming it. A folder
    without `settings.json` (written before it existed) is resumed as before."""
    found = out_dir / SETTINGS_JSON
    if not found.exists():
        return
    before = io.read_json(found)
    if before == wanted:
        return
    flat_before, flat_wanted = _flatten(before), _flatten(wanted)
    changed = sorted(k for k in set(flat_before) | set(flat_wanted) if flat_before.get(k) != flat_wanted.get(k))
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(out_dir, aside)
    print(f"note: {out_dir} was trained with other settings ({', '.join(changed)}); "
          f"moved to {aside.name}, training afresh")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_history(out_dir: Path, history: list[dict]) -> None:
    """`history.csv` and the loss-curve `loss.png` (atomically)."""
    df = pd.DataFrame(history)
    io.write_text(out_dir / HISTORY_CSV, df.to_csv(index=False))
    if len(df):
        from hpelib.plots import save_figure

        fig = plot_history(df)
        save_figure(fig, out_dir / LOSS_PNG)
        import matplotlib.pyplot as plt

        plt.close(fig)


def plot_history(history: pd.DataFrame):
    """Loss per step (smoothed) and the held-out metrics at evaluation steps."""
    import matplotlib.pyplot as plt

    if "step" not in history.columns or not len(history):  # a pretrained base: nothing was trained
        fig, ax = plt.subplots(figsize=(5, 1))
        ax.text(0.5, 0.5, "nothing trained (pretrained base)", ha="center", va="center")
        ax.set_axis_off()
        plt.close(fig)
        return fig
    metric_cols = [c for c in history.columns if c.endswith(("acc50", "mae_mean")) or c == "valid_rate"]
    fig, axes = plt.subplots(1, 2 if metric_cols else 1, figsize=(10 if metric_cols else 5, 3.2), squeeze=False)
    ax = axes[0, 0]
    ax.plot(history["step"], history["loss"], alpha=0.3, color="C0")
    ax.plot(history["step"], history["loss"].rolling(20, min_periods=1).mean(), color="C0", label="loss (20-step mean)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    if metric_cols:
        ax = axes[0, 1]
        ev = history.dropna(subset=metric_cols, how="all")
        for c in metric_cols:
            if c.endswith("mae_mean"):
                continue
            ax.plot(ev["step"], ev[c], marker="o", label=c)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out rate")
        mae = [c for c in metric_cols if c.endswith("mae_mean")]
        if mae:
            ax2 = ax.twinx()
            ax2.plot(ev["step"], ev[mae[0]], color="k", ls="--", marker="x", label=mae[0])
            ax2.set_ylabel("pose MAE (deg)")
            ax2.legend(loc="center right")
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ stages
def make_renderer(config: Config, domain: str | None = None):
    from hpelib.data.synth import SceneRenderer

    return SceneRenderer(domain or config.data.train_domain, config.data.image_size)


# base fields added after bases were cached -> their unset value, at which they stay out of the key
ADDED_BASE_FIELDS = {"angle_sigma": 0, "box_sigma": 0, "vision_minutes": 0, "freeze_vision": False,
                     "autocast_bf16": False, "angle_weight": 1, "object_pose": 0, "vision_steps": 0}


def base_key(config: Config) -> str:
    """Hash of what defines the base: model, base training, image size, training domain, seed,
    curriculum, the tokenizer's corpus and backend sizes. Changing anything else (LoRA, merges, test sets) reuses it."""
    spec = {}
    if config.model.backend == "tiny":
        from hpelib.backends.tiny import spec_for

        spec = dataclasses.asdict(spec_for(config))  # model.tiny_spec enters the key through the spec
        for name in ("number_code", "angle_circle"):  # added after bases were cached: in the key only when set
            if not spec[name]:
                del spec[name]
        if spec["stem"] == "linear":  # likewise: the stem's fields only for a conv stem
            del spec["stem"], spec["stem_widths"]
    base = dataclasses.asdict(config.base)
    del base["prefetch"], base["prefetch_workers"]  # how the batches are made, not which: the same base either way
    del base["lora_plus_ratio"]  # always 1 for a base (Config checks it): no LoRA there
    del base["mix"]  # the curriculum's weights are the payload's "mix", however they were set
    for name, unset in ADDED_BASE_FIELDS.items():  # fields added after bases were cached: in the key only when set
        if base[name] == unset:
            del base[name]
    if base["vision_targets"] == "boxes":  # likewise: V1's targets were the only ones
        del base["vision_targets"]
    model = dataclasses.asdict(config.model)
    del model["tiny_spec"]  # in `spec` above, where a TinySpec field means the same however it was set
    payload = {"model": model, "base": base,
               "image_size": config.data.image_size, "domain": config.data.train_domain, "seed": config.seed,
               "mix": tasks.curriculum(config.base.mix), "spec": spec, "version": BASE_VERSION,
               # the tiny tokenizer is built from the task corpus: new words are a new base
               "corpus": hashlib.sha256("\n".join(tasks.corpus()).encode()).hexdigest()[:12]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def base_cache_dir(config: Config) -> Path:
    """`paths.cache_dir()/base-<base_key>`: where the base of `config` is trained and kept."""
    return paths.cache_dir() / f"base-{base_key(config)}"


def base_eval_set(config: Config, n: int | None = None, object_pose: bool = True) -> list[Sample]:
    """Held-out grounding samples (heads and objects) of the training domain, and, when the
    curriculum has them (`base.object_pose`) and `object_pose` is true, cube poses (`pose_object`)."""
    mix = tasks.base_mix(config.base.object_pose, config.base.mix)
    names = BASE_EVAL_TASKS + tuple(t for t in ("box_part", "pose_object") if mix.get(t)
                                    and (object_pose or t != "pose_object"))
    return tasks.eval_set(make_renderer(config), names, n or config.base.eval_samples, seed=config.seed,
                          decimals=config.angle_decimals)


def object_pose_check(backend: Backend, config: Config, n: int,
                      batch_size: int = 32) -> tuple[dict[str, float], pd.DataFrame]:
    """The base's cube poses (`base.object_pose`) on `n` held-out scenes: metrics
    `base/<domain>/object_pose_<valid_rate|acc50|mae_yaw|...|mae_mean>` and the answers; nothing
    (`{}`, an empty frame) when the curriculum has none."""
    if not config.base.object_pose:
        return {}, pd.DataFrame()
    samples = tasks.eval_set(make_renderer(config), ["pose_object"], n, seed=config.seed,
                             decimals=config.angle_decimals)
    table, metrics = evaluate_samples(backend, samples, batch_size)
    prefix = f"base/{config.data.train_domain}/object_pose_"
    return {prefix + k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("pose_object/")}, table


def lora_eval_set(config: Config, n: int | None = None) -> list[Sample]:
    """Held-out head-pose and grounding samples of the training domain."""
    return tasks.eval_set(make_renderer(config), LORA_EVAL_TASKS, n or config.lora.train.eval_samples,
                          seed=config.seed, decimals=config.angle_decimals)


def train_base(config: Config, out_dir: str | os.PathLike | None = None, force: bool = False,
               progress: bool = True) -> tuple[Backend, pd.DataFrame]:
    """The base VLM of `config`: trained once (all weights, the base curriculum), then cached.

    For the tiny backend this is grounding from scratch plus the general visual tasks of
    `tasks.BASE_MIX` (never head pose). For a pretrained hub backend nothing is trained: the
    model is loaded and returned with an empty history (the notebook only measures it).

    Args:
        config: the run's configuration (`model`, `base`, `data.image_size`, ...).
        out_dir: the run's base folder; gets `base.json` (the cache path and the final metrics),
            `history.csv` and `loss.png`.
        force: retrain even if the cache holds a finished base.

    Returns:
        `(backend, history)`: the trained backend (in eval mode) and the training history.
    """
    cls = get_backend_class(config.model.backend)
    if config.model.backend != "tiny":
        return cls.build(config), pd.DataFrame()
    cache = base_cache_dir(config)
    work = cache / "training"
    if force and cache.exists():
        shutil.rmtree(cache)
    if not (cache / DONE).exists():
        if config.base.processes > 1:
            _launch_base(config, progress)
        else:
            fit_base(config, progress)
    backend = cls.load(cache / "model", device=str(resolve_device(config)))
    history = pd.read_csv(work / HISTORY_CSV)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vision = work / VISION_DIR
        io.write_json(out / "base.json", {"path": str(cache / "model"), **io.read_json(cache / DONE),
                                          **({"vision": io.read_json(vision / DONE)} if (vision / DONE).exists() else {})})
        for src, name in ((work, HISTORY_CSV), (work, LOSS_PNG), (vision, HISTORY_CSV), (vision, LOSS_PNG)):
            if (src / name).exists():
                shutil.copyfile(src / name, out / (name if src == work else f"{VISION_DIR}_{name}"))
    return backend, history


def vision_history(base_out: str | os.PathLike) -> pd.DataFrame | None:
    """The vision pre-training stage's history that `train_base` copied into the run's base folder
    (`vision_history.csv`), or None when the base had no such stage (`base.vision_minutes` 0)."""
    path = Path(base_out) / f"{VISION_DIR}_{HISTORY_CSV}"
    return pd.read_csv(path) if path.exists() else None


def fit_base(config: Config, progress: bool = True) -> None:
    """Train the tiny base into its cache folder from this process: alone, or as one of the
    `base.processes` ranks that `_launch_base` starts (rank 0 then writes the model)."""
    world = world_size()
    if world != config.base.processes:
        raise ValueError(f"base.processes is {config.base.processes} but this launch has {world} processes; "
                         f"the base's cache key holds base.processes, so set it to {world}")
    cache = base_cache_dir(config)
    backend = get_backend_class(config.model.backend).build(config)  # a resumed run loads its checkpoint
    if config.base.vision_minutes > 0:
        _vision_stage(config, backend, cache / "training" / VISION_DIR, progress)
        if config.base.freeze_vision:
            freeze_tower(backend)
    mix = tasks.base_mix(config.base.object_pose, config.base.mix)
    stream = tasks.SampleStream(make_renderer(config), mix,
                                per_process_batch(config.base, "base"), seed=config.seed, decimals=config.angle_decimals)
    history = fit(backend, stream, base_eval_set(config), config.base, cache / "training", desc="base",
                  progress=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        backend.save(cache / "model")
        final = {k: v for k, v in history.iloc[-1].items() if isinstance(v, (int, float)) and np.isfinite(v)}
        io.write_json(cache / DONE, {"key": base_key(config), "steps": int(history["step"].iloc[-1]),
                                     "processes": world, "minutes": float(history["elapsed_s"].iloc[-1]) / 60,
                                     "device": device_name(backend.device), "final": final})


VISION_WARMUP = 50
VISION_DIR = "vision"  # the vision pre-training stage's checkpoints and history, in the base's training/


def _vision_stage(config: Config, backend: Backend, out: Path, progress: bool) -> None:
    """`base.vision_minutes` of vision pre-training (`hpelib.vision_pretrain`) into `backend`'s
    tower, or, once done, the tower it trained (for a base resumed before its first checkpoint)."""
    from hpelib import vision_pretrain

    if (out / DONE).exists():
        vision_pretrain.load_tower(backend, out)
        return
    # float32 whatever `base.autocast_bf16` says: under autocast the tower's stage ran 20 % slower, where the
    # curriculum's steps (the tower frozen) ran 29 % faster (docs/tiny_backend.md, "Binding the words", B16)
    stage = dataclasses.replace(config.base, minutes=config.base.vision_minutes,
                                max_steps=config.base.vision_steps or config.base.max_steps,
                                warmup_steps=min(config.base.warmup_steps, VISION_WARMUP), autocast_bf16=False)
    history = vision_pretrain.pretrain_vision(backend, make_renderer(config), stage, out,
                                              per_process_batch(config.base, "base"), seed=config.seed,
                                              progress=progress, targets=config.base.vision_targets)
    if int(os.environ.get("RANK", "0")) == 0:
        io.write_json(out / DONE, {"steps": int(history["step"].iloc[-1]),
                                   "minutes": float(history["elapsed_s"].iloc[-1]) / 60,
                                   "loss": float(history["loss"].tail(20).mean())})


def freeze_tower(backend: Backend) -> None:
    """Stop training the vision tower's patch embedding, positions and blocks (`base.freeze_vision`);
    its mergers, which project the tower's tokens into the language model (LLaVA's projector), keep
    training."""
    for name, p in backend.model.model.visual.named_parameters():
        if "merger" not in name:
            p.requires_grad_(False)


def world_size() -> int:
    """Processes of the data-parallel launch this process is part of (`WORLD_SIZE`; 1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_process_batch(train: TrainConfig, section: str) -> int:
    """This process's share of `train.batch_size` when `world_size()` processes train together."""
    world = world_size()
    if train.batch_size % world:
        raise ValueError(f"{section}.batch_size ({train.batch_size}) must be a multiple of the {world} "
                         f"data-parallel processes, each takes an equal share")
    return train.batch_size // world


LAUNCH_LOG = "launch.log"  # the data-parallel processes' output, beside their checkpoints


def _launch_base(config: Config, progress: bool = True) -> None:
    """Train the base with `base.processes` data-parallel processes on the CPU's cores, each with
    its share of the threads (`torchrun`), while a progress bar here follows the
    `status.json` rank 0 writes. Their output goes to `training/launch.log`; an interrupt stops
    them (the checkpoints stay, and the next call resumes)."""
    from tqdm.auto import tqdm

    from hpelib import parallel

    if resolve_device(config).type != "cpu":
        raise ValueError(f"base.processes is {config.base.processes}: data-parallel base training runs on the "
                         f"CPU's cores, but model.device resolves to {resolve_device(config)}; set base.processes 1")
    n = config.base.processes
    work = base_cache_dir(config) / "training"
    work.mkdir(parents=True, exist_ok=True)
    io.write_json(work / "config.json", config.to_dict())
    threads = parallel.worker_threads(n)
    # torchrun, not `accelerate launch --cpu --num_processes N`: that starts one process unless an
    # MPI host file is given (accelerate 1.x); fit's Accelerator finds the ranks torchrun sets
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "hpelib.train", "base",
           "--config", str(work / "config.json"), "--out", str(work)]
    env = dict(os.environ, HPE_DATA_DIR=str(paths.data_dir()), OMP_NUM_THREADS=str(threads))
    bar = tqdm(total=config.base.max_steps, desc=f"base ({n} processes)", disable=not progress, dynamic_ncols=True)
    with open(work / LAUNCH_LOG, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                show_status(bar, work / STATUS_JSON)
        except BaseException:  # an interrupt (or any error here) stops the processes, not only this loop
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            bar.close()
    if proc.returncode != 0 or not (base_cache_dir(config) / DONE).exists():
        tail = "\n".join((work / LAUNCH_LOG).read_text().splitlines()[-25:])
        raise RuntimeError(f"data-parallel base training exited with code {proc.returncode} without a finished "
                           f"base; its log is {work / LAUNCH_LOG}, ending:\n{tail}")


def show_status(bar, status: Path, **postfix: str) -> None:
    """Move a tqdm `bar` to the step of a training running elsewhere, from the `status.json` its
    `fit` writes every step; no file yet (or one mid-rename) leaves the bar as it is."""
    try:
        st = io.read_json(status)
    except (FileNotFoundError, ValueError):
        return
    bar.total, bar.n = st["total"], st["step"]
    bar.set_postfix(loss=f"{st['loss']:.3f}", **postfix, refresh=False)
    bar.refresh()


def resolve_device(config: Config) -> torch.device:
    if config.model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.model.device)


def device_name(device: torch.device | str) -> str:
    """Where a training ran, for its metrics: `cpu`, or `cuda:0 (NVIDIA H200)`."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def base_model_dir(config: Config) -> Path:
    """The saved base model of `config` (after `train_base`)."""
    return base_cache_dir(config) / "model"


def lora_config(config: Config, backend: Backend):
    """PEFT `LoraConfig` from the `lora` section and the backend's target patterns."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=backend.lora_target_modules(config.lora.target_language,
                                                                 config.lora.target_vision,
                                                                 config.lora.target_projector),
                      bias="none")


def train_lora(config: Config, base_dir: str | os.PathLike, adapter_name: str, rehearsal_ratio: float,
               out_dir: str | os.PathLike, progress: bool = True, stop_after_steps: int | None = None):
    """Fine-tune a LoRA adapter on head pose, with `rehearsal_ratio` of grounding samples per batch.

    Args:
        config: the run's configuration (`lora` section: rank, alpha, dropout, targets, `train`).
        base_dir: the saved base model (`base_model_dir(config)` or a hub backend's folder).
        adapter_name: the adapter's name (`hpe`, `hpe_rehearsal`).
        rehearsal_ratio: fraction of grounding samples in each batch, in [0, 1).
        out_dir: the adapter folder: PEFT's `adapter_config.json` + `adapter_model.safetensors`
            at the end; checkpoints, `history.csv`, `loss.png` and `metrics.json` beside them.
        stop_after_steps: stop after this many steps in this call (tests of resuming).

    Returns:
        `(backend, history)`: the backend whose `model` is the `PeftModel` with the adapter
        active, and the training history.
    """
    from peft import get_peft_model

    out = Path(out_dir)
    cls = get_backend_class(config.model.backend)
    backend = cls.load(base_dir, device=str(resolve_device(config)))
    torch.manual_seed(config.lora.train.seed)
    backend.model = get_peft_model(backend.model, lora_config(config, backend), adapter_name=adapter_name)
    stream = tasks.SampleStream(make_renderer(config), tasks.lora_mix(rehearsal_ratio),
                                per_process_batch(config.lora.train, "lora.train"),
                                seed=config.lora.train.seed + 1, decimals=config.angle_decimals)
    lora = {k: v for k, v in dataclasses.asdict(config.lora).items() if k not in ("train", "workers", "adapters")}
    settings = {"adapter": adapter_name, "rehearsal_ratio": rehearsal_ratio, "base": str(Path(base_dir).resolve()),
                "lora": lora, "data": {"image_size": config.data.image_size, "domain": config.data.train_domain},
                "angle_decimals": config.angle_decimals}
    history = fit(backend, stream, lora_eval_set(config), config.lora.train, out / "training",
                  desc=f"lora {adapter_name}", progress=progress, stop_after_steps=stop_after_steps,
                  settings=settings)
    if history.attrs.get("finished") and len(history):
        save_adapter(backend.model, adapter_name, out)
        final = {k: v for k, v in history.iloc[-1].items() if isinstance(v, (int, float)) and np.isfinite(v)}
        io.write_json(out / "metrics.json", {"adapter": adapter_name, "rehearsal_ratio": rehearsal_ratio,
                                             "device": device_name(backend.device),
                                             "steps": int(history["step"].iloc[-1]),
                                             "minutes": float(history["elapsed_s"].iloc[-1]) / 60, **final})
        for name in (HISTORY_CSV, LOSS_PNG):
            if (out / "training" / name).exists():
                shutil.copyfile(out / "training" / name, out / name)
    backend.model.eval()
    return backend, history


def save_adapter(peft_model, adapter_name: str, out_dir: str | os.PathLike) -> Path:
    """Write the adapter in PEFT's format straight into `out_dir` (PEFT itself would nest a
    non-default adapter in a subfolder named after it)."""
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.adapter.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
    src = tmp / adapter_name if (tmp / adapter_name).is_dir() else tmp
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------ notebook stages
def load_base(config: Config) -> Backend:
    """The run's base backend, in eval mode: the cached tiny base (after `train_base`), or a hub
    backend built from `config.model` (its own loading rules: trust_remote_code, 4-bit, ...)."""
    cls = get_backend_class(config.model.backend)
    if config.model.backend != "tiny":
        backend = cls.build(config)
    else:
        folder = base_model_dir(config)
        if not (base_cache_dir(config) / DONE).exists():
            raise FileNotFoundError(f"{folder}: no trained base for this configuration (key {base_key(config)}); "
                                    f"run notebooks/01_train_base first")
        backend = cls.load(folder, device=str(resolve_device(config)))
    backend.model.eval()
    return backend


def adapter_dirs(run_dir: str | os.PathLike) -> dict[str, Path]:
    """`{name: folder}` of the run's finished LoRA adapters (`adapters/<name>/`, PEFT format)."""
    root = Path(run_dir) / paths.ADAPTERS_DIR
    found = {d.name: d for d in sorted(root.iterdir()) if (d / "adapter_model.safetensors").is_file()} \
        if root.is_dir() else {}
    if not found:
        raise FileNotFoundError(f"{root}: no trained adapters; run notebooks/02_train_lora first")
    return found


def middle(values: Sequence[float]) -> float:
    """The middle value of a grid (e.g. the threshold a heatmap outlines by default)."""
    values = sorted(values)
    return values[len(values) // 2]


def train_adapters(config: Config, run_dir: str | os.PathLike, progress: bool = True
                   ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Train every adapter of `config.lora.adapters` on the run's base, into `adapters/<name>/`.

    An adapter whose folder already holds a finished adapter trained with the same settings is
    reused; an interrupted one resumes from its checkpoint.

    With `lora.workers` > 1 the adapters train side by side, each in its own process with its
    share of the CPU threads (`hpelib.parallel`); each still gets `lora.train.minutes`, so the
    stage takes about one adapter's budget instead of their sum. One progress bar per adapter
    follows the `status.json` each training writes.

    Returns:
        `(summary, histories)`: one row per adapter (rehearsal ratio, steps, minutes, final
        held-out metrics), and each adapter's training history.
    """
    base_dir = base_model_dir(config) if config.model.backend == "tiny" else Path(config.model.model_id)
    outs = {name: Path(run_dir) / paths.ADAPTERS_DIR / name for name in config.lora.adapters}
    jobs = {name: dict(config=config, base_dir=base_dir, adapter_name=name, rehearsal_ratio=ratio, out_dir=outs[name])
            for name, ratio in config.lora.adapters.items()}
    if config.lora.workers > 1 and len(jobs) > 1:
        histories = _train_in_parallel(jobs, config.lora.workers, progress)
    else:
        histories = {name: train_lora(**job, progress=progress)[1] for name, job in jobs.items()}
    rows = [io.read_json(outs[name] / "metrics.json") for name in jobs]
    return pd.DataFrame(rows), histories


def _adapter_job(**job) -> pd.DataFrame:
    """`train_lora` in a worker process: only the history comes back (the adapter is on disk)."""
    return train_lora(**job, progress=False)[1]


def _train_in_parallel(jobs: dict[str, dict], workers: int, progress: bool) -> dict[str, pd.DataFrame]:
    from tqdm.auto import tqdm

    from hpelib import parallel

    bars = {name: tqdm(total=jobs[name]["config"].lora.train.max_steps, desc=f"lora {name}", position=i,
                       disable=not progress, dynamic_ncols=True) for i, name in enumerate(jobs)}

    def poll(states: dict[str, str]) -> None:
        for name, bar in bars.items():
            show_status(bar, jobs[name]["out_dir"] / "training" / STATUS_JSON, state=states[name])

    try:
        return parallel.run_jobs(_adapter_job, jobs, workers, on_poll=poll)
    finally:
        for bar in bars.values():
            bar.close()


def plot_histories(histories: dict[str, pd.DataFrame]):
    """Loss curves of several trainings in one figure, one colour each."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, h in histories.items():
        if len(h):
            ax.plot(h["step"], h["loss"].rolling(10, min_periods=1).mean(), label=name)
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log")
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def stage_metrics(stage: str, history: pd.DataFrame) -> dict[str, float]:
    """Flat metrics of a training stage: `train/<stage>/steps`, `.../minutes` and the final
    held-out numbers as `train/<stage>/final/<metric>` (kept out of the variants x domains tables)."""
    prefix = f"train/{stage}"
    if not len(history):
        return {f"{prefix}/steps": 0}
    last = history.iloc[-1]
    out = {f"{prefix}/steps": int(last["step"]), f"{prefix}/minutes": float(last["elapsed_s"]) / 60}
    for k, v in history.ffill().iloc[-1].items():
        if k not in ("step", "elapsed_s", "lr") and isinstance(v, (int, float, np.floating)) and np.isfinite(v):
            out[f"{prefix}/final/{k}"] = float(v)
    return out


def adapter_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """Flat metrics of the LoRA stage, per adapter: `train/lora:<name>/steps`, `.../minutes`,
    `train/lora:<name>/final/<metric>`."""
    out = {}
    for row in summary.to_dict("records"):
        prefix = f"train/lora:{row.pop('adapter')}"
        for k, v in row.items():
            if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and np.isfinite(v):
                key = k if k in ("steps", "minutes", "rehearsal_ratio") else f"final/{k}"
                out[f"{prefix}/{key}"] = float(v)
    return out


# ------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hpelib.train {base,lora} --profile smoke --out DIR [...]` (also under
    `accelerate launch`)."""
    p = argparse.ArgumentParser(prog="python -m hpelib.train", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["base", "lora"])
    p.add_argument("--profile", default="default")
    p.add_argument("--config", help="a run's config.json (instead of --profile and --set)")
    p.add_argument("--out", required=True, help="output folder (LoRA: the adapter folder)")
    p.add_argument("--base-dir", help="LoRA: the saved base model")
    p.add_argument("--adapter", default="hpe_rehearsal")
    p.add_argument("--rehearsal", type=float, default=0.2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, JSON values")
    args = p.parse_args(argv)
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    if args.config:
        config = config_from_dict(io.read_json(args.config))
        if overrides:
            p.error("--set goes with --profile, not with --config")
    else:
        config = make_config(args.profile, overrides)
    if args.stage == "base" and world_size() > 1:  # one rank of a data-parallel launch
        fit_base(config, progress=False)
        return 0
    if args.stage == "base":
        _, history = train_base(config, args.out)
    else:
        if not args.base_dir:
            p.error("lora needs --base-dir")
        _, history = train_lora(config, args.base_dir, args.adapter, args.rehearsal, args.out)
    print(history.tail(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
