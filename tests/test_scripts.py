"""The experiment scripts behind docs/tiny_backend.md still import and parse their arguments."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "scripts").glob("*.py"))


def _micro():
    """A micro tiny VLM's spec: scripts run on it in seconds."""
    from hpelib.backends.tiny import TinySpec

    return TinySpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, vision_dim=16, vision_depth=2,
                    vision_heads=2, vision_intermediate_size=32, deepstack=[1])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_prints_its_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script.name, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(script), run_name="__main__")
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def _run(script: str, argv: list[str], monkeypatch) -> None:
    path = Path(__file__).parent.parent / "scripts" / script
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(path), run_name="__main__")


def test_read_out_and_capacity_scripts_run_on_a_micro_base(tmp_path, data_dir, run_root, monkeypatch, capsys,
                                                           one_thread):
    """`angle_readout.py` scores a saved base's angle distributions; `pose_capacity.py` trains a real
    LoRA with its regression head and writes the held-out MAE it reached (docs/tiny_backend.md, R1 / R2)."""
    import dataclasses
    import json
    import math

    from hpelib.backends.tiny import TinyBackend
    from hpelib.config import make_config

    TinyBackend.build(make_config("default"), spec=_micro(), seed=0).save(tmp_path / "base")

    _run("angle_readout.py", [str(tmp_path / "base"), "none", "--n", "6"], monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if ln.split(":")[0].strip() in ("yaw", "pitch", "roll")]
    assert len(rows) == 3
    entropies = [float(ln.rsplit("entropy", 1)[1]) for ln in rows]
    assert all(0 < e <= math.log(361) + 1e-6 for e in entropies)  # a distribution over the 361 angle tokens
    assert lines[-1].startswith("mean : argmax MAE")

    _run("pose_capacity.py", [str(tmp_path / "base"), "--name", "cap", "--minutes", "0.05", "--n-eval", "6",
                              "--save"], monkeypatch)
    result = json.loads((run_root / "experiments" / "cap" / "capacity.json").read_text())
    assert result["steps"] >= 1 and result["rank"] == make_config("default").lora.rank
    assert set(result["final"]) == {"mae_yaw", "mae_pitch", "mae_roll", "mae_mean"}
    assert all(0 < v < 360 for v in result["final"].values())
    capsys.readouterr()
    _run("angle_readout.py", [str(tmp_path / "base"), str(run_root / "experiments" / "cap" / "adapter"), "--n", "6",
                              "--generate"], monkeypatch)  # the saved LoRA loads, is scored, and answers
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("mean : argmax MAE")
    assert lines[-1].startswith("greedy answers (6 scenes): valid ")
    with pytest.raises(SystemExit, match="has no conv stem"):  # LoRA on a stem the base does not have
        _run("pose_capacity.py", [str(tmp_path / "base"), "--name", "cap2", "--lora-stem"], monkeypatch)

    stem = dataclasses.replace(_micro(), stem="conv", stem_widths=[8, 8, 8])
    TinyBackend.build(make_config("default"), spec=stem, seed=0).save(tmp_path / "stem_base")
    trained = {}
    for name, extra in (("plain", []), ("stem", ["--lora-stem"])):
        _run("pose_capacity.py", [str(tmp_path / "stem_base"), "--name", name, "--minutes", "0.02", "--n-eval", "2",
                                  *extra], monkeypatch)
        trained[name] = json.loads((run_root / "experiments" / name / "capacity.json").read_text())["trained_params"]
    # rank-8 LoRA A and B on the four 3 x 3 convolutions: (3 + 8 + 8 + 8) * 9 * 8 in, (8 + 8 + 8 + 16) * 8 out
    assert trained["stem"] - trained["plain"] == (3 + 8 + 8 + 8) * 9 * 8 + (8 + 8 + 8 + 16) * 8


def test_curriculum_step_times_a_saved_base_in_float32_and_bf16(tmp_path, data_dir, monkeypatch, capsys, one_thread):
    """`curriculum_step.py` trains a saved base's curriculum steps (tower frozen) both ways and prints the times."""
    from hpelib.backends.tiny import TinyBackend
    from hpelib.config import make_config

    TinyBackend.build(make_config("default"), spec=_micro(), seed=0).save(tmp_path / "base")
    _run("curriculum_step.py", [str(tmp_path / "base"), "--batches", "1", "--repeat", "1", "--threads", "1"],
         monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" s a step")[0].rsplit(" ", 1)[0].strip() for ln in lines] == ["float32", "bf16 autocast"]
    assert all(0 < float(ln.split(" s a step")[0].split()[-1]) < 60 for ln in lines)


def test_object_scripts_run_on_a_micro_base(tmp_path, data_dir, monkeypatch, capsys, one_thread):
    """`object_answers.py` sorts a base's object answers (and by the object's size, and with `--tower` by
    what the base's dense vision stage says at the asked object's cell) and `object_attention.py`
    prints, per decoder layer, how often the answer attends to the target's cell (docs/tiny_backend.md,
    "A tower trained twice as long", "Binding the words")."""
    from hpelib import train
    from hpelib.backends.tiny import TinyBackend
    from hpelib.config import TrainConfig, make_config
    from hpelib.vision_pretrain import pretrain_vision

    config = make_config("default")
    backend = TinyBackend.build(config, spec=_micro(), seed=0)
    backend.save(tmp_path / "base")
    pretrain_vision(backend, train.make_renderer(config), TrainConfig(max_steps=1, minutes=1.0),
                    tmp_path / "vision", batch_size=2, progress=False, targets="dense")  # a real one-step stage
    _run("object_answers.py", [str(tmp_path / "base"), "--n", "6", "--tower", str(tmp_path / "vision")], monkeypatch)
    out = capsys.readouterr().out
    sizes = [ln for ln in out.splitlines() if ln.startswith("objects ")]
    assert sizes and sum(int(ln.split(":")[1].split(",")[0]) for ln in sizes) == 6  # every prompt in one size bin
    split = out.split("the tower's head at the asked object's cell")[1].splitlines()[1:]
    assert sum(int(ln.split()[-7]) for ln in split) == 6  # every prompt in one of the tower's cases
    with pytest.raises(SystemExit, match="no checkpoint"):
        _run("object_answers.py", [str(tmp_path / "base"), "--n", "2", "--tower", str(tmp_path)], monkeypatch)
    capsys.readouterr()
    _run("object_attention.py", [str(tmp_path / "base"), "--n", "4"], monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    layers = [ln for ln in lines if ln.strip().startswith("layer ")]
    assert [ln.split(":")[0] for ln in lines if not ln.startswith(" ")] == ["head", "object"]
    assert len(layers) == 2 * _micro().layers
    assert all(0 <= float(ln.split()[-1]) <= 1 for ln in layers)  # the attention share of the target's cell


def test_tiny_experiment_trains_an_adapter_or_every_weight_of_a_saved_base(tmp_path, data_dir, run_root, monkeypatch,
                                                                           one_thread):
    """`tiny_experiment.py lora [--full]` (G1 in docs/tiny_backend.md): the same mix and settings, a
    LoRA adapter or every weight of the base."""
    import json

    from hpelib.backends.tiny import TinyBackend
    from hpelib.config import make_config

    base = TinyBackend.build(make_config("default"), spec=_micro(), seed=0)
    base.save(tmp_path / "base")
    total = sum(p.numel() for p in base.model.parameters())
    settings = ["lora.train.max_steps=2", "lora.train.eval_samples=2", "lora.train.batch_size=4",
                "lora.train.prefetch=true", "lora.train.prefetch_workers=2"]
    results = {}
    for name, extra in (("lora", []), ("full", ["--full"])):
        _run("tiny_experiment.py", ["lora", *extra, "--name", name, "--base-dir", str(tmp_path / "base"),
                                    "--threads", "1", "--set", *settings], monkeypatch)
        results[name] = json.loads((run_root / "experiments" / name / "experiment.json").read_text())
        assert results[name]["final"]["step"] == 2 and "hpe/valid_rate" in results[name]["final"]
    assert results["full"]["trained_params"] == total
    assert 0 < results["lora"]["trained_params"] < total / 2
    assert (run_root / "experiments" / "lora" / "adapter_model.safetensors").exists()
