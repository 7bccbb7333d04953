"""The smoke tier (STYLE.md 11): the whole workbook, every notebook through papermill with the
`smoke` profile, in a temporary data and runs folder; then the run's artefacts and metrics."""

from __future__ import annotations

import json

import nbformat
import pytest

from hpelib import paths
from hpelib.config import make_config
from hpelib.workbook import NOTEBOOKS, main, notebook_parameters, notebook_path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, head_assets):
    """One smoke run for the module's tests (its data and base cache in a temporary folder)."""
    import os

    root = tmp_path_factory.mktemp("smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("HPE_DATA_DIR", str(root / "data"))
    mp.setenv("HPE_RUNS_DIR", str(root / "runs"))
    (root / "data" / "assets").mkdir(parents=True)
    os.symlink(head_assets, root / "data" / "assets" / "menpo3d")
    try:
        rc = main(["run", "--profile", "smoke", "--name", "smoke", "--no-progress"])
        yield rc, root / "runs" / "smoke"
    finally:
        mp.undo()


def test_whole_workbook_runs_and_writes_every_artefact(smoke_run):
    rc, run = smoke_run
    assert rc == 0
    for nb in NOTEBOOKS:
        executed = nbformat.read(run / paths.NOTEBOOKS_DIR / f"{nb}.ipynb", as_version=4)
        assert not [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                    if o.get("output_type") == "error"], nb
    for name in (paths.RUN_CONFIG, paths.RUN_INFO, paths.METRICS, paths.DATASETS, paths.REPORT):
        assert (run / name).is_file(), name
    for adapter in make_config("smoke").lora.adapters:
        assert (run / paths.ADAPTERS_DIR / adapter / "adapter_model.safetensors").is_file()
        assert json.loads((run / paths.ADAPTERS_DIR / adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    wta = run / paths.MERGES_DIR / "wta_cosine@0.9999"
    assert (wta / "adapter_config.json").is_file() and (wta / "adapter_model.safetensors").is_file()
    figures = {p.name for p in (run / paths.FIGURES_DIR).glob("*.png")}
    assert {"00_gallery.png", "03_similarity_base_module.png", "05_merge_curves.png", "05_answer_kinds.png"} <= figures


def test_metrics_cover_every_variant_and_domain(smoke_run):
    _, run = smoke_run
    metrics = json.loads((run / paths.METRICS).read_text())
    cfg = make_config("smoke")
    variants = ["base", *(f"lora:{a}" for a in cfg.lora.adapters),
                *(f"task_arithmetic@{lam:g}" for lam in cfg.merge.ta_lambdas),
                *(f"wta_cosine@{t:g}" for t in cfg.merge.wta_thresholds)]
    for variant in variants:
        for domain in cfg.data.test_domains:
            for metric in ("mae_all", "valid_rate", "blended_rate", "box_acc50", "grounding_acc50"):
                key = f"{variant}/{domain}/{metric}"
                assert key in metrics, key
                assert 0 <= metrics[key] <= (cfg.eval.invalid_penalty_deg if metric == "mae_all" else 1), key
    # training stops at whichever of minutes / max_steps comes first
    assert 0 < metrics["train/base/steps"] <= cfg.base.max_steps
    # the base's cube poses (base.object_pose, as in the default's base): checked while it trains, and
    # scored by 01_train_base on held-out scenes
    assert cfg.base.object_pose > 0 and 0 <= metrics["train/base/final/pose_object/valid_rate"] <= 1
    for metric in ("valid_rate", "acc50"):
        assert 0 <= metrics[f"train/base/{cfg.data.train_domain}/object_pose_{metric}"] <= 1, metric
    for adapter in cfg.lora.adapters:
        assert 0 < metrics[f"train/lora:{adapter}/steps"] <= cfg.lora.train.max_steps
    # both CNN baselines, from one training run: @budget is its snapshot at the LoRA budget
    for variant in ("cnn6d@budget", "cnn6d@converged"):
        for domain in cfg.data.test_domains:
            assert 0 <= metrics[f"{variant}/{domain}/mae_mean"] < 180, (variant, domain)
    assert 0 < metrics["train/cnn6d@budget/steps"] <= metrics["train/cnn6d@converged/steps"]
    assert metrics["train/cnn6d@budget/steps"] <= cfg.lora.train.max_steps
    assert f"cnn6d@budget/{cfg.data.test_domains[0]}/vs_cnn6d" in metrics
    info = json.loads((run / paths.RUN_INFO).read_text())
    assert info["profile"] == "smoke"
    assert {"python", "torch", "transformers", "peft"} <= set(info["versions"])


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_every_notebook_documents_its_parameters(nb):
    params = notebook_parameters(notebook_path(nb))
    assert {"PROFILE", "RUN_DIR", "OVERRIDES"} <= set(params)
    for name, p in params.items():
        assert p["inferred_type_name"] not in ("None", ""), f"{nb}: {name} has no type annotation"
        assert p["help"], f"{nb}: {name} has no help comment"


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_notebooks_are_stored_without_outputs(nb):
    stored = nbformat.read(notebook_path(nb), as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in stored.cells if c.cell_type == "code")


_FRESH_PROCESS = r"""
import sys, torch
from peft import PeftModel
from hpelib import train
from hpelib.config import make_config
base = train.load_base(make_config("smoke"))
model = PeftModel.from_pretrained(base.model, sys.argv[1]).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[3])
"""


def test_wta_adapter_of_04_merge_reloads_in_a_fresh_process_with_the_same_logits(smoke_run, tmp_path):
    import subprocess
    import sys

    import torch

    from hpelib import merge, prompts, train
    from hpelib.backends.base import Sample
    from hpelib.data import prepare
    from hpelib.data.real import load_image

    _, run = smoke_run  # the fixture points HPE_DATA_DIR at the run's data (and the subprocess inherits it)
    cfg = make_config("smoke")
    threshold = cfg.merge.wta_thresholds[0]
    base = train.load_base(cfg)
    in_memory = merge.merged_model(base.model, merge.merge_adapters(
        base.model, "wta_cosine", train.adapter_dirs(run), threshold=threshold,
        reference=cfg.merge.wta_reference, granularity=cfg.merge.wta_granularity))
    row = prepare.load_datasets(run)["test"]["synth-aflw"].iloc[0]
    batch = base.collate([base.encode(Sample(load_image(row["image"]), prompts.HPE_PROMPT, row["hpe_answer"]))])
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = in_memory(**batch).logits
        plain = base.model(**batch).logits
    assert (expected - plain).abs().max() > 1e-4, "the merge changed nothing: the comparison would prove nothing"
    subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(run / paths.MERGES_DIR / f"wta_cosine@{threshold:g}"),
                    str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)


def _run_workbook(tmp_path, monkeypatch, head_assets, name: str, *params: str, qwen: bool = False):
    """The whole workbook with the `smoke` profile and `params` (`-p key value` pairs), in `tmp_path`;
    `qwen`: on a tiny random Qwen2-VL saved like a hub checkpoint (real weights cannot be downloaded).
    Returns the run folder after checking that it finished with the merged adapter's metrics."""
    import os

    from hpelib import prompts
    from hpelib.backends.qwen2_vl import write_tiny_checkpoint

    monkeypatch.setenv("HPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HPE_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "data" / "assets").mkdir(parents=True)
    os.symlink(head_assets, tmp_path / "data" / "assets" / "menpo3d")
    if qwen:
        corpus = [prompts.HPE_PROMPT, prompts.grounding_prompt("head"),
                  "Where is the red green blue yellow purple orange white cyan cube sphere cone cylinder torus ?"]
        model_dir = write_tiny_checkpoint(tmp_path / "tiny-qwen2-vl", corpus)
        params = ("model.backend", "qwen2_vl", "model.model_id", str(model_dir), *params)
    flags = [arg for key, value in zip(params[::2], params[1::2]) for arg in ("-p", key, value)]
    assert main(["run", "--profile", "smoke", "--name", name, "--no-progress", *flags]) == 0
    run = tmp_path / "runs" / name
    assert "wta_cosine@0.9999/synth-aflw/valid_rate" in json.loads((run / paths.METRICS).read_text())
    assert (run / paths.ADAPTERS_DIR / "hpe_rehearsal" / "adapter_model.safetensors").is_file()
    return run


@pytest.mark.slow
def test_whole_workbook_runs_on_a_tiny_qwen2_vl_by_parameters_only(tmp_path, monkeypatch, head_assets):
    """The hub path end to end: only model.backend / model.model_id change."""
    _run_workbook(tmp_path, monkeypatch, head_assets, "qwen", qwen=True)


# The `gpu` profile's device settings: bf16 weights on the GPU, gradient checkpointing, one adapter
# and one evaluation at a time (its sizes are a real model's; the smoke profile's are kept)
GPU_SETTINGS = ("model.device", "cuda", "model.dtype", "bfloat16", "model.gradient_checkpointing", "true",
                "lora.workers", "1", "eval.workers", "1")


@pytest.mark.gpu
@pytest.mark.parametrize("qwen", [True, False], ids=["qwen2_vl", "tiny"])
def test_whole_workbook_runs_on_a_gpu_with_the_gpu_profiles_settings(tmp_path, monkeypatch, head_assets, qwen):
    """Every notebook on a CUDA device: the hub path (a tiny Qwen2-VL) in bf16 as the `gpu` profile
    runs it, and the embedded default's base and adapters; each adapter says where it trained."""
    settings = GPU_SETTINGS if qwen else ("model.device", "cuda", "lora.workers", "1", "eval.workers", "1")
    run = _run_workbook(tmp_path, monkeypatch, head_assets, "gpu", *settings, qwen=qwen)
    for adapter in make_config("smoke").lora.adapters:
        trained = json.loads((run / paths.ADAPTERS_DIR / adapter / "metrics.json").read_text())
        assert trained["device"].startswith("cuda"), trained["device"]
