"""Benchmarks, and the synthetic LoRA set-ups they and the tests build.

    python -m hpelib.bench similarity [--ranks 8 16 64] [--repeat 2] [--threads N] [--out docs/similarity_benchmark.md]
    python -m hpelib.bench base-step [--profile default] [--steps 16] [--repeat 2] [--threads N]
    python -m hpelib.bench lora-step [--profile default] [--steps 8] [--repeat 2] [--threads 1]

`base-step` times a tiny base training step in five ways, interleaved so that a machine's
drifting speed touches them alike: the model's work alone (forward, backward, AdamW on ready
batches) with the patch embedding as the `Conv3d`, as `PatchProjection`, and with a `ConvStem`
beside it (`TinySpec.stem = "conv"`), then `train.fit`'s real loop with `prefetch` off and on
(docs/tiny_backend.md, "Faster base steps" and "A convolutional stem").

`lora-step` times an adapter's step (forward, backward, AdamW on ready batches of the LoRA mix, on
the profile's model with random weights) in `LORA_STEP_VARIANTS`' six settings: the LoRA targets,
its dropout, `train.autocast_bf16` and the logits of the answer only (`train.answer_loss`;
docs/tiny_backend.md, "A step twice as cheap"). With `--threads 1` it is the workbook's condition:
two adapters side by side, one core each.

`similarity` times the exact low-rank similarity path of `hpelib.similarity` against the dense
path (`dW = B @ A` materialised, as PEFT's `get_delta_weight` does) on the layer shapes of one
CogVLM-17B decoder block (hidden 4096; language- and vision-expert `query_key_value` 4096->12288 and
`dense` 4096->4096; MLP `gate_proj` / `up_proj` 4096->11008 and `down_proj` 11008->4096, both
experts: 10 linear layers, 403M base weights, 1.6 GB in float32), two adapters per rank, both
references, and reports the largest absolute differences in `cos` and `1 - cos`.

Memory: torch's CPU allocations bypass `tracemalloc`, so peak memory is measured on the process'
resident set: Linux's peak RSS (`VmHWM`) is reset by writing `5` to `/proc/self/clear_refs` before
each run, and `VmHWM - RSS before` is the extra peak (when the reset is not allowed, a 1 ms psutil
sampling thread stands in). The number covers everything the path allocates (float64 copies,
deltas, the result table), not only tensors.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import platform
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# --------------------------------------------------------------------------- synthetic set-ups
COGVLM_HIDDEN = 4096
COGVLM_INTERMEDIATE = 11008
# (module path within a decoder block, (out_features, in_features)): CogVLM-17B's visual-expert
# decoder layer; `query_key_value` packs q, k and v (3 x 4096).
COGVLM_BLOCK_SHAPES = [
    (f"self_attn.{expert}_expert_query_key_value", (3 * COGVLM_HIDDEN, COGVLM_HIDDEN)) for expert in ("language", "vision")
] + [
    (f"self_attn.{expert}_expert_dense", (COGVLM_HIDDEN, COGVLM_HIDDEN)) for expert in ("language", "vision")
] + [
    (f"mlp.{expert}_mlp.{proj}", shape) for expert in ("language", "vision")
    for proj, shape in (("gate_proj", (COGVLM_INTERMEDIATE, COGVLM_HIDDEN)), ("up_proj", (COGVLM_INTERMEDIATE, COGVLM_HIDDEN)),
                        ("down_proj", (COGVLM_HIDDEN, COGVLM_INTERMEDIATE)))
]


class LinearStack(torch.nn.Module):
    """Bare `nn.Linear` layers (no bias) at given dotted paths, e.g. one CogVLM decoder block."""

    def __init__(self, shapes: list[tuple[str, tuple[int, int]]], std: float = 0.02, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        for path, (out_f, in_f) in shapes:
            parent = self
            *parents, leaf = path.split(".")
            for p in parents:
                if not hasattr(parent, p):
                    parent.add_module(p, torch.nn.Module())
                parent = getattr(parent, p)
            lin = torch.nn.Linear(in_f, out_f, bias=False)
            with torch.no_grad():
                lin.weight.normal_(0.0, std, generator=gen)
            parent.add_module(leaf, lin)


def cogvlm_block(seed: int = 0) -> LinearStack:
    """CogVLM-17B's decoder block 0 as bare linear layers (`model.layers.0.<module>`), float32."""
    return LinearStack([(f"model.layers.0.{m}", s) for m, s in COGVLM_BLOCK_SHAPES], seed=seed)


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, intermediate: int = 48, vocab: int = 64):
    """A randomly initialised `LlamaForCausalLM` of `layers` decoder blocks (CPU, milliseconds)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2_vl(seed: int = 0):
    """A randomly initialised `Qwen2VLForConditionalGeneration` (2 language + 2 vision blocks): the
    module names of the project's real VLM (`model.language_model.layers.N...`, `model.visual.blocks.N...`)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, in_channels=3,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2))
    return Qwen2VLForConditionalGeneration(cfg).eval()


def random_lora_model(base: torch.nn.Module, adapters: dict[str, dict], *, seed: int = 0, b_scale: float = 1.0,
                      copy_base: bool = True):
    """A `PeftModel` over `base` with one LoRA adapter per `adapters` entry (name -> `LoraConfig`
    keyword arguments), all with random non-zero A and B (`init_lora_weights=False`).

    b_scale: multiplies every B, to set how far the adapters move the base (`1 - cos`).
    copy_base: wrap a deep copy (default), leaving `base` untouched; False wraps `base` itself
        in place, as PEFT does (for bases too large to copy).
    """
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base) if copy_base else base
    peft_model = None
    for i, (name, kwargs) in enumerate(adapters.items()):
        torch.manual_seed(seed * 1000 + i)
        config = LoraConfig(init_lora_weights=False, **kwargs)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        if b_scale != 1.0:
            with torch.no_grad():
                for module in peft_model.modules():
                    if hasattr(module, "lora_B") and name in module.lora_B:
                        module.lora_B[name].weight.mul_(b_scale)
    return peft_model.eval()


# --------------------------------------------------------------------------- measuring
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def measure(fn: Callable[[], object]) -> tuple[object, float, int]:
    """`(fn(), wall-clock seconds, peak resident memory above the start in bytes)`; see the module
    docstring for how the peak is taken."""
    gc.collect()
    before = _rss()
    if _reset_peak():
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, max(0, _vm_hwm() - before)
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        t.join()
    return out, elapsed, max(0, peak[0] - before)


# --------------------------------------------------------------------------- the similarity benchmark
def bench_similarity(ranks=(8, 16, 64), repeat: int = 2, b_scale: float = 0.05, seed: int = 0) -> list[dict]:
    """Rows `{rank, reference, lowrank_s, dense_s, speedup, lowrank_mib, dense_mib, max_abs_dcos,
    max_abs_d_one_minus_cos, max_rel_d_one_minus_cos, median_one_minus_cos}` for two adapters over one
    CogVLM decoder block."""
    from hpelib.similarity import layer_similarity, load_lora_set

    targets = [f"model.layers.0.{m}" for m, _ in COGVLM_BLOCK_SHAPES]
    rows = []
    block = cogvlm_block(seed)
    for rank in ranks:
        peft_model = random_lora_model(block, {"hpe": dict(r=rank, lora_alpha=2 * rank, target_modules=targets),
                                               "ground": dict(r=rank, lora_alpha=2 * rank, target_modules=targets)},
                                       seed=seed, b_scale=b_scale, copy_base=False)
        lora = load_lora_set(peft_model)
        for reference in ("base", "pairwise"):
            layer_similarity(lora, reference=reference)  # warm-up: lazy library initialisation is no path's cost
            res = {}
            for method in ("lowrank", "dense"):
                runs = [measure(partial(layer_similarity, lora, reference=reference, method=method))
                        for _ in range(repeat)]
                res[method] = (runs[0][0], min(run[1] for run in runs), max(run[2] for run in runs))
            (low, t_low, low_mem), (dense, t_dense, dense_mem) = res["lowrank"], res["dense"]
            omc_l, omc_d = low["one_minus_cos"].to_numpy(), dense["one_minus_cos"].to_numpy()
            rows.append({
                "rank": rank, "reference": reference, "lowrank_s": t_low, "dense_s": t_dense,
                "speedup": t_dense / t_low, "lowrank_mib": low_mem / 2**20, "dense_mib": dense_mem / 2**20,
                "max_abs_dcos": float(np.max(np.abs(low["cosine"].to_numpy() - dense["cosine"].to_numpy()))),
                "max_abs_d_one_minus_cos": float(np.max(np.abs(omc_l - omc_d))),
                "max_rel_d_one_minus_cos": float(np.max(np.abs(omc_l - omc_d) / np.maximum(np.abs(omc_d), 1e-300))),
                "median_one_minus_cos": float(np.median(omc_d)),
            })
            print(_row_md(rows[-1]), file=sys.stderr, flush=True)
        peft_model.unload()  # restores the block's plain linear layers for the next rank
        gc.collect()
    return rows


_HEADER = ("| rank | reference | low-rank (s) | dense (s) | speed-up | low-rank peak extra (MiB) | dense peak extra (MiB) "
           "| max abs Δcos | max abs Δ(1−cos) | max rel Δ(1−cos) | median 1−cos |\n"
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _row_md(row: dict) -> str:
    return (f"| {row['rank']} | {row['reference']} | {row['lowrank_s']:.4f} | {row['dense_s']:.3f} | "
            f"{row['speedup']:.0f}× | {_mib(row['lowrank_mib'])} | {_mib(row['dense_mib'])} | {row['max_abs_dcos']:.1e} | "
            f"{row['max_abs_d_one_minus_cos']:.1e} | {row['max_rel_d_one_minus_cos']:.1e} | {row['median_one_minus_cos']:.1e} |")


def _mib(x: float) -> str:
    return f"{x:.0f}" if x >= 1 else "<1"


def similarity_table_md(rows: list[dict]) -> str:
    return "\n".join([_HEADER] + [_row_md(r) for r in rows])


def machine_md() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}")


BASE_STEP_VARIANTS = ("model, Conv3d patches", "model, PatchProjection", "model, PatchProjection + ConvStem",
                      "train.fit, prefetch false", "train.fit, prefetch true")
FIT_WARMUP_STEPS = 10  # the first steps of a `fit` (start-up, calibration) are not timed


def bench_base_step(profile: str = "default", steps: int = 16, repeat: int = 2, seed: int = 0) -> list[dict]:
    """Rows `{variant, s_per_step, runs}`: the median seconds per step of each of `BASE_STEP_VARIANTS`
    over `repeat` interleaved runs of `steps` steps. The model rows time forward, backward and AdamW on
    ready batches; the `train.fit` rows the real loop (batches made, encoded and trained on) after its
    first `FIT_WARMUP_STEPS` steps, without held-out checks or checkpoints."""
    import tempfile

    from hpelib.backends.tiny import PatchProjection, TinyBackend, TinySpec
    from hpelib.config import make_config
    from hpelib.data import tasks
    from hpelib.train import fit, make_renderer

    config = make_config(profile)
    backend = TinyBackend.build(config, seed=seed)
    models = {"plain": backend.model.train(),
              "stem": TinyBackend.build(config, spec=TinySpec(stem="conv"), seed=seed).model.train()}
    proj = models["plain"].model.visual.patch_embed.proj
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=config.base.lr) for k, m in models.items()}
    stream = tasks.SampleStream(make_renderer(config), tasks.BASE_MIX, config.base.batch_size, seed=seed)
    ready = [backend.collate([backend.encode(s) for s in stream.batch(i)]) for i in range(steps)]

    def model_steps(which: str) -> None:
        for batch in ready:
            models[which](**batch).loss.backward()
            optimizers[which].step()
            optimizers[which].zero_grad()

    times: dict[str, list[float]] = {v: [] for v in BASE_STEP_VARIANTS}
    for which in models:  # warm-up
        model_steps(which)
    for _ in range(repeat):
        for variant in BASE_STEP_VARIANTS:
            proj.__class__ = torch.nn.Conv3d if variant == BASE_STEP_VARIANTS[0] else PatchProjection
            if variant.startswith("model"):
                start = time.perf_counter()
                model_steps("stem" if variant.endswith("ConvStem") else "plain")
                times[variant].append((time.perf_counter() - start) / steps)
                continue
            total = FIT_WARMUP_STEPS + steps
            train = dataclasses.replace(config.base, minutes=1e4, max_steps=total, eval_every=10 * total,
                                        checkpoint_every=10 * total, prefetch=variant.endswith("true"))
            with tempfile.TemporaryDirectory() as out:
                history = fit(backend, stream, [], train, out, progress=False)
            elapsed = history.set_index("step")["elapsed_s"]
            times[variant].append(float(elapsed[total] - elapsed[FIT_WARMUP_STEPS]) / steps)
    for m in models.values():
        m.eval()
    return [{"variant": v, "s_per_step": float(np.median(t)), "runs": t} for v, t in times.items()]


LORA_STEP_VARIANTS = {  # label -> (config overrides, logits only where a label follows: train.answer_loss)
    "language + vision LoRA, dropout 0.05, fp32": (
        {"lora.target_vision": True, "lora.dropout": 0.05, "lora.train.autocast_bf16": False}, False),
    "language + vision LoRA, dropout 0, fp32": (
        {"lora.target_vision": True, "lora.dropout": 0.0, "lora.train.autocast_bf16": False}, False),
    "language + vision LoRA, dropout 0, bf16 autocast": (
        {"lora.target_vision": True, "lora.dropout": 0.0, "lora.train.autocast_bf16": True}, False),
    "language-model LoRA, dropout 0, fp32": (
        {"lora.target_vision": False, "lora.dropout": 0.0, "lora.train.autocast_bf16": False}, False),
    "language-model LoRA, dropout 0, bf16 autocast": (
        {"lora.target_vision": False, "lora.dropout": 0.0, "lora.train.autocast_bf16": True}, False),
    "language-model LoRA, dropout 0, bf16 autocast, answer logits only": (
        {"lora.target_vision": False, "lora.dropout": 0.0, "lora.train.autocast_bf16": True}, True),
}


def bench_lora_step(profile: str = "default", steps: int = 8, repeat: int = 2, seed: int = 0) -> list[dict]:
    """Rows `{variant, s_per_step, runs}`: the median seconds per adapter step of each of
    `LORA_STEP_VARIANTS` over `repeat` interleaved runs of `steps` steps on ready batches."""
    from peft import get_peft_model

    from hpelib.backends.tiny import TinyBackend
    from hpelib.config import make_config
    from hpelib.data import tasks
    from hpelib.train import answer_loss, lora_config, make_renderer

    base = make_config(profile)
    backend = TinyBackend.build(base, seed=seed)
    stream = tasks.SampleStream(make_renderer(base), tasks.lora_mix(0.2), base.lora.train.batch_size, seed=seed)
    ready = [backend.collate([backend.encode(s) for s in stream.batch(i)]) for i in range(steps)]
    runs = {}
    for label, (overrides, answer_only) in LORA_STEP_VARIANTS.items():
        config = make_config(profile, overrides)
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(backend.model), lora_config(config, backend), adapter_name="bench")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lora.train.lr)
        runs[label] = (model, optimizer, config.lora.train.autocast_bf16, answer_only)

    def model_steps(label: str) -> None:
        model, optimizer, bf16, answer_only = runs[label]
        for batch in ready:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = answer_loss(model, batch) if answer_only else model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    times: dict[str, list[float]] = {label: [] for label in runs}
    for label in runs:  # warm-up
        model_steps(label)
    for _ in range(repeat):
        for label in runs:
            start = time.perf_counter()
            model_steps(label)
            times[label].append((time.perf_counter() - start) / steps)
    return [{"variant": v, "s_per_step": float(np.median(t)), "runs": t} for v, t in times.items()]


def base_step_table_md(rows: list[dict]) -> str:
    lines = ["| what is timed | s / step (median) | runs |", "|---|---:|---|"]
    lines += [f"| {r['variant']} | {r['s_per_step']:.3f} | {', '.join(f'{t:.3f}' for t in r['runs'])} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpelib.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    sim = sub.add_parser("similarity", help="exact low-rank vs dense layer similarity on CogVLM-17B block shapes")
    sim.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64], help="LoRA ranks (default 8 16 64)")
    sim.add_argument("--repeat", type=int, default=2,
                     help="measured runs per path: the fastest time and the largest peak memory are reported")
    sim.add_argument("--b-scale", type=float, default=0.05, help="factor on random B (sets 1 - cos)")
    sim.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sim.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    step = sub.add_parser("base-step",
                          help="a tiny base training step: patch embedding, conv stem and batch prefetching, timed")
    step.add_argument("--profile", default="default", help="the configuration profile (model and batch size)")
    step.add_argument("--steps", type=int, default=16, help="steps per timed run")
    step.add_argument("--repeat", type=int, default=2, help="interleaved runs per variant (the median is reported)")
    step.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    step.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    lstep = sub.add_parser("lora-step", help="an adapter's step: LoRA targets, dropout, bf16 autocast, answer-only logits, timed")
    lstep.add_argument("--profile", default="default", help="the configuration profile (model and batch size)")
    lstep.add_argument("--steps", type=int, default=8, help="steps per timed run")
    lstep.add_argument("--repeat", type=int, default=2, help="interleaved runs per variant (the median is reported)")
    lstep.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: the workbook's adapters)")
    lstep.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench == "similarity":
        table = similarity_table_md(bench_similarity(args.ranks, args.repeat, args.b_scale))
    else:
        if args.steps < 1 or args.repeat < 1:
            parser.error(f"--steps and --repeat must be >= 1, got {args.steps} and {args.repeat}")
        bench = bench_base_step if args.bench == "base-step" else bench_lora_step
        table = base_step_table_md(bench(args.profile, args.steps, args.repeat))
    print(table)
    if args.out is not None:
        from hpelib import io

        io.write_text(args.out, f"Machine: {machine_md()}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
