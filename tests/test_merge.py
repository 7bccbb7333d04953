"""Merges on tiny real models and real PEFT adapters: exactness of the winner-takes-all adapter
(also loaded by plain PEFT in a fresh process), TA against `merge_and_unload`, TIES/DARE against
PEFT's own merge functions, persistence, and errors (STYLE.md 9, 10)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from peft.utils import merge_utils

from hpelib import bench
from hpelib.merge import (
    MERGE_METHODS, alpha_for_scaling, load_merged_model, merge_adapters, merge_all, merge_plan, merged_model,
    save_merge, save_merges,
)
from hpelib.similarity import LoraFactors, LoraSet, load_lora_set

warnings.filterwarnings("ignore", message=".*[Aa]dapter name.*")

INPUT_IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 2], [3, 7, 11, 15, 19, 23, 4]])
DENSE = {"task_arithmetic": dict(lam=0.7), "ties": dict(density=0.3), "dare_linear": dict(density=0.5, seed=3),
         "dare_ties": dict(density=0.5, seed=3)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return bench.tiny_llama(seed=0)


@pytest.fixture(scope="module")
def peft_model(base):
    """Two adapters: different ranks and alphas per layer (rank/alpha patterns, rsLoRA), targets overlapping."""
    return bench.random_lora_model(base, {
        "hpe": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                    rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 5}),
        "ground": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True),
    }, seed=1, b_scale=0.02)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _winner_deltas_applied(base, peft_model, result) -> torch.nn.Module:
    """Independent check: W0 + get_delta_weight(winner) per winning layer, from PEFT's own layers."""
    model = copy.deepcopy(base)
    layers = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for row in result.report.itertuples():
            if row.winner is not None:
                model.get_submodule(row.layer).weight += layers[row.layer].get_delta_weight(row.winner)
    return model


# --------------------------------------------------------------------------- winner takes all
def test_wta_of_an_adapter_with_itself_returns_it_exactly(peft_model):
    lora = load_lora_set(peft_model)
    twice = LoraSet(lora.base_weights, {"hpe": lora.factors["hpe"], "hpe_again": dict(lora.factors["hpe"])},
                    {"hpe": lora.configs["hpe"], "hpe_again": lora.configs["hpe"]})
    for reference in ("base", "pairwise"):
        if reference == "pairwise":  # identical adapters agree everywhere: nothing is contested
            with pytest.warns(UserWarning, match="no unit is claimed"):
                result = merge_adapters(twice, "wta_cosine", threshold=0.5, reference=reference, granularity="module")
            assert result.report["winner"].isna().all()
            continue
        result = merge_adapters(twice, "wta_cosine", threshold=1.0, reference=reference, granularity="module")
        assert set(result.report["winner"].dropna()) == {"hpe"}
        original = {k: v for k, v in peft_model.state_dict().items() if ".hpe." in k and "lora_" in k}
        assert len(result.adapter_state) == len(original)
        for key, tensor in original.items():  # base_model.model.<layer>.lora_A.hpe.weight
            saved = result.adapter_state[key.replace(".hpe.", ".")]
            assert saved.dtype == tensor.dtype and torch.equal(saved, tensor)


def test_wta_adapter_loads_with_plain_peft_in_a_fresh_process(tmp_path, base, peft_model):
    result = merge_adapters(peft_model, "wta_cosine", threshold=1.0, reference="base", granularity="module")
    assert set(result.report["winner"].dropna()) == {"hpe", "ground"}  # both adapters win layers
    assert result.report["rank"].nunique() > 1
    save_merge(result, tmp_path / "wta")
    base.save_pretrained(tmp_path / "base")
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'wta')!r}).eval()
        with torch.no_grad():
            out = model(input_ids=torch.tensor({INPUT_IDS.tolist()})).logits
        torch.save(out, {str(tmp_path / 'logits.pt')!r})
        scaling = {{n: m.scaling["default"] for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}}
        json.dump(scaling, open({str(tmp_path / 'scaling.json')!r}, "w"))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(tmp_path / "logits.pt")
    in_memory = logits(merged_model(base, result))
    torch.testing.assert_close(fresh, in_memory, rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh, logits(_winner_deltas_applied(base, peft_model, result)), rtol=1e-5, atol=1e-5)
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    for row in result.report.itertuples():
        if row.winner is not None:
            assert scaling[row.layer] == row.scaling  # bit for bit: per-layer rank and alpha patterns
    assert not torch.allclose(fresh, logits(base), atol=1e-4)  # the merge changes the model


def test_wta_block_granularity_takes_whole_blocks(peft_model):
    result = merge_adapters(peft_model, "wta_cosine", threshold=1.0, reference="base", granularity="block")
    report = result.report
    for block, rows in report.groupby("block"):
        winners = set(rows["winner"].dropna())
        assert len(winners) == 1
        (w,) = winners
        targeted = set(load_lora_set(peft_model).factors[w])
        # the block winner's modules come from it; modules it does not target keep W0
        assert all((r.winner == w) == (r.layer in targeted) for r in rows.itertuples())


def test_wta_hand_built_winners_are_copied():
    eye = torch.eye(4)
    unit = lambda i, j: (torch.zeros(4, 1).index_fill_(0, torch.tensor([i]), 1.0),
                         torch.zeros(1, 4).index_fill_(1, torch.tensor([j]), 1.0))
    (b01, a01), (b23, a23) = unit(0, 1), unit(2, 3)
    x = {"layers.0.q": LoraFactors(a01, b01, 0.1), "layers.1.q": LoraFactors(a23, b23, 0.001)}
    y = {"layers.0.q": LoraFactors(a23, b23, 0.001), "layers.1.q": LoraFactors(a01, b01, 0.1)}
    lora = LoraSet({"layers.0.q": eye, "layers.1.q": eye.clone()}, {"x": x, "y": y})
    result = merge_adapters(lora, "wta_cosine", threshold=1 - 1e-4, reference="base", granularity="module")
    assert dict(zip(result.report.layer, result.report.winner)) == {"layers.0.q": "x", "layers.1.q": "y"}
    assert torch.equal(result.adapter_state["base_model.model.layers.1.q.lora_B.weight"], b01)
    assert result.lora_config.alpha_pattern == {r"layers\.0\.q": 0.1, r"layers\.1\.q": 0.1}
    summary = result.summary.set_index("adapter")
    assert summary.loc["x", "n_units"] == 1 and summary.loc["y", "share"] == 0.5


def test_wta_with_nothing_claimed_is_a_loadable_zero_adapter(tmp_path, base, peft_model):
    with pytest.warns(UserWarning, match="no unit is claimed"):
        result = merge_adapters(peft_model, "wta_cosine", threshold=1e-9, reference="base", granularity="module")
    assert result.report["winner"].isna().all()
    save_merge(result, tmp_path / "wta")
    torch.testing.assert_close(logits(load_merged_model(base, tmp_path / "wta")), logits(base), rtol=0, atol=0)


@pytest.mark.parametrize("scaling, r, rslora", [(2.0, 4, False), (16 / 12**0.5, 12, True), (16 / 12**0.5, 12, False),
                                                 (1 / 3, 7, True), (0.1, 3, False)])
def test_alpha_for_scaling_reproduces_peft_scaling(scaling, r, rslora):
    alpha, exact = alpha_for_scaling(scaling, r, rslora)
    got = alpha / r**0.5 if rslora else alpha / r
    assert exact == (got == scaling)
    assert abs(got - scaling) <= 2 * np.spacing(scaling)  # alpha / r skips some floats: then 1 ulp off
    assert exact or (scaling, r) == (0.1, 3)


# --------------------------------------------------------------------------- dense merges
def test_task_arithmetic_lambda_one_equals_merge_and_unload(base, peft_model):
    result = merge_adapters(peft_model, "task_arithmetic", adapters=["hpe"], lam=1.0)
    reference = copy.deepcopy(peft_model)
    reference.set_adapter("hpe")
    unloaded = reference.merge_and_unload(adapter_names=["hpe"])
    torch.testing.assert_close(logits(merged_model(base, result)), logits(unloaded), rtol=0, atol=1e-6)
    for layer, w in result.weights.items():
        assert torch.equal(w, unloaded.get_submodule(layer).weight)


def test_ties_and_dare_match_peft_merge_functions(peft_model):
    """Our composition of primitives equals PEFT's own ties / dare_linear on the dense deltas."""
    lora = load_lora_set(peft_model)
    layer = "model.layers.0.self_attn.q_proj"  # targeted by both adapters
    deltas = [lora.factors[a][layer].delta() for a in ("hpe", "ground")]
    ones = torch.ones(2)
    w0 = lora.base_weights[layer]
    ties = merge_adapters(lora, "ties", density=0.3)
    torch.testing.assert_close(ties.weights[layer] - w0, merge_utils.ties(deltas, ones, 0.3), rtol=0, atol=1e-7)
    # DARE: same masks when PEFT's function draws from the same seeds in the same order
    from hpelib.merge import layer_seed

    dare = merge_adapters(lora, "dare_linear", density=0.5, seed=3)
    expected = []
    for a, d in zip(("hpe", "ground"), deltas):
        torch.manual_seed(layer_seed(3, a, layer))
        expected.append(merge_utils.random_pruning(d, 0.5, rescale=True))
    torch.testing.assert_close(dare.weights[layer] - w0, merge_utils.task_arithmetic(expected, ones), rtol=0, atol=1e-7)


def test_dare_is_reproducible_and_leaves_the_global_rng_alone(peft_model):
    state = torch.random.get_rng_state()
    a = merge_adapters(peft_model, "dare_ties", density=0.5, seed=7)
    b = merge_adapters(peft_model, "dare_ties", density=0.5, seed=7)
    c = merge_adapters(peft_model, "dare_ties", density=0.5, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert any(not torch.equal(a.weights[k], c.weights[k]) for k in a.weights)


@pytest.mark.parametrize("method", sorted(DENSE))
def test_dense_merges_save_and_reload_bit_for_bit(tmp_path, base, peft_model, method):
    result = merge_adapters(peft_model, method, **DENSE[method])
    save_merge(result, tmp_path / method)
    reloaded = load_merged_model(base, tmp_path / method)
    assert torch.equal(logits(reloaded), logits(merged_model(base, result)))
    assert not torch.allclose(logits(reloaded), logits(base), atol=1e-4)
    manifest = json.loads((tmp_path / method / "merge_manifest.json").read_text())
    assert manifest["method"] == method and manifest["params"] == result.params


def test_no_nan_in_any_merge_and_inputs_unchanged(base, peft_model):
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    before_base = {k: v.clone() for k, v in base.state_dict().items()}
    params = dict(DENSE, wta_cosine=dict(threshold=0.9999, reference="pairwise", granularity="block"))
    for method, kw in params.items():
        result = merge_adapters(peft_model, method, **kw)
        tensors = list(result.weights.values()) + list(result.adapter_state.values())
        assert tensors and all(torch.isfinite(t).all() for t in tensors), method
        numeric = result.report.select_dtypes("number").drop(columns=["scaling"], errors="ignore")
        assert np.isfinite(numeric.to_numpy(dtype=float)).all() or method == "wta_cosine"
        assert_allclose(result.summary["share"].dropna().clip(0, 1), result.summary["share"].dropna())
    assert all(torch.equal(before[k], v) for k, v in peft_model.state_dict().items())
    assert all(torch.equal(before_base[k], v) for k, v in base.state_dict().items())
    assert set(MERGE_METHODS) == set(params)


# --------------------------------------------------------------------------- errors
def test_errors_name_the_problem(tmp_path, base, peft_model):
    with pytest.raises(ValueError, match="unknown merge method 'avg'"):
        merge_adapters(peft_model, "avg")
    with pytest.raises(ValueError, match=r"ties: unknown parameter\(s\) \['lambda_'\]"):
        merge_adapters(peft_model, "ties", density=0.2, lambda_=1.0)
    with pytest.raises(ValueError, match=r"wta_cosine: missing parameter\(s\) \['reference', 'granularity'\]"):
        merge_adapters(peft_model, "wta_cosine", threshold=0.9)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 0"):
        merge_adapters(peft_model, "dare_linear", density=0, seed=0)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
        merge_adapters(peft_model, "wta_cosine", threshold=1.5, reference="base", granularity="module")
    lora = load_lora_set(peft_model)
    bad = dict(lora.factors["hpe"])
    layer = "model.layers.0.mlp.down_proj"
    A = bad[layer].A.clone()
    A[0, 0] = float("nan")
    bad[layer] = LoraFactors(A, bad[layer].B, bad[layer].scaling)
    with pytest.raises(ValueError, match=r"adapter 'hpe', layer 'model\.layers\.0\.mlp\.down_proj'.*lora_A.*NaN"):
        merge_adapters(LoraSet(lora.base_weights, {"hpe": bad}), "task_arithmetic", lam=1.0)


def test_loading_onto_a_different_base_model_fails(tmp_path, peft_model):
    result = merge_adapters(peft_model, "task_arithmetic", lam=1.0)
    save_merge(result, tmp_path / "ta")
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.\d\.[\w.]+'.*different base model"):
        load_merged_model(bench.tiny_llama(seed=5), tmp_path / "ta")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a merge")
    with pytest.raises(FileExistsError, match="not a saved merge"):
        save_merge(result, tmp_path / "other")


def test_a_plan_of_merges_runs_summarises_and_saves(tmp_path, peft_model):
    from hpelib.config import MergeConfig
    from hpelib.merge import build_merges, merge_metrics, winner_summary

    plan = merge_plan(ta_lambdas=[0.5, 1.0], ties_density=0.2, dare_density=0.5, seed=0,
                      wta_thresholds=[0.999, 0.9999], methods=["task_arithmetic", "ties", "dare_linear", "wta_cosine"])
    assert [m for m, _ in plan] == ["task_arithmetic", "task_arithmetic", "ties", "dare_linear", "wta_cosine", "wta_cosine"]
    results = merge_all(peft_model, plan)
    assert list(results) == ["task_arithmetic@0.5", "task_arithmetic@1", "ties@0.2", "dare_linear@0.5",
                             "wta_cosine@0.999", "wta_cosine@0.9999"]
    summary = save_merges(results, tmp_path)
    assert list(summary["name"]) == list(results) and {"share_hpe", "share_ground", "path"} <= set(summary.columns)
    assert all((tmp_path / name / "merge_manifest.json").is_file() for name in results)
    assert (tmp_path / "merge_summary.csv").is_file()
    metrics = merge_metrics(summary)
    assert metrics["ties@0.2/layers_changed"] == 8 and metrics["wta_cosine@0.999/median_one_minus_cos"] is None
    winners = winner_summary(results)
    assert set(winners["name"]) == {"wta_cosine@0.999", "wta_cosine@0.9999"}
    assert_allclose(winners.groupby("name")["share"].sum(), 1.0)
    config_results = build_merges(peft_model, None, MergeConfig(ta_lambdas=[1.0], wta_thresholds=[0.9999]))
    assert list(config_results) == ["task_arithmetic@1", "ties@0.2", "dare_linear@0.5", "wta_cosine@0.9999"]
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_plan(methods=["avg"])
