"""Per-layer cosine similarities of LoRA adapters, exact and without materialising `dW`
(`03_layer_similarity`).

A LoRA adapter k changes a target linear layer l by `dW[k,l] = s[k,l] * B[k,l] @ A[k,l]`
(`A: (r, in_features)`, `B: (out_features, r)`, `s = lora_alpha / r`, or `lora_alpha / sqrt(r)` with
rsLoRA), over the base weight `W0[l]`. Two references (DESIGN.md "The merge methods"):

- `"base"`: `c[k,l] = cos(W0, W0 + dW[k])`, flattened weights;
- `"pairwise"`: `cos(dW[i], dW[j])` for every adapter pair i < j.

Every inner product is exact and low-rank, accumulated in float64:

    <B1 A1, B2 A2> = trace((B1^T B2)(A2 A1^T)) = sum((B1^T B2) * (A1 A2^T))    r1 x r2 work
    <W0, B A>      = sum((B^T W0) * A)                                         one pass over W0

so no `(out, in)` delta is ever built (`method="dense"` builds it, as PEFT's `get_delta_weight`
does, and is the reference the tests and `hpelib.bench` compare against).

`1 - cos` matters more than `cos`: the interesting thresholds are like 0.9999. For the base
reference it is computed without cancellation from the Lagrange identity: with `a = W0`,
`d = dW`, `b = a + d`,

    1 - cos(a, b) = (|a|^2 |b|^2 - <a,b>^2) / (|a||b| (|a||b| + <a,b>)),
    |a|^2 |b|^2 - <a,b>^2 = |a|^2 |d|^2 - <a,d>^2,

so its relative accuracy is that of the float64 inner products, even at `1 - cos = 1e-12`. For
the pairwise reference `1 - cos = 1 - <di,dj> / (|di||dj|)` is accurate to about 1e-15 absolute
(float64), ample for thresholds down to `1 - 1e-12`.

Layers are named by their module path in the base model (`model.language_model.layers.3.self_attn.q_proj`);
`split_layer_name` derives the *block* (transformer block, e.g. `language_model.layers.3`) and
the *module* type within it (e.g. `self_attn.q_proj`). `granularity="block"` aggregates a block's
modules exactly (sums of inner products and squared norms: the cosine of the concatenated
flattened weights), never by averaging cosines.

Claims (used by the heatmaps, the explorer and the `wta_cosine` merge) are defined here too, on
the similarity tables, so every view of a threshold agrees: see `claim_table`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

REFERENCES = ("base", "pairwise")
GRANULARITIES = ("module", "block")
METHODS = ("lowrank", "dense")

# The block of a layer is everything up to its FIRST numbered path component (a run of consecutive
# numbered components counts as one index), the module the rest:
#   language_model.layers.3.self_attn.q_proj -> (language_model.layers.3, self_attn.q_proj)
#   visual.blocks.1.attn.qkv                 -> (visual.blocks.1, attn.qkv)
#   vision_tower.blocks.3.0.spatial_block.ffn.fc1 (DaViT stage 3, block 0)
#                                            -> (vision_tower.blocks.3.0, spatial_block.ffn.fc1)
#   layers.3.mlp.experts.5.down_proj (MoE)   -> (layers.3, mlp.experts.5.down_proj)
# The number must be followed by more path, so `visual.merger.mlp.0` (a Sequential index at the
# end) has no numbered block: such a layer gets its parent path as block (`visual.merger.mlp`) and
# its last component as module (`0`); a top-level layer (`lm_head`) is its own block. Wrapper
# prefixes (`base_model.model.`, then one `model.`) are dropped first.
LAYER_NAME_PATTERN = re.compile(r"^(?P<block>.+?\.\d+(?:\.\d+)*)\.(?P<module>[^\d.][^.]*(?:\..+)?)$")
WRAPPER_PREFIXES = ("base_model.model.", "model.")
BLOCK_MODULE = "*"  # the `module` of block-granularity rows

_PEFT_PREFIX = "base_model.model."
_W0_CHUNK = 1 << 22  # elements of W0 cast to float64 at a time (32 MiB): bounds the extra memory


# --------------------------------------------------------------------------- naming
def split_layer_name(layer: str) -> tuple[str, str]:
    """`(block, module)` of a layer's module path; see `LAYER_NAME_PATTERN` for the rule."""
    name = layer
    for prefix in WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    match = LAYER_NAME_PATTERN.match(name)
    if match:
        return match["block"], match["module"]
    parent, _, last = name.rpartition(".")
    return (parent or last), last


def natural_key(text: str) -> list:
    """Sort key ordering numbered components numerically (`layers.2` before `layers.10`)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------- adapters in memory
@dataclass(frozen=True)
class LoraFactors:
    """One adapter's low-rank update of one linear layer: `dW = scaling * B @ A`.

    A: `(r, in_features)`; B: `(out_features, r)`; both as PEFT stores them (no copy).
    fan_in_fan_out: the base layer stores its weight as `(in, out)` (GPT-2 `Conv1D`); `dW` is then
    transposed to that layout, exactly as PEFT's `get_delta_weight` does.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def n_params(self) -> int:
        """Parameters the adapter stores for this layer (A and B)."""
        return int(self.A.numel() + self.B.numel())

    def delta(self) -> torch.Tensor:
        """Dense `dW` in the base weight's layout and dtype, computed as PEFT's `get_delta_weight`
        (float32 matmul for half-precision factors on CPU, cast back)."""
        A, B = self.A, self.B
        cast = B.device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
        if cast:
            A, B = A.float(), B.float()
        out = B @ A
        if self.fan_in_fan_out:
            out = out.T
        out = out * self.scaling
        return out.to(self.B.dtype) if cast else out


@dataclass
class LoraSet:
    """Base weights and the LoRA factors of one or more adapters over them; validated on creation.

    base_weights: layer -> `W0` as the base layer stores it (`(out, in)`, or `(in, out)` when
        `fan_in_fan_out`); references, never copies or modifies.
    factors: adapter -> layer -> `LoraFactors`; an adapter may target a subset of the layers.
    configs: adapter -> its `peft.LoraConfig` (read for saving merged adapters).
    check_base_name: require the adapters' `base_model_name_or_path` to agree (when set).

    Raises ValueError naming the adapter and layer for: a layer missing from `base_weights`
    (unknown target layer), factor shapes that do not fit `W0` (adapter trained on another base
    model), NaN or Inf in any `A`, `B` or `W0`, or adapters naming different base models.
    """

    base_weights: dict[str, torch.Tensor]
    factors: dict[str, dict[str, LoraFactors]]
    configs: dict[str, object] = field(default_factory=dict)
    check_base_name: bool = True

    def __post_init__(self) -> None:
        if not self.factors:
            raise ValueError("no adapters given: need at least one LoRA adapter")
        for adapter, layers in self.factors.items():
            if not layers:
                raise ValueError(f"adapter {adapter!r} has no LoRA layers")
            for layer, f in layers.items():
                _check_factors(adapter, layer, f, self.base_weights.get(layer))
        for layer in self.layers:
            if not torch.isfinite(self.base_weights[layer]).all():
                raise ValueError(f"base weight of layer {layer!r} contains NaN or Inf")
        if self.check_base_name:
            names = {a: getattr(c, "base_model_name_or_path", None) for a, c in self.configs.items()}
            if len({n for n in names.values() if n}) > 1:
                raise ValueError(
                    f"adapters were trained on different base models (base_model_name_or_path: {names}); "
                    "pass check_base_name=False if these name the same weights")

    @property
    def adapters(self) -> list[str]:
        return list(self.factors)

    @property
    def layers(self) -> list[str]:
        """Union of the adapters' target layers, in the base model's module order."""
        targeted = {layer for layers in self.factors.values() for layer in layers}
        return [layer for layer in self.base_weights if layer in targeted]

    def subset(self, adapters: Sequence[str]) -> "LoraSet":
        """The same base with only `adapters` (in that order)."""
        unknown = [a for a in adapters if a not in self.factors]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; loaded: {self.adapters}")
        return LoraSet(self.base_weights, {a: self.factors[a] for a in adapters},
                       {a: self.configs[a] for a in adapters if a in self.configs}, self.check_base_name)


def _check_factors(adapter: str, layer: str, f: LoraFactors, w0: torch.Tensor | None) -> None:
    where = f"adapter {adapter!r}, layer {layer!r}"
    if w0 is None:
        raise ValueError(f"{where}: the base model has no such linear layer (unknown target layer)")
    if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1]:
        raise ValueError(f"{where}: lora_A {tuple(f.A.shape)} and lora_B {tuple(f.B.shape)} are not (r, in) and (out, r)")
    out_f, in_f = (w0.shape[1], w0.shape[0]) if f.fan_in_fan_out else tuple(w0.shape)
    if (f.B.shape[0], f.A.shape[1]) != (out_f, in_f):
        raise ValueError(
            f"{where}: adapter expects a ({f.B.shape[0]} x {f.A.shape[1]}) layer but the base layer is "
            f"({out_f} x {in_f}): adapter trained on a different base model?")
    for name, t in (("lora_A", f.A), ("lora_B", f.B)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{where}: {name} contains NaN or Inf")
    if not math.isfinite(f.scaling):
        raise ValueError(f"{where}: scaling is {f.scaling}")


# --------------------------------------------------------------------------- loading
def load_lora_set(model, adapters: Mapping[str, str | os.PathLike] | Sequence | None = None, *,
                  check_base_name: bool = True) -> LoraSet:
    """Collect base weights and LoRA factors, without modifying anything.

    Args:
        model: a `peft.PeftModel` with one or more LoRA adapters loaded; or a plain base model
            (`torch.nn.Module`) with `adapters` naming adapter folders (PEFT format); or a `LoraSet`.
        adapters: for a PeftModel, the adapter names to use (default: all LoRA adapters); for a
            base model, `{name: folder}` or a list of folders (named by folder name).
        check_base_name: require the adapters' `base_model_name_or_path` to agree.

    Adapter folders are read directly (config + safetensors), so the base model is not wrapped or
    changed; scaling is computed from the config exactly as PEFT does (`alpha_pattern`,
    `rank_pattern`, `use_rslora`).
    """
    if isinstance(model, LoraSet):
        return model if adapters is None else model.subset(list(adapters))
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if adapters is not None and isinstance(adapters, Mapping):
            raise ValueError("with a PeftModel, `adapters` is a list of loaded adapter names, not folders")
        return _from_peft_model(model, None if adapters is None else list(adapters), check_base_name)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a PeftModel, a torch.nn.Module or a LoraSet, got {type(model).__name__}")
    if adapters is None:
        raise ValueError("a base model needs `adapters`: {name: adapter folder} or a list of folders")
    if not isinstance(adapters, Mapping):
        adapters = {Path(p).name: p for p in adapters}
    if any(isinstance(m, _lora_layer_type()) for m in model.modules()):
        raise ValueError("the base model already carries LoRA layers: pass the PeftModel itself, without folders")
    base_weights: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, LoraFactors]] = {}
    configs: dict[str, object] = {}
    modules = dict(model.named_modules())
    for name, folder in adapters.items():
        config, layers = read_adapter(folder, name)
        configs[name] = config
        factors[name] = layers
        for layer in layers:
            module = modules.get(layer)
            weight = getattr(module, "weight", None)
            if module is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"adapter {name!r}, layer {layer!r}: the base model has no such linear layer "
                                 "(unknown target layer)")
            base_weights[layer] = weight.detach()
    order = [n for n in modules if n in base_weights]
    return LoraSet({n: base_weights[n] for n in order}, factors, configs, check_base_name)


def read_adapter(folder: str | os.PathLike, name: str = "adapter") -> tuple[object, dict[str, LoraFactors]]:
    """`(LoraConfig, {layer: LoraFactors})` of a PEFT adapter folder, on CPU, without a model."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {name!r}: {folder}/adapter_config.json not found (not a PEFT adapter folder)")
    config = LoraConfig.from_pretrained(str(folder))
    _check_config(name, config)
    state = _read_adapter_weights(folder, name)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.match(r"^(?:base_model\.model\.)?(?P<layer>.+)\.(?P<kind>lora_[AB])\.weight$", key)
        if not m:
            raise ValueError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight (DoRA, lora_bias, "
                             "modules_to_save and embedding LoRA are not supported)")
        layers.setdefault(m["layer"], {})[m["kind"]] = tensor
    out: dict[str, LoraFactors] = {}
    for layer, ab in layers.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter {name!r}, layer {layer!r}: has {sorted(ab)} only, needs lora_A and lora_B")
        r = int(ab["lora_A"].shape[0])
        r_cfg = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), layer), config.r)
        if r_cfg != r:
            raise ValueError(f"adapter {name!r}, layer {layer!r}: weights have rank {r} but the config says {r_cfg}")
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), layer), config.lora_alpha)
        # PEFT's LoraLayer.update_layer, operation for operation
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        out[layer] = LoraFactors(ab["lora_A"], ab["lora_B"], scaling, bool(config.fan_in_fan_out))
    if not out:
        raise ValueError(f"adapter {name!r}: {folder} holds no LoRA weights")
    return config, out


def _read_adapter_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = folder / "adapter_model.bin"
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"adapter {name!r}: no adapter_model.safetensors in {folder}")


def _is_lora(config) -> bool:
    """Plain LoRA (not AdaLoRA, LoHa, ...): `PeftType.LORA` prints as `LORA` or `PeftType.LORA`."""
    return str(getattr(config, "peft_type", "")).upper().split(".")[-1] == "LORA"


def _check_config(name: str, config) -> None:
    if not _is_lora(config):
        raise ValueError(f"adapter {name!r} is a {config.peft_type} adapter, not LoRA")
    if getattr(config, "use_dora", False):
        raise ValueError(f"adapter {name!r} uses DoRA: its update is not scaling * B @ A, not supported")
    if getattr(config, "lora_bias", False):
        raise ValueError(f"adapter {name!r} trains a LoRA bias (lora_bias=True), not supported")
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"adapter {name!r} also trains whole modules (modules_to_save={config.modules_to_save}); "
                         "merging those is not defined here")
    if getattr(config, "trainable_token_indices", None):
        raise ValueError(f"adapter {name!r} trains token embeddings (trainable_token_indices), not supported")


def _lora_layer_type():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _from_peft_model(model, adapters: list[str] | None, check_base_name: bool) -> LoraSet:
    from peft.tuners.lora import Linear as LoraLinear

    lora_names = [n for n, c in model.peft_config.items() if _is_lora(c)]
    if adapters is None:
        adapters = lora_names
    unknown = [a for a in adapters if a not in lora_names]
    if unknown:
        raise ValueError(f"adapter(s) {unknown} are not LoRA adapters of this PeftModel; it has {lora_names}")
    for a in adapters:
        _check_config(a, model.peft_config[a])
    base_weights: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, LoraFactors]] = {a: {} for a in adapters}
    for name, module in model.base_model.model.named_modules():
        if not isinstance(module, _lora_layer_type()):
            continue
        present = [a for a in adapters if a in getattr(module, "lora_A", {})]
        if not present:
            continue
        if not isinstance(module, LoraLinear):
            raise ValueError(f"adapter {present[0]!r}, layer {name!r}: {type(module).__name__} LoRA layers are not "
                             "supported (only linear layers)")
        if module.merged:
            raise ValueError(f"layer {name!r} has adapters merged into its base weight ({module.merged_adapters}): "
                             "unmerge them first")
        base_weights[name] = module.get_base_layer().weight.detach()
        for a in present:
            if module.use_dora.get(a, False) or module.lora_bias.get(a, False):
                raise ValueError(f"adapter {a!r}, layer {name!r}: DoRA / lora_bias layers are not supported")
            factors[a][name] = LoraFactors(module.lora_A[a].weight.detach(), module.lora_B[a].weight.detach(),
                                           float(module.scaling[a]), bool(module.fan_in_fan_out))
    configs = {a: model.peft_config[a] for a in adapters}
    return LoraSet(base_weights, factors, configs, check_base_name)


# --------------------------------------------------------------------------- exact statistics
def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm, no temporary."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _w0_out_in(w0: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """`W0` viewed as `(out, in)`, the layout of `B @ A`."""
    return w0.T if fan_in_fan_out else w0


def base_stats_lowrank(w0: torch.Tensor, factors: Sequence[LoraFactors],
                       chunk: int = _W0_CHUNK) -> tuple[float, list[tuple[float, float]]]:
    """`(|W0|^2, [(<W0, dW_k>, |dW_k|^2), ...])` in float64, never forming a `dW`.

    w0: the base weight as stored; factors: adapters of this layer (same layout flag).
    One pass over `W0`, `chunk` elements cast to float64 at a time: `M = [B_1 .. B_K]^T W0`
    `(sum r_k, in)`, then `<W0, s B A> = s * sum(M_k * A)`; `|s B A|^2 = s^2 sum((B^T B) * (A A^T))`.
    """
    w = _w0_out_in(w0, factors[0].fan_in_fan_out if factors else False)
    out_f, in_f = w.shape
    device = w.device
    Bs = [_f64(f.B.to(device)) for f in factors]
    Bcat = torch.cat(Bs, dim=1) if Bs else torch.zeros(out_f, 0, dtype=torch.float64, device=device)
    M = torch.zeros(Bcat.shape[1], in_f, dtype=torch.float64, device=device)
    sq_w0 = torch.zeros((), dtype=torch.float64, device=device)
    rows = max(1, chunk // max(in_f, 1))
    for start in range(0, out_f, rows):
        wc = w[start:start + rows].to(torch.float64).contiguous()
        sq_w0 += _sq(wc)
        if Bcat.shape[1]:
            M.addmm_(Bcat[start:start + rows].T, wc)
    stats, offset = [], 0
    for f, B in zip(factors, Bs):
        A = _f64(f.A.to(device))
        inner = f.scaling * torch.sum(M[offset:offset + f.r] * A)
        sq_dw = f.scaling ** 2 * torch.sum((B.T @ B) * (A @ A.T))
        stats.append((float(inner), float(sq_dw)))
        offset += f.r
    return float(sq_w0), stats


def base_stats_dense(w0: torch.Tensor, factors: Sequence[LoraFactors]) -> tuple[float, list[tuple[float, float]]]:
    """As `base_stats_lowrank`, from materialised `dW = get_delta_weight` (the reference path)."""
    a = _f64(w0).reshape(-1)
    stats = []
    for f in factors:
        d = _f64(f.delta().to(w0.device)).reshape(-1)
        stats.append((float(torch.dot(a, d)), float(torch.dot(d, d))))
        del d
    return float(torch.dot(a, a)), stats


def pair_stats_lowrank(factors: Sequence[LoraFactors | None]) -> np.ndarray:
    """Gram matrix `G[i, j] = <dW_i, dW_j>` `(K, K)` in float64 from r x r products only.

    `<s_i B_i A_i, s_j B_j A_j> = s_i s_j sum((B_i^T B_j) * (A_i A_j^T))`; `None` is a zero delta.
    """
    K = len(factors)
    G = np.zeros((K, K))
    present = [(k, f) for k, f in enumerate(factors) if f is not None]
    if not present:
        return G
    device = present[0][1].B.device
    Bcat = torch.cat([_f64(f.B.to(device)) for _, f in present], dim=1)
    Acat = torch.cat([_f64(f.A.to(device)) for _, f in present], dim=0)
    BtB, AAt = Bcat.T @ Bcat, Acat @ Acat.T
    offs = np.cumsum([0] + [f.r for _, f in present])
    for p, (i, fi) in enumerate(present):
        for q, (j, fj) in enumerate(present[p:], start=p):
            si, sj = slice(offs[p], offs[p + 1]), slice(offs[q], offs[q + 1])
            G[i, j] = G[j, i] = fi.scaling * fj.scaling * float(torch.sum(BtB[si, sj] * AAt[si, sj]))
    return G


def pair_stats_dense(factors: Sequence[LoraFactors | None]) -> np.ndarray:
    """As `pair_stats_lowrank`, from materialised deltas (the reference path)."""
    K = len(factors)
    G = np.zeros((K, K))
    deltas = [None if f is None else _f64(f.delta()).reshape(-1) for f in factors]
    for i in range(K):
        for j in range(i, K):
            if deltas[i] is not None and deltas[j] is not None:
                G[i, j] = G[j, i] = float(torch.dot(deltas[i], deltas[j]))
    return G


# --------------------------------------------------------------------------- cosines from sums
def cosine_to_base(sq_w0, inner, sq_dw) -> tuple[np.ndarray, np.ndarray]:
    """`(cos, 1 - cos)` of `a = W0` and `b = W0 + dW` from `|a|^2`, `<a, d>`, `|d|^2` (arrays).

    `1 - cos` uses the Lagrange identity (module docstring), free of cancellation. Conventions for
    zero vectors: `cos(0, 0) = 1`; `cos(0, x) = 0`.
    """
    sq_a, ad, sq_d = (np.asarray(x, dtype=np.float64) for x in (sq_w0, inner, sq_dw))
    ab = sq_a + ad
    sq_b = np.maximum(sq_a + 2 * ad + sq_d, 0.0)
    nanb = np.sqrt(sq_a) * np.sqrt(sq_b)
    gram = np.maximum(sq_a * sq_d - ad * ad, 0.0)  # = |a|^2|b|^2 - <a,b>^2
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.clip(ab / nanb, -1.0, 1.0)
        omc = np.where(ab > 0, gram / (nanb * (nanb + ab)), 1.0 - ab / nanb)
    both_zero = (sq_a == 0) & (sq_b == 0)
    one_zero = (nanb == 0) & ~both_zero
    cos = np.where(both_zero, 1.0, np.where(one_zero, 0.0, cos))
    omc = np.where(both_zero, 0.0, np.where(one_zero, 1.0, np.clip(omc, 0.0, 2.0)))
    return cos, omc


def cosine_pair(sq_a, sq_b, inner) -> tuple[np.ndarray, np.ndarray]:
    """`(cos, 1 - cos)` of two deltas from `|a|^2`, `|b|^2`, `<a, b>`; same zero conventions."""
    sq_a, sq_b, ab = (np.asarray(x, dtype=np.float64) for x in (sq_a, sq_b, inner))
    nanb = np.sqrt(sq_a) * np.sqrt(sq_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.clip(ab / nanb, -1.0, 1.0)
    both_zero = (sq_a == 0) & (sq_b == 0)
    one_zero = (nanb == 0) & ~both_zero
    cos = np.where(both_zero, 1.0, np.where(one_zero, 0.0, cos))
    return cos, 1.0 - cos


# --------------------------------------------------------------------------- the tables
def layer_similarity(model, adapters=None, *, reference: str = "base", granularity: str = "module",
                     method: str = "lowrank") -> pd.DataFrame:
    """Tidy per-layer (or per-block) similarity table of LoRA adapters.

    Args:
        model, adapters: what `load_lora_set` takes (a PeftModel, a base model with adapter
            folders, or a `LoraSet`).
        reference: `"base"`, one row per unit and adapter with `cos(W0, W0 + dW)`; or
            `"pairwise"`, one row per unit and adapter pair `i < j` with `cos(dW_i, dW_j)`.
        granularity: `"module"` (one unit per linear layer) or `"block"` (per transformer block;
            the modules' inner products and squared norms are summed, i.e. the cosine of the
            concatenated weights; `module` is `"*"`).
        method: `"lowrank"` (exact factored products, default) or `"dense"` (materialises every
            `dW` as `get_delta_weight` does; the reference path for tests and benchmarks).

    Returns:
        DataFrame, rows in model order. Always: `layer` (module path, or the block at block
        granularity), `block`, `module`, `adapter`, `cosine`, `one_minus_cos`, `n_dense_unit`
        (weights in the unit's target layers), `n_modules`, `reference`, `granularity`.
        Base reference adds `norm_w0`, `norm_dw`, `inner_w0_dw`, `rank`, `scaling`, `n_params`
        (A and B sizes: what the adapter would contribute if it won), `n_dense` (weights of the
        unit's layers the adapter changes). Pairwise adds `adapter_a`, `adapter_b` (`adapter` is
        `"a|b"`), `norm_dw_a`, `norm_dw_b`, `inner_dw`, `n_params_a`, `n_params_b`, `n_dense_a`,
        `n_dense_b`. An adapter that does not target a layer has `dW = 0` there (rank 0).
        At block granularity `rank` is the largest rank among the block's modules, `scaling` NaN.
    """
    _check_choice("reference", reference, REFERENCES)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_choice("method", method, METHODS)
    lora = load_lora_set(model, adapters)
    if reference == "pairwise" and len(lora.adapters) < 2:
        raise ValueError(f"reference='pairwise' needs at least two adapters, got {lora.adapters}")
    rows = _module_rows_base(lora, method) if reference == "base" else _module_rows_pairwise(lora, method)
    df = pd.DataFrame(rows)
    if granularity == "block":
        df = _aggregate_blocks(df, reference)
    return _finish(df, reference, granularity)


def similarity_tables(model, adapters=None, *, references: Sequence[str] = REFERENCES,
                      granularities: Sequence[str] = GRANULARITIES) -> dict[tuple[str, str], pd.DataFrame]:
    """`{(reference, granularity): layer_similarity(...)}` for every combination (pairwise only
    with two or more adapters): the input of `hpelib.widgets.similarity_explorer`."""
    lora = load_lora_set(model, adapters)
    return {(ref, gran): layer_similarity(lora, reference=ref, granularity=gran)
            for ref in references for gran in granularities
            if ref == "base" or len(lora.adapters) > 1}


def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _layer_meta(lora: LoraSet, layer: str) -> dict:
    block, module = split_layer_name(layer)
    return {"layer": layer, "block": block, "module": module,
            "n_dense_unit": int(lora.base_weights[layer].numel()), "n_modules": 1}


def _module_rows_base(lora: LoraSet, method: str) -> list[dict]:
    stats_fn = base_stats_lowrank if method == "lowrank" else base_stats_dense
    rows = []
    for layer in lora.layers:
        w0 = lora.base_weights[layer]
        present = [a for a in lora.adapters if layer in lora.factors[a]]
        sq_w0, stats = stats_fn(w0, [lora.factors[a][layer] for a in present])
        by_adapter = dict(zip(present, stats))
        meta = _layer_meta(lora, layer)
        for a in lora.adapters:
            f = lora.factors[a].get(layer)
            inner, sq_dw = by_adapter.get(a, (0.0, 0.0))
            rows.append({**meta, "adapter": a, "sq_w0": sq_w0, "inner_w0_dw": inner, "sq_dw": sq_dw,
                         "rank": f.r if f else 0, "scaling": f.scaling if f else float("nan"),
                         "n_params": f.n_params if f else 0, "n_dense": meta["n_dense_unit"] if f else 0})
    return rows


def _module_rows_pairwise(lora: LoraSet, method: str) -> list[dict]:
    stats_fn = pair_stats_lowrank if method == "lowrank" else pair_stats_dense
    names = lora.adapters
    rows = []
    for layer in lora.layers:
        facs = [lora.factors[a].get(layer) for a in names]
        G = stats_fn(facs)
        meta = _layer_meta(lora, layer)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                fi, fj = facs[i], facs[j]
                rows.append({**meta, "adapter": f"{names[i]}|{names[j]}", "adapter_a": names[i], "adapter_b": names[j],
                             "sq_a": G[i, i], "sq_b": G[j, j], "inner_dw": G[i, j],
                             "n_params_a": fi.n_params if fi else 0, "n_params_b": fj.n_params if fj else 0,
                             "n_dense_a": meta["n_dense_unit"] if fi else 0,
                             "n_dense_b": meta["n_dense_unit"] if fj else 0})
    return rows


def _aggregate_blocks(df: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Exact block rows: sums of squared norms and inner products over the block's modules."""
    keys = ["block", "adapter"] + (["adapter_a", "adapter_b"] if reference == "pairwise" else [])
    sums = ["n_dense_unit", "n_modules"] + (
        ["sq_w0", "inner_w0_dw", "sq_dw", "n_params", "n_dense"] if reference == "base"
        else ["sq_a", "sq_b", "inner_dw", "n_params_a", "n_params_b", "n_dense_a", "n_dense_b"])
    agg = {c: "sum" for c in sums}
    if reference == "base":
        agg["rank"] = "max"
    out = df.groupby(keys, sort=False, as_index=False).agg(agg)
    out.insert(0, "layer", out["block"])
    out.insert(2, "module", BLOCK_MODULE)
    if reference == "base":
        out["scaling"] = float("nan")
    return out


def _finish(df: pd.DataFrame, reference: str, granularity: str) -> pd.DataFrame:
    if reference == "base":
        df["cosine"], df["one_minus_cos"] = cosine_to_base(df["sq_w0"], df["inner_w0_dw"], df["sq_dw"])
        df["norm_w0"], df["norm_dw"] = np.sqrt(df["sq_w0"]), np.sqrt(df["sq_dw"])
        cols = ["layer", "block", "module", "adapter", "cosine", "one_minus_cos", "norm_w0", "norm_dw",
                "inner_w0_dw", "rank", "scaling", "n_params", "n_dense"]
    else:
        df["cosine"], df["one_minus_cos"] = cosine_pair(df["sq_a"], df["sq_b"], df["inner_dw"])
        df["norm_dw_a"], df["norm_dw_b"] = np.sqrt(df["sq_a"]), np.sqrt(df["sq_b"])
        cols = ["layer", "block", "module", "adapter", "adapter_a", "adapter_b", "cosine", "one_minus_cos",
                "norm_dw_a", "norm_dw_b", "inner_dw", "n_params_a", "n_params_b", "n_dense_a", "n_dense_b"]
    df["reference"], df["granularity"] = reference, granularity
    cols += ["n_dense_unit", "n_modules", "reference", "granularity"]
    return df[cols].reset_index(drop=True)


# --------------------------------------------------------------------------- claims
def table_kind(sim: pd.DataFrame) -> tuple[str, str]:
    """`(reference, granularity)` of a `layer_similarity` table."""
    missing = {"reference", "granularity", "layer", "adapter", "one_minus_cos"} - set(sim.columns)
    if missing:
        raise ValueError(f"not a layer_similarity table: missing columns {sorted(missing)}")
    refs, grans = sim["reference"].unique(), sim["granularity"].unique()
    if len(refs) != 1 or len(grans) != 1:
        raise ValueError(f"a similarity table must hold one reference and granularity, got {list(refs)}, {list(grans)}")
    return str(refs[0]), str(grans[0])


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
            or not (0 < float(threshold) <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return float(threshold)


def claim_table(sim: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Which adapters claim each unit (layer or block) at `threshold`, and who wins.

    This is the project's definition (DESIGN.md `wta_cosine`; the paper's exact rule is not
    public). `c < threshold` is evaluated as `1 - c > 1 - threshold`, on the accurate column.

    - Base reference: adapter k claims unit l when `cos(W0, W0 + dW[k,l]) < threshold` (it moved
      the unit more than the threshold tolerates); the winner is the claimant with the lowest
      cosine (ties: the first adapter in load order).
    - Pairwise reference: an adapter claims a unit when it disagrees with at least one other
      adapter there, `min_j cos(dW[k,l], dW[j,l]) < threshold` (so with two adapters both claim
      a contested unit together). The winner is the claimant with the largest `|dW[k,l]|`
      (Frobenius; the adapter that changed the unit most; ties: first in load order). A unit where
      all adapters agree (every pairwise cosine >= threshold) is unclaimed and keeps `W0`, like an
      unclaimed unit of the base reference. An adapter that does not touch a unit (`dW = 0`) has
      cosine 0 with any adapter that does, so such a unit is contested and the other adapter wins.

    Returns:
        DataFrame, one row per unit in table order: `layer`, `block`, `module`, `claimants` (tuple
        of adapter names), `claimed` (bool), `winner` (adapter name, None when unclaimed),
        `winner_cosine` (base: the winner's cosine; pairwise: its lowest pairwise cosine),
        `winner_one_minus_cos`, `n_params` (the winner's A and B sizes), `n_dense` (weights of the
        unit the winner changes), `n_dense_unit`.
    """
    threshold = check_threshold(threshold)
    reference, _ = table_kind(sim)
    tol = 1.0 - threshold
    records = []
    for layer, g in sim.groupby("layer", sort=False):
        first = g.iloc[0]
        rec = {"layer": layer, "block": first["block"], "module": first["module"],
               "n_dense_unit": int(first["n_dense_unit"])}
        if reference == "base":
            claim = g[g["one_minus_cos"] > tol]
            best = claim.loc[claim["one_minus_cos"].idxmax()] if len(claim) else None
            rec.update(claimants=tuple(claim["adapter"]), winner=None if best is None else best["adapter"],
                       winner_cosine=np.nan if best is None else best["cosine"],
                       winner_one_minus_cos=np.nan if best is None else best["one_minus_cos"],
                       n_params=0 if best is None else int(best["n_params"]),
                       n_dense=0 if best is None else int(best["n_dense"]))
        else:
            per = _pairwise_per_adapter(g)
            claim = per[per["one_minus_cos"] > tol]
            best = claim.loc[claim["norm_dw"].idxmax()] if len(claim) else None
            rec.update(claimants=tuple(claim.index), winner=None if best is None else best.name,
                       winner_cosine=np.nan if best is None else 1.0 - best["one_minus_cos"],
                       winner_one_minus_cos=np.nan if best is None else best["one_minus_cos"],
                       n_params=0 if best is None else int(best["n_params"]),
                       n_dense=0 if best is None else int(best["n_dense"]))
        rec["claimed"] = rec["winner"] is not None
        records.append(rec)
    cols = ["layer", "block", "module", "claimants", "claimed", "winner", "winner_cosine",
            "winner_one_minus_cos", "n_params", "n_dense", "n_dense_unit"]
    out = pd.DataFrame(records, columns=cols)
    out["winner"] = pd.Series([r["winner"] for r in records], dtype=object)  # None, not NaN, when unclaimed
    return out


def _pairwise_per_adapter(g: pd.DataFrame) -> pd.DataFrame:
    """Per adapter of one unit's pairwise rows: largest `1 - cos` with any other adapter, `|dW|`,
    A/B sizes and changed weights; index = adapter, in first-seen order."""
    side = lambda s: g[[f"adapter_{s}", "one_minus_cos", f"norm_dw_{s}", f"n_params_{s}", f"n_dense_{s}"]].set_axis(
        ["adapter", "one_minus_cos", "norm_dw", "n_params", "n_dense"], axis=1)
    both = pd.concat([side("a"), side("b")], ignore_index=True)
    order = list(dict.fromkeys(both["adapter"]))
    per = both.groupby("adapter").agg(one_minus_cos=("one_minus_cos", "max"), norm_dw=("norm_dw", "first"),
                                      n_params=("n_params", "first"), n_dense=("n_dense", "first"))
    return per.loc[order]


def adapter_names(sim: pd.DataFrame) -> list[str]:
    """Adapters of a similarity table, in load order."""
    if "adapter_a" in sim.columns:
        return list(dict.fromkeys(list(sim["adapter_a"]) + list(sim["adapter_b"])))
    return list(dict.fromkeys(sim["adapter"]))


def claim_summary(claims: pd.DataFrame, adapters: Sequence[str], base_label: str = "(base)") -> pd.DataFrame:
    """Per adapter (and `base_label` for what keeps `W0`): units won, LoRA parameters contributed,
    weights changed and their share of all target-layer weights.

    Columns: `adapter`, `n_units`, `n_params`, `n_dense`, `share` (`n_dense / total`; shares sum to 1).
    """
    total = int(claims["n_dense_unit"].sum())
    rows = []
    for a in adapters:
        won = claims[claims["winner"] == a]
        rows.append({"adapter": a, "n_units": len(won), "n_params": int(won["n_params"].sum()),
                     "n_dense": int(won["n_dense"].sum())})
    kept = total - sum(r["n_dense"] for r in rows)
    rows.append({"adapter": base_label, "n_units": int((~claims["claimed"]).sum()), "n_params": 0, "n_dense": kept})
    out = pd.DataFrame(rows)
    out["share"] = out["n_dense"] / total if total else 0.0
    return out


def threshold_sweep(sim: pd.DataFrame, thresholds: Iterable[float]) -> pd.DataFrame:
    """Units claimed and parameter share per adapter along a grid of thresholds (cheap, no model).

    Returns:
        DataFrame, one row per threshold and adapter (plus `"(base)"`, what keeps `W0`):
        `threshold`, `one_minus_threshold`, `adapter`, `n_units`, `n_params`, `n_dense`, `share`,
        `reference`, `granularity`.
    """
    reference, granularity = table_kind(sim)
    adapters = adapter_names(sim)
    parts = []
    for t in thresholds:
        t = check_threshold(t)
        s = claim_summary(claim_table(sim, t), adapters)
        s.insert(0, "threshold", t)
        s.insert(1, "one_minus_threshold", 1.0 - t)
        parts.append(s)
    if not parts:
        raise ValueError("thresholds is empty")
    out = pd.concat(parts, ignore_index=True)
    out["reference"], out["granularity"] = reference, granularity
    return out


def sorted_blocks(blocks: Iterable[str]) -> list[str]:
    return sorted(set(blocks), key=natural_key)


# --------------------------------------------------------------------------- run folder helpers (03)
def log_thresholds(lo: float = 1e-8, hi: float = 1e-1, per_decade: int = 4) -> list[float]:
    """Thresholds `1 - g` for `g` log-spaced from `lo` to `hi` (`per_decade` points a decade),
    ascending: the grid of `threshold_sweep`."""
    if not (0 < lo < hi < 1) or per_decade < 1:
        raise ValueError(f"need 0 < lo < hi < 1 and per_decade >= 1, got lo={lo}, hi={hi}, per_decade={per_decade}")
    n = int(round(math.log10(hi / lo) * per_decade)) + 1
    gaps = np.logspace(math.log10(hi), math.log10(lo), n)
    return [float(1.0 - g) for g in gaps]


def save_tables(tables: Mapping[tuple[str, str], pd.DataFrame], folder: str | os.PathLike) -> dict[tuple[str, str], Path]:
    """Write each table as `<folder>/similarity_<reference>_<granularity>.csv` (atomically)."""
    from hpelib import io

    folder = Path(folder)
    out = {}
    for (ref, gran), table in tables.items():
        path = folder / f"similarity_{ref}_{gran}.csv"
        with io.atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        out[ref, gran] = path
    return out


def load_tables(folder: str | os.PathLike) -> dict[tuple[str, str], pd.DataFrame]:
    """Read what `save_tables` wrote."""
    out = {}
    for path in sorted(Path(folder).glob("similarity_*_*.csv")):
        ref, gran = path.stem[len("similarity_"):].rsplit("_", 1)
        out[ref, gran] = pd.read_csv(path)
    if not out:
        raise FileNotFoundError(f"no similarity_<reference>_<granularity>.csv tables in {folder}")
    return out


def similarity_metrics(tables: Mapping[tuple[str, str], pd.DataFrame], thresholds: Iterable[float]) -> dict[str, float]:
    """Flat metrics of `03_layer_similarity` for `metrics.json`:

    `similarity:<reference>:<granularity>:{min,median,max}_one_minus_cos` per table, and per
    threshold `claims:<reference>:<granularity>@<threshold>:{units,share}_<adapter>` (what
    `wta_cosine` would take from each adapter; `(base)` is what keeps W0).
    """
    thresholds = [check_threshold(t) for t in thresholds]
    metrics: dict[str, float] = {}
    for (ref, gran), sim in tables.items():
        omc = sim["one_minus_cos"]
        for stat in ("min", "median", "max"):
            metrics[f"similarity:{ref}:{gran}:{stat}_one_minus_cos"] = float(getattr(omc, stat)())
        for t in thresholds:
            for row in claim_summary(claim_table(sim, t), adapter_names(sim)).itertuples():
                key = f"claims:{ref}:{gran}@{t:.12g}"
                metrics[f"{key}:units_{row.adapter}"] = int(row.n_units)
                metrics[f"{key}:share_{row.adapter}"] = float(row.share)
    return metrics

