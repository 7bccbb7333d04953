"""Merging LoRA adapters (`04_merge`): task arithmetic, TIES, DARE and the cosine-threshold
winner-takes-all merge of HPE-CogVLM, as small primitives plus a registry (STYLE.md 6).

Every method works on the dense update `dW[k,l] = s * B @ A` of adapter k at layer l, never on A
and B separately (averaging A and B is not averaging `dW`). Two kinds of result:

- *dense* (`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`): new full weights
  `W0 + merged dW` for every target layer, in the base weight's dtype and layout. `save_merge`
  writes exactly these tensors (`merged_weights.safetensors`, keys `<layer>.weight` as in the base
  model's state dict) so `load_merged_model` reproduces the in-memory merge bit for bit by copying,
  plus `merge_manifest.json` with a fingerprint (shape, dtype, float64 norm) of every base weight the
  merge was built on, checked when loading.
- *lora* (`wta_cosine`): a real PEFT adapter holding only the winning layers' A and B, copied bit
  for bit, with per-layer `rank_pattern` / `alpha_pattern` so PEFT recomputes every layer's
  scaling exactly; `save_merge` writes `adapter_config.json` + `adapter_model.safetensors`
  (PEFT's own format: plain `PeftModel.from_pretrained(base, path)` loads it) plus the manifest.

No method needs equal ranks (all work on `dW`), so unequal ranks are never an error here.

For `04_merge`: `build_merges(model, adapters, config.merge)` builds every merge of the run's
`MergeConfig` (named `<method>@<swept parameter>`, e.g. `wta_cosine@0.9999`, the variant names
`hpelib.evaluate` reads), `save_merges` writes them under `merges/` with a summary table,
`winner_summary` shows who won where, `merge_metrics` flattens the summary for `metrics.json`.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
import shutil
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from peft.utils import merge_utils

from hpelib import __version__, io
from hpelib.similarity import (
    GRANULARITIES, REFERENCES, LoraSet, check_threshold, claim_summary, claim_table, cosine_to_base,
    layer_similarity, load_lora_set, split_layer_name,
)

MANIFEST = "merge_manifest.json"
MERGED_WEIGHTS = "merged_weights.safetensors"
FORMAT_VERSION = 1
SIGN_METHODS = ("total", "frequency")


@dataclass
class MergeResult:
    """A merge, in memory. Pure data: `save_merge` writes it, `merged_model` applies it.

    method, params: the registry name and the exact keyword parameters used.
    adapters: the merged adapters, in order.
    report: one row per target layer (`layer`, `block`, `module`, ...; for `wta_cosine` the unit,
        claimants, `winner`, its cosine, rank and scaling).
    summary: per adapter (and `"(base)"`): `n_units`, `n_params`, `n_dense`, `share`.
    weights: dense merges: layer -> merged full weight `W0 + dW` (base dtype and layout).
    adapter_state: lora merges: PEFT adapter state dict (`base_model.model.<layer>.lora_A.weight`, ...).
    lora_config: lora merges: the `peft.LoraConfig` of `adapter_state`.
    similarity, claims: `wta_cosine` only: the similarity table and per-unit claims it decided from.
    fingerprint: layer -> `{"shape", "dtype", "norm"}` of the base weights the merge was built on.
    """

    method: str
    params: dict
    adapters: list[str]
    report: pd.DataFrame
    summary: pd.DataFrame
    fingerprint: dict
    base_model_name_or_path: str | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    adapter_state: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_config: object | None = None
    similarity: pd.DataFrame | None = None
    claims: pd.DataFrame | None = None

    @property
    def kind(self) -> str:
        """`"lora"` (a PEFT adapter) or `"dense"` (full merged weights)."""
        return "lora" if self.lora_config is not None else "dense"


# --------------------------------------------------------------------------- primitives
def lora_delta(lora: LoraSet, adapter: str, layer: str) -> torch.Tensor:
    """`dW = s * B @ A` of one adapter and layer, float32, the base weight's layout and device
    (PEFT's `get_delta_weight`)."""
    w0 = lora.base_weights[layer]
    return lora.factors[adapter][layer].delta().to(device=w0.device, dtype=torch.float32)


def sparsify_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries largest in magnitude, zero the rest (TIES "trim")."""
    return delta if density >= 1 else merge_utils.prune(delta, density, method="magnitude")


def sparsify_random(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale by `1 / density` (DARE "drop and
    rescale"), reproducibly from `seed`, without touching the global random state."""
    if density >= 1:
        return delta
    on_cpu = delta.device.type == "cpu"
    with torch.random.fork_rng(devices=[] if on_cpu else [delta.device], device_type=delta.device.type):
        torch.manual_seed(seed)
        return merge_utils.prune(delta, density, method="random", rescale=True)


def elect_sign(deltas: torch.Tensor, method: str = "total") -> torch.Tensor:
    """`(K, *shape)` bool mask: entries whose sign agrees with the elected sign of their position
    (TIES "elect"; `"total"`: sign of the sum, `"frequency"`: the most frequent sign)."""
    return merge_utils.calculate_majority_sign_mask(deltas, method=method)


def disjoint_mean(deltas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over k of the entries kept by `mask`, per position (TIES "disjoint merge")."""
    return merge_utils.disjoint_merge(deltas, mask)


def weighted_sum(deltas: torch.Tensor, lam: float) -> torch.Tensor:
    """`lam * sum_k dW_k` (task arithmetic's combination), `(K, *shape)` -> `shape`."""
    return lam * deltas.sum(dim=0)


def layer_seed(seed: int, adapter: str, layer: str) -> int:
    """Seed of DARE's mask for one adapter and layer: stable, independent of iteration order."""
    return zlib.crc32(f"{seed}/{adapter}/{layer}".encode())


# --------------------------------------------------------------------------- dense methods
def task_arithmetic(lora: LoraSet, *, lam: float) -> MergeResult:
    """Task arithmetic: `W = W0 + lam * sum_k dW_k` (Ilharco et al. 2023, "Editing models with
    task arithmetic", arXiv:2212.04089).

    lam: the scaling coefficient lambda of the summed task vectors.
    """
    lam = _check_finite("lam", lam)
    return _dense_merge(lora, "task_arithmetic", {"lam": lam},
                        lambda layer, names, deltas: weighted_sum(deltas, lam))


def ties(lora: LoraSet, *, density: float, lam: float = 1.0, majority_sign_method: str = "total") -> MergeResult:
    """TIES-merging: trim each `dW_k` to its `density` largest-magnitude entries, elect a sign per
    entry, average the entries agreeing with it, scale by `lam` (Yadav et al. 2023, "TIES-Merging:
    Resolving interference when merging models", arXiv:2306.01708).
    """
    density, lam = _check_density(density), _check_finite("lam", lam)
    _check_sign_method(majority_sign_method)

    def combine(layer, names, deltas):
        trimmed = torch.stack([sparsify_magnitude(d, density) for d in deltas])  # trim
        mask = elect_sign(trimmed, majority_sign_method)  # elect
        return lam * disjoint_mean(trimmed, mask)  # disjoint merge

    return _dense_merge(lora, "ties", {"density": density, "lam": lam,
                                       "majority_sign_method": majority_sign_method}, combine)


def dare_linear(lora: LoraSet, *, density: float, seed: int, lam: float = 1.0) -> MergeResult:
    """DARE then task arithmetic: drop each entry of `dW_k` with probability `1 - density`, rescale
    the rest by `1 / density`, sum, scale by `lam` (Yu et al. 2024, "Language models are Super
    Mario: absorbing abilities from homologous models as a free lunch", arXiv:2311.03099).
    """
    density, lam, seed = _check_density(density), _check_finite("lam", lam), _check_seed(seed)

    def combine(layer, names, deltas):
        dropped = torch.stack([sparsify_random(d, density, layer_seed(seed, n, layer))
                               for n, d in zip(names, deltas)])  # drop and rescale
        return weighted_sum(dropped, lam)

    return _dense_merge(lora, "dare_linear", {"density": density, "seed": seed, "lam": lam}, combine)


def dare_ties(lora: LoraSet, *, density: float, seed: int, lam: float = 1.0,
              majority_sign_method: str = "total") -> MergeResult:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean, scaled by `lam`
    (Yu et al. 2024, arXiv:2311.03099, combined with Yadav et al. 2023, arXiv:2306.01708).
    """
    density, lam, seed = _check_density(density), _check_finite("lam", lam), _check_seed(seed)
    _check_sign_method(majority_sign_method)

    def combine(layer, names, deltas):
        dropped = torch.stack([sparsify_random(d, density, layer_seed(seed, n, layer))
                               for n, d in zip(names, deltas)])  # drop and rescale
        mask = elect_sign(dropped, majority_sign_method)  # elect
        return lam * disjoint_mean(dropped, mask)  # disjoint merge

    return _dense_merge(lora, "dare_ties", {"density": density, "seed": seed, "lam": lam,
                                            "majority_sign_method": majority_sign_method}, combine)


Combine = Callable[[str, list[str], torch.Tensor], torch.Tensor]


def _dense_merge(lora: LoraSet, method: str, params: dict, combine: Combine) -> MergeResult:
    """Apply `combine(layer, adapter_names, deltas (K, *W0.shape) float32) -> merged dW` to every
    target layer (only the adapters that target it take part); build weights and report."""
    weights: dict[str, torch.Tensor] = {}
    rows = []
    with torch.no_grad():
        for layer in lora.layers:
            w0 = lora.base_weights[layer]
            names = [a for a in lora.adapters if layer in lora.factors[a]]
            deltas = torch.stack([lora_delta(lora, a, layer) for a in names])
            merged = combine(layer, names, deltas)
            del deltas
            w = (w0.float() + merged).to(w0.dtype)
            if not torch.isfinite(w).all():
                raise ValueError(f"{method}: merged weight of layer {layer!r} is not finite")
            weights[layer] = w
            applied = w.double() - w0.double()  # what the merged model really changes
            a = w0.double()
            rows.append({"layer": layer, **dict(zip(("block", "module"), split_layer_name(layer))),
                         "adapters": ",".join(names), "n_adapters": len(names),
                         "sq_w0": float(torch.sum(a * a)), "inner": float(torch.sum(a * applied)),
                         "sq_dw": float(torch.sum(applied * applied)),
                         "nonzero_fraction": float((merged != 0).float().mean()),
                         "n_dense": int(w0.numel())})
            del applied, a, merged
    report = pd.DataFrame(rows)
    report["cosine"], report["one_minus_cos"] = cosine_to_base(report["sq_w0"], report["inner"], report["sq_dw"])
    report["norm_w0"], report["norm_dw"] = np.sqrt(report["sq_w0"]), np.sqrt(report["sq_dw"])
    report["rel_change"] = report["norm_dw"] / report["norm_w0"].where(report["norm_w0"] > 0)
    report = report[["layer", "block", "module", "adapters", "n_adapters", "cosine", "one_minus_cos", "norm_w0",
                     "norm_dw", "rel_change", "nonzero_fraction", "n_dense"]]
    return MergeResult(method, params, lora.adapters, report, _dense_summary(lora), _fingerprint(lora),
                       _base_name(lora), weights=weights)


def _dense_summary(lora: LoraSet) -> pd.DataFrame:
    """Per adapter: layers it takes part in, its A/B sizes, the weights it changes and their share."""
    total = sum(int(lora.base_weights[layer].numel()) for layer in lora.layers)
    rows = [{"adapter": a, "n_units": len(f), "n_params": sum(x.n_params for x in f.values()),
             "n_dense": sum(int(lora.base_weights[layer].numel()) for layer in f)} for a, f in lora.factors.items()]
    out = pd.DataFrame(rows)
    out["share"] = out["n_dense"] / total
    return out


# --------------------------------------------------------------------------- winner takes all
def wta_cosine(lora: LoraSet, *, threshold: float, reference: str, granularity: str) -> MergeResult:
    """Cosine-threshold winner-takes-all merge (HPE-CogVLM, Tian et al. 2024, "HPE-CogVLM:
    Advancing vision language models with a head pose grounding task", arXiv:2406.01914), as this
    project defines it (DESIGN.md; the paper's exact settings are not public):

    1. similarities per unit: `reference="base"`, `c[k,l] = cos(W0, W0 + dW[k,l])`;
       `reference="pairwise"`, `cos(dW[i,l], dW[j,l])` (see `hpelib.similarity.claim_table` for the
       project's pairwise rule); `granularity="module"` (a unit is a linear layer) or `"block"`
       (a transformer block, exact aggregate);
    2. claim: adapter k claims unit l when `c[k,l] < threshold`;
    3. winner takes all: a claimed unit gets the whole, unscaled `dW` of its winner (base: the
       claimant with the lowest similarity); at block granularity the winner's A and B for every
       module of the block it targets (modules it does not target keep `W0`); unclaimed units keep
       `W0`. No blending.

    Ranks and alphas may differ between adapters and layers. The result is an exact LoRA adapter:
    the winners' A and B copied bit for bit; the config's per-layer `rank_pattern` and
    `alpha_pattern` make PEFT's scaling equal the winner's scaling bit for bit (always when the
    winners share their rsLoRA flag; otherwise a rare scaling that no `alpha / r` reproduces is
    1 ulp off, with a warning). If nothing is claimed
    the adapter is a zero update of one layer (rank 1, A = B = 0), so it still loads with PEFT.
    """
    threshold = check_threshold(threshold)
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {list(REFERENCES)}, got {reference!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    sim = layer_similarity(lora, reference=reference, granularity=granularity)  # similarity
    claims = claim_table(sim, threshold)  # claim
    winners = _winning_layers(lora, claims, granularity)  # winner takes all
    state, config = _winner_adapter(lora, winners)
    report = _wta_report(lora, claims, winners, granularity)
    summary = claim_summary(claims, lora.adapters)
    params = {"threshold": threshold, "reference": reference, "granularity": granularity}
    return MergeResult("wta_cosine", params, lora.adapters, report, summary, _fingerprint(lora), _base_name(lora),
                       adapter_state=state, lora_config=config, similarity=sim, claims=claims)


def _winning_layers(lora: LoraSet, claims: pd.DataFrame, granularity: str) -> dict[str, str]:
    """layer -> winning adapter, in model order; only layers the winner targets."""
    unit_winner = {row.layer: row.winner for row in claims.itertuples() if row.claimed}
    winners = {}
    for layer in lora.layers:
        unit = layer if granularity == "module" else split_layer_name(layer)[0]
        w = unit_winner.get(unit)
        if w is not None and layer in lora.factors[w]:
            winners[layer] = w
    return winners


def _peft_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's `LoraLayer.update_layer` scaling, operation for operation."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_for_scaling(scaling: float, r: int, use_rslora: bool, hint: float | None = None) -> tuple[float, bool]:
    """`(lora_alpha, exact)`: an alpha for which PEFT computes `scaling` at rank `r`, bit for bit
    when `exact`.

    Tries `hint` (the adapter's own alpha), then `scaling * r` (or `* sqrt(r)`) and its float
    neighbours. `alpha / r` skips some floats (its step can exceed the spacing of the result), so
    a few scalings have no exact alpha: then the closest (1 ulp, ~1e-16 relative) is returned.
    """
    if hint is not None and _peft_scaling(hint, r, use_rslora) == scaling:
        return hint, True
    start = scaling * (math.sqrt(r) if use_rslora else r)
    best, best_err = start, abs(_peft_scaling(start, r, use_rslora) - scaling)
    up = down = start
    for _ in range(16):
        for cand in (up, down):
            err = abs(_peft_scaling(cand, r, use_rslora) - scaling)
            if err == 0:
                return float(cand), True
            if err < best_err:
                best, best_err = cand, err
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
    return float(best), False


def _winner_adapter(lora: LoraSet, winners: dict[str, str]):
    """`(state_dict, LoraConfig)` of a PEFT adapter made of the winners' layers."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    configs = {a: lora.configs.get(a) for a in set(winners.values())}
    use_rslora = _best_rslora_flag(lora, winners, configs)
    state: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern, targets, inexact = {}, {}, [], []
    layers = dict(winners)
    if not layers:  # nothing claimed: a zero update of one layer keeps the adapter loadable
        warnings.warn("wta_cosine: no unit is claimed at this threshold; the adapter is a zero update")
        first_adapter = lora.adapters[0]
        layer = next(iter(lora.factors[first_adapter]))
        f = lora.factors[first_adapter][layer]
        state[f"base_model.model.{layer}.lora_A.weight"] = torch.zeros(1, f.A.shape[1], dtype=f.A.dtype)
        state[f"base_model.model.{layer}.lora_B.weight"] = torch.zeros(f.B.shape[0], 1, dtype=f.B.dtype)
        rank_pattern[re.escape(layer)], alpha_pattern[re.escape(layer)] = 1, 1.0
        targets.append(layer)
        fan = f.fan_in_fan_out
    else:
        for layer, a in layers.items():
            f = lora.factors[a][layer]
            cfg = configs[a]
            alpha, exact = alpha_for_scaling(f.scaling, f.r, use_rslora, _alpha_hint(cfg, layer, use_rslora))
            if not exact:
                inexact.append(layer)
            state[f"base_model.model.{layer}.lora_A.weight"] = f.A.detach().clone()  # bit for bit
            state[f"base_model.model.{layer}.lora_B.weight"] = f.B.detach().clone()
            rank_pattern[re.escape(layer)] = f.r
            alpha_pattern[re.escape(layer)] = alpha
            targets.append(layer)
        fans = {lora.factors[a][layer].fan_in_fan_out for layer, a in layers.items()}
        if len(fans) > 1:
            raise ValueError("winning layers mix fan_in_fan_out True and False: cannot be one PEFT adapter")
        fan = fans.pop()
    r_default = Counter(rank_pattern.values()).most_common(1)[0][0]
    alpha_default = Counter(alpha_pattern.values()).most_common(1)[0][0]
    all_configs = [c for c in lora.configs.values() if c is not None]
    task_types = {getattr(c, "task_type", None) for c in all_configs}
    config = LoraConfig(
        r=r_default, lora_alpha=alpha_default, target_modules=targets,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=use_rslora, fan_in_fan_out=fan,
        lora_dropout=0.0, bias="none", base_model_name_or_path=_base_name(lora),
        task_type=task_types.pop() if len(task_types) == 1 else None, inference_mode=True)
    # the saved config must make PEFT recompute every winner's scaling (exactly, but for `inexact`)
    for layer, a in layers.items():
        key = get_pattern_key(config.alpha_pattern.keys(), layer)
        got = _peft_scaling(config.alpha_pattern[key], config.rank_pattern[key], config.use_rslora)
        want = lora.factors[a][layer].scaling
        if got != want and (layer not in inexact or not math.isclose(got, want, rel_tol=4e-16)):
            raise AssertionError(f"layer {layer!r}: scaling {got} != winner {a!r}'s {want}")
    if inexact:
        warnings.warn(f"wta_cosine: no lora_alpha reproduces the scaling of {len(inexact)} layer(s) bit for bit "
                      f"(e.g. {inexact[0]!r}); they are 1 ulp (~1e-16 relative) off")
    return state, config


def _alpha_hint(cfg, layer: str, use_rslora: bool) -> float | None:
    """The adapter's own alpha for `layer`, if its config uses the same rsLoRA flag."""
    from peft.utils.other import get_pattern_key

    if cfg is None or bool(getattr(cfg, "use_rslora", False)) != use_rslora:
        return None
    return cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), layer), cfg.lora_alpha)


def _best_rslora_flag(lora: LoraSet, winners: dict[str, str], configs: dict) -> bool:
    """The config-wide `use_rslora` under which most winning layers get their scaling exactly
    (all of them when every winner uses the same flag: its own alpha then reproduces it)."""
    def n_exact(flag: bool) -> int:
        return sum(alpha_for_scaling(lora.factors[a][layer].scaling, lora.factors[a][layer].r, flag,
                                     _alpha_hint(configs[a], layer, flag))[1] for layer, a in winners.items())

    flags = {bool(getattr(c, "use_rslora", False)) for c in configs.values() if c is not None}
    if len(flags) == 1 and n_exact(flags == {True}) == len(winners):
        return flags == {True}
    return n_exact(True) > n_exact(False)


def _wta_report(lora: LoraSet, claims: pd.DataFrame, winners: dict[str, str], granularity: str) -> pd.DataFrame:
    unit_rows = claims.set_index("layer")
    rows = []
    for layer in lora.layers:
        block, module = split_layer_name(layer)
        unit = layer if granularity == "module" else block
        c = unit_rows.loc[unit]
        w = winners.get(layer)
        f = lora.factors[w][layer] if w else None
        rows.append({"layer": layer, "block": block, "module": module, "unit": unit,
                     "claimants": ",".join(c["claimants"]), "winner": w,
                     "unit_winner_cosine": c["winner_cosine"], "unit_winner_one_minus_cos": c["winner_one_minus_cos"],
                     "rank": f.r if f else 0, "scaling": f.scaling if f else float("nan"),
                     "n_params": f.n_params if f else 0, "n_dense": int(lora.base_weights[layer].numel())})
    report = pd.DataFrame(rows)
    report["winner"] = pd.Series([r["winner"] for r in rows], dtype=object)  # None where W0 is kept
    return report


# --------------------------------------------------------------------------- registry and entry point
MERGE_METHODS: dict[str, Callable[..., MergeResult]] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "wta_cosine": wta_cosine,
}


def merge_adapters(model, method: str, adapters=None, **params) -> MergeResult:
    """Merge LoRA adapters with a registered method; nothing is modified.

    Args:
        model, adapters: a `peft.PeftModel` (and optionally which of its adapters), a base model
            with `{name: adapter folder}`, or a `hpelib.similarity.LoraSet` (see `load_lora_set`).
        method: a key of `MERGE_METHODS`.
        **params: the method's keyword parameters, e.g. `lam=0.5` (task_arithmetic),
            `density=0.2` (ties), `density=0.5, seed=0` (dare_*),
            `threshold=0.9999, reference="base", granularity="module"` (wta_cosine).

    Returns:
        `MergeResult`: merged weights (dense methods) or a PEFT adapter (`wta_cosine`) plus the
        report tables. `save_merge` writes it; `merged_model` / `load_merged_model` apply it.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {sorted(MERGE_METHODS)}")
    fn = MERGE_METHODS[method]
    sig = inspect.signature(fn)
    allowed = [p for p in sig.parameters if p != "lora"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {unknown}; it takes {allowed}")
    missing = [p for p in allowed if sig.parameters[p].default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ValueError(f"{method}: missing parameter(s) {missing} (every parameter is explicit; it takes {allowed})")
    return fn(load_lora_set(model, adapters), **params)


# --------------------------------------------------------------------------- applying, saving, loading
def merged_model(base_model: torch.nn.Module, result: MergeResult) -> torch.nn.Module:
    """A new model: a deep copy of `base_model` with the merge applied (`base_model` untouched).

    Dense merges: the merged weights copied in. Lora merges: a `PeftModel` over the copy with the
    merged adapter (as `PeftModel.from_pretrained` would load it from `save_merge`'s folder).
    Needs memory for a second copy of the model.
    """
    _check_fingerprint(base_model, result.fingerprint)
    model = copy.deepcopy(base_model)
    if result.kind == "lora":
        from peft import get_peft_model, set_peft_model_state_dict

        peft_model = get_peft_model(model, copy.deepcopy(result.lora_config))
        load = set_peft_model_state_dict(peft_model, result.adapter_state)
        if load.unexpected_keys:
            raise ValueError(f"merged adapter keys not placed in the model: {load.unexpected_keys[:5]}")
        return peft_model.eval()
    _copy_weights(model, result.weights)
    return model


def save_merge(result: MergeResult, path: str | os.PathLike) -> Path:
    """Write a merge to folder `path` (replacing a previous merge there; never another folder).

    Lora merges: PEFT's `adapter_config.json` + `adapter_model.safetensors`. Dense merges:
    `merged_weights.safetensors` (full merged weights of the changed layers, keys `<layer>.weight`).
    Both: `merge_manifest.json` (method, params, adapters, base fingerprint) and
    `merge_report.csv` / `merge_summary.csv`. Written to a temporary folder, then renamed.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file():
        raise FileExistsError(f"{path} exists and is not a saved merge; refusing to replace it")
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if result.kind == "lora":
            result.lora_config.save_pretrained(str(tmp))
            save_file({k: v.contiguous() for k, v in result.adapter_state.items()},
                      str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        else:
            save_file({f"{layer}.weight": w.contiguous() for layer, w in result.weights.items()},
                      str(tmp / MERGED_WEIGHTS), metadata={"format": "pt"})
        io.write_json(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION, "hpelib_version": __version__, "kind": result.kind,
            "method": result.method, "params": result.params, "adapters": result.adapters,
            "base_model_name_or_path": result.base_model_name_or_path, "fingerprint": result.fingerprint,
            "layers_changed": sorted(result.weights) if result.kind == "dense" else
            [k[len("base_model.model."):-len(".lora_A.weight")] for k in result.adapter_state if k.endswith("lora_A.weight")],
        })
        result.report.to_csv(tmp / "merge_report.csv", index=False)
        result.summary.to_csv(tmp / "merge_summary.csv", index=False)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_merged_model(base_model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the merged model `save_merge` wrote in `path`, over a deep copy of `base_model`.

    Checks the base weights against the manifest's fingerprint first (a different base model is a
    ValueError naming the layer). Lora merges come back as a `PeftModel`
    (`PeftModel.from_pretrained`), dense merges as the base model class with merged weights.
    """
    from safetensors.torch import load_file

    path = Path(path)
    manifest = io.read_json(path / MANIFEST)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: merge format {manifest.get('format_version')} is not {FORMAT_VERSION}")
    _check_fingerprint(base_model, manifest["fingerprint"])
    model = copy.deepcopy(base_model)
    if manifest["kind"] == "lora":
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path)).eval()
    weights = load_file(str(path / MERGED_WEIGHTS))
    _copy_weights(model, {k[: -len(".weight")]: v for k, v in weights.items()})
    return model


def _copy_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, w in weights.items():
            try:
                param = model.get_submodule(layer).weight
            except AttributeError:
                raise ValueError(f"merged layer {layer!r} is not in the model") from None
            if param.shape != w.shape:
                raise ValueError(f"merged layer {layer!r}: weight {tuple(w.shape)} does not fit {tuple(param.shape)}")
            param.copy_(w)


def _fingerprint(lora: LoraSet) -> dict:
    """layer -> shape, dtype and float64 Frobenius norm of `W0`: identifies the base weights."""
    return {layer: {"shape": list(w.shape), "dtype": str(w.dtype).replace("torch.", ""),
                    "norm": float(torch.linalg.vector_norm(w.detach().double()))}
            for layer, w in ((layer, lora.base_weights[layer]) for layer in lora.layers)}


def _check_fingerprint(base_model: torch.nn.Module, fingerprint: dict, rtol: float = 1e-6) -> None:
    modules = dict(base_model.named_modules())
    from peft import PeftModel

    if isinstance(base_model, PeftModel):
        raise ValueError("base_model is a PeftModel: pass the plain base model the adapters were trained on")
    for layer, fp in fingerprint.items():
        w = getattr(modules.get(layer), "weight", None)
        if w is None:
            raise ValueError(f"layer {layer!r} of the merge is not in this base model: a different base model?")
        if list(w.shape) != fp["shape"]:
            raise ValueError(f"layer {layer!r}: base weight is {tuple(w.shape)}, the merge was built on "
                             f"{tuple(fp['shape'])}: a different base model?")
        norm = float(torch.linalg.vector_norm(w.detach().double()))
        if not math.isclose(norm, fp["norm"], rel_tol=rtol, abs_tol=1e-12):
            raise ValueError(f"layer {layer!r}: base weight norm {norm:.9g} differs from the {fp['norm']:.9g} the merge "
                             "was built on: a different base model (or modified weights)?")


def _base_name(lora: LoraSet) -> str | None:
    names = [getattr(c, "base_model_name_or_path", None) for c in lora.configs.values()]
    names = [n for n in names if n]
    return names[0] if names else None


def _check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return float(density)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return seed


def _check_sign_method(method) -> None:
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {list(SIGN_METHODS)}, got {method!r}")


# --------------------------------------------------------------------------- many merges (04_merge)
SWEPT_PARAM = {"task_arithmetic": "lam", "ties": "density", "dare_linear": "density", "dare_ties": "density",
               "wta_cosine": "threshold"}  # the parameter in a merge's variant name


def merge_name(result: MergeResult) -> str:
    """The variant name of a merge, `<method>@<value of its swept parameter>`, e.g.
    `task_arithmetic@0.5`, `ties@0.2`, `wta_cosine@0.9999` (what `hpelib.evaluate` parses)."""
    return f"{result.method}@{result.params[SWEPT_PARAM[result.method]]:.12g}"


def merge_plan(ta_lambdas: Sequence[float] = (), ties_density: float | None = None,
               dare_density: float | None = None, seed: int = 0, wta_thresholds: Sequence[float] = (),
               wta_reference: str = "base", wta_granularity: str = "module",
               methods: Sequence[str] = tuple(MERGE_METHODS)) -> list[tuple[str, dict]]:
    """`[(method, params), ...]` for a grid of merges, as `hpelib.config.MergeConfig` describes it:
    task arithmetic per lambda, TIES at `ties_density`, DARE (linear and TIES) at `dare_density`
    with `seed`, WTA per threshold. Only `methods` are included."""
    plan: list[tuple[str, dict]] = []
    if "task_arithmetic" in methods:
        plan += [("task_arithmetic", {"lam": lam}) for lam in ta_lambdas]
    if "ties" in methods and ties_density is not None:
        plan.append(("ties", {"density": ties_density}))
    for dare in ("dare_linear", "dare_ties"):
        if dare in methods and dare_density is not None:
            plan.append((dare, {"density": dare_density, "seed": seed}))
    if "wta_cosine" in methods:
        plan += [("wta_cosine", {"threshold": t, "reference": wta_reference, "granularity": wta_granularity})
                 for t in wta_thresholds]
    unknown = sorted(set(methods) - set(MERGE_METHODS))
    if unknown:
        raise ValueError(f"unknown merge method(s) {unknown}; choose from {sorted(MERGE_METHODS)}")
    return plan


def merge_all(model, plan: Sequence[tuple[str, dict]], adapters=None) -> dict[str, MergeResult]:
    """Every merge of `plan` (`[(method, params), ...]`, e.g. `merge_plan(...)`), by `merge_name`.
    The adapters are collected once (`load_lora_set`)."""
    lora = load_lora_set(model, adapters)
    results: dict[str, MergeResult] = {}
    for method, params in plan:
        result = merge_adapters(lora, method, **params)
        name = merge_name(result)
        if name in results:
            raise ValueError(f"two merges of the plan are both named {name!r}: {results[name].params} and {params}")
        results[name] = result
    return results


def build_merges(model, adapters, merge_config) -> dict[str, MergeResult]:
    """Every merge a `hpelib.config.MergeConfig` names (`04_merge`): task arithmetic per lambda,
    TIES, DARE, WTA per threshold, over `model` + `adapters` (see `load_lora_set`)."""
    c = merge_config
    plan = merge_plan(ta_lambdas=c.ta_lambdas, ties_density=c.ties_density, dare_density=c.dare_density,
                      seed=c.merge_seed, wta_thresholds=c.wta_thresholds, wta_reference=c.wta_reference,
                      wta_granularity=c.wta_granularity, methods=c.methods)
    return merge_all(model, plan, adapters)


def merge_summary(results: dict[str, MergeResult]) -> pd.DataFrame:
    """One row per merge: `name`, `method`, `kind`, `params` (text), `layers_changed`, the share of
    target-layer weights taken from each adapter (`share_<adapter>`; dense merges: changed by it;
    `share_(base)`: kept at W0 by WTA), and the median `1 - cos(W0, W_merged)` over the changed
    layers (dense merges; NaN for WTA, whose per-layer similarities are in its report)."""
    rows = []
    for name, r in results.items():
        row = {"name": name, "method": r.method, "kind": r.kind,
               "params": ", ".join(f"{k}={v}" for k, v in r.params.items())}
        if r.kind == "lora":
            row["layers_changed"] = int(r.report["winner"].notna().sum())
            row["median_one_minus_cos"] = float("nan")
        else:
            row["layers_changed"] = len(r.weights)
            row["median_one_minus_cos"] = float(r.report["one_minus_cos"].median())
        for s in r.summary.itertuples():
            row[f"share_{s.adapter}"] = s.share
        rows.append(row)
    return pd.DataFrame(rows)


def winner_summary(results: dict[str, MergeResult]) -> pd.DataFrame:
    """Who won where, for every winner-takes-all merge: one row per merge and adapter (and
    `(base)`): `name`, `threshold`, `reference`, `granularity`, `adapter`, `n_units`, `n_params`,
    `n_dense`, `share`."""
    parts = []
    for name, r in results.items():
        if r.method != "wta_cosine":
            continue
        part = r.summary.copy()
        for i, k in enumerate(("name", "threshold", "reference", "granularity")):
            part.insert(i, k, name if k == "name" else r.params[k])
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["name", "threshold", "reference", "granularity", "adapter", "n_units",
                                     "n_params", "n_dense", "share"])
    return pd.concat(parts, ignore_index=True)


def save_merges(results: dict[str, MergeResult], folder: str | os.PathLike) -> pd.DataFrame:
    """`save_merge` each result into `folder/<name>`, and `folder/merge_summary.csv`; returns the
    `merge_summary` table with a `path` column. Folders of merges not in `results` are left alone
    (evaluation reads the summary, so it ignores them)."""
    folder = Path(folder)
    summary = merge_summary(results)
    summary["path"] = [str(save_merge(results[name], folder / name)) for name in summary["name"]]
    with io.atomic_path(folder / "merge_summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    return summary


def merge_metrics(summary: pd.DataFrame) -> dict[str, float | int | None]:
    """Flat metrics of `04_merge` for `metrics.json`: `<name>/layers_changed`,
    `<name>/share_<adapter>`, `<name>/median_one_minus_cos` (NaN written as None)."""
    metrics: dict[str, float | int | None] = {}
    skip = {"name", "method", "kind", "params", "path"}
    for row in summary.to_dict("records"):
        for k, v in row.items():
            if k in skip:
                continue
            v = v.item() if hasattr(v, "item") else v
            metrics[f"{row['name']}/{k}"] = None if isinstance(v, float) and math.isnan(v) else v
    return metrics
