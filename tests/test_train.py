"""Tasks, the task mixer, the LR schedule, the training loop (resuming after an interrupt), the
stage entry points, and data-parallel LoRA training under `accelerate launch`.

Fast tests use a micro tiny backend and a stand-in renderer (random images, fixed labels), so
they need no OpenGL; the end-to-end ones render real scenes and are marked slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from hpelib import io, prompts, train
from hpelib.backends.tiny import TinyBackend, TinySpec
from hpelib.config import make_config
from hpelib.data import tasks

MICRO = TinySpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, vision_dim=16, vision_depth=2,
                 vision_heads=2, vision_intermediate_size=32, deepstack=[1])


class FakeRenderer:
    """Stands in for `synth.SceneRenderer`: a random image, a head and two objects, from `rng`."""

    def __init__(self, image_size: int = 64):
        self.image_size = image_size

    def render(self, rng: np.random.Generator):
        x, y = rng.uniform(0.05, 0.5, 2)
        axis = rng.normal(size=3)
        return SimpleNamespace(
            image=rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8),
            box=(x, y, x + 0.4, y + 0.45), yaw=float(rng.uniform(-90, 90)), pitch=float(rng.uniform(-40, 40)),
            roll=float(rng.uniform(-30, 30)), meta={"domain": "fake"},
            objects=[{"name": "red cube", "shape": "cube", "color": "red", "box": [0.6, 0.6, 0.8, 0.8],
                      "axis": list(axis / np.linalg.norm(axis)), "yaw": 20.0, "pitch": -10.0, "roll": 35.0},
                     {"name": "blue cone", "shape": "cone", "color": "blue", "box": [0.1, 0.7, 0.2, 0.9],
                      "axis": [0.0, 1.0, 0.0]}])


# the default's four decoder layers before the nineteenth session (six since)
FOUR_LAYERS = {"model.tiny_spec": {"stem": "conv", "angle_circle": 5}}
# the float32 four-layer default before the eighteenth session: 2000 curriculum steps within 18 min
FLOAT32_2000 = {**FOUR_LAYERS, "base.autocast_bf16": False, "base.max_steps": 2000, "base.minutes": 18}


# ------------------------------------------------------------------------------------ tasks
def test_allocate_splits_a_batch_by_weight():
    assert tasks.allocate({"hpe": 0.8, "box": 0.2}, 32) == {"hpe": 26, "box": 6}
    assert tasks.allocate({"hpe": 1.0, "box": 0.0}, 5) == {"hpe": 5}
    counts = tasks.allocate({"box": 0.6, "orient": 0.2, "colour": 0.1, "count": 0.1}, 16)
    assert sum(counts.values()) == 16


def test_task_mix_validates():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.TaskMix({"pose": 1.0})
    with pytest.raises(ValueError, match="all be 0"):
        tasks.TaskMix({"hpe": 0.0})
    with pytest.raises(ValueError, match="rehearsal_ratio"):
        tasks.lora_mix(1.0)
    assert tasks.lora_mix(0.0) == {"hpe": 1.0}


def test_stream_is_deterministic_and_follows_the_mix():
    stream = tasks.SampleStream(FakeRenderer(), tasks.lora_mix(0.25), batch_size=8, seed=3)
    a, b = stream.batch(5), stream.batch(5)
    assert [s.answer for s in a] == [s.answer for s in b]
    assert all((x.image == y.image).all() for x, y in zip(a, b))
    assert sorted(s.task for s in a) == ["box"] * 2 + ["hpe"] * 6
    assert [s.answer for s in stream.batch(6)] != [s.answer for s in a]
    assert [s.answer for s in stream.batch(5, part=1)] != [s.answer for s in a]
    for s in a:
        parsed = prompts.parse_response(s.answer, task=s.task)
        assert parsed.kind == s.task


def test_eval_set_is_fixed_and_disjoint_from_training():
    r = FakeRenderer()
    e1 = tasks.eval_set(r, ["hpe", "box_head"], n=4, seed=0)
    e2 = tasks.eval_set(r, ["hpe", "box_head"], n=4, seed=0)
    assert [s.answer for s in e1] == [s.answer for s in e2]
    train_answers = {s.answer for step in range(20) for s in tasks.SampleStream(r, {"hpe": 1}, 8).batch(step)}
    assert not train_answers & {s.answer for s in e1 if s.task == "hpe"}


def test_mirror_flips_yaw_roll_and_boxes():
    scene = FakeRenderer().render(np.random.default_rng(0))
    m = tasks.mirror_scene(scene)
    assert m.yaw == pytest.approx(-scene.yaw) and m.roll == pytest.approx(-scene.roll) and m.pitch == scene.pitch
    assert m.box[0] == pytest.approx(1 - scene.box[2]) and m.box[1] == scene.box[1]
    assert (m.image == scene.image[:, ::-1]).all()
    t0, d0 = tasks.axis_angles(scene.objects[0]["axis"])
    t1, d1 = tasks.axis_angles(m.objects[0]["axis"])
    assert d0 == d1 and (t0 == -t1 or abs(t0) == 90)


def test_base_curriculum_has_no_head_pose():
    stream = tasks.SampleStream(FakeRenderer(), tasks.BASE_MIX, batch_size=16)
    for s in stream.batch(0):
        assert s.task != "hpe" and "yaw" not in (s.answer or "")
    assert "hpe" not in tasks.BASE_MIX


def test_cube_pose_is_the_smallest_rotation_that_draws_the_same_cube():
    from hpelib.geometry import euler_to_matrix, geodesic_distance

    rng = np.random.default_rng(0)
    for yaw, pitch, roll in rng.uniform(-90, 90, (50, 3)):
        R = euler_to_matrix(yaw, pitch, roll)
        pose = tasks.cube_pose(yaw, pitch, roll)
        C = euler_to_matrix(*pose)
        S = R.T @ C  # the symmetry taking R to C: a signed permutation of determinant 1
        np.testing.assert_allclose(np.abs(S).sum(axis=0), 1, atol=1e-9)
        assert np.isclose(np.linalg.det(S), 1) and np.allclose(np.abs(S).round(), np.abs(S), atol=1e-9)
        angles = geodesic_distance(np.eye(3), R @ tasks.CUBE_SYMMETRIES)
        smallest = geodesic_distance(np.eye(3), C)
        assert smallest == pytest.approx(angles.min(), abs=1e-6) and smallest <= 62.81  # the cube's largest
        np.testing.assert_allclose(tasks.cube_pose(*pose), pose, atol=1e-6)  # already the smallest
        mirrored = tasks.cube_pose(-yaw, pitch, -roll)  # mirroring commutes with the choice
        np.testing.assert_allclose(mirrored, (-pose[0], pose[1], -pose[2]), atol=1e-6)
    assert len({m.tobytes() for m in tasks.CUBE_SYMMETRIES}) == 24


def test_object_pose_answers_a_cube_in_the_head_pose_grammar_and_never_a_head():
    rng = np.random.default_rng(0)
    scene = FakeRenderer().render(rng)
    s = tasks.task_pose_object(scene, rng)
    assert s.task == "pose_object" and s.prompt == "Locate the red cube and give its pose."
    parsed = prompts.parse_response(s.answer, task="hpe")
    assert parsed.kind == "hpe" and s.answer.startswith(prompts.format_box([0.6, 0.6, 0.8, 0.8]))
    yaw, pitch, roll = tasks.cube_pose(20.0, -10.0, 35.0)
    assert (parsed.yaw, parsed.pitch, parsed.roll) == (round(yaw), round(pitch), round(roll))
    m = tasks.task_pose_object(tasks.mirror_scene(scene), rng)  # the mirrored cube: yaw and roll negated
    assert (m.meta["yaw"], m.meta["pitch"], m.meta["roll"]) == pytest.approx((-yaw, pitch, -roll))
    scene.objects = [o for o in scene.objects if o["shape"] != "cube"]
    assert tasks.task_pose_object(scene, rng) is None  # no cube: a fresh render (SampleStream)
    assert prompts.pose_prompt(tasks.HEAD) == prompts.HPE_PROMPT


def test_base_mix_adds_object_poses_only_when_asked_and_never_a_heads():
    assert tasks.base_mix(0) == tasks.BASE_MIX and "pose_object" not in tasks.BASE_MIX
    assert tasks.base_mix(0.1) == {**tasks.BASE_MIX, "pose_object": 0.1}
    with pytest.raises(ValueError, match="object_pose"):
        tasks.base_mix(-0.1)
    batch = tasks.SampleStream(FakeRenderer(), tasks.base_mix(1.0), batch_size=16).batch(0)
    poses = [s for s in batch if s.task == "pose_object"]
    assert len(poses) == 8 and all(s.meta["target"] == "red cube" for s in poses)
    assert not any(s.task == "hpe" or s.prompt == prompts.HPE_PROMPT for s in batch)


def test_the_object_list_names_and_boxes_every_object_left_to_right_and_mirrors():
    scene = FakeRenderer().render(np.random.default_rng(0))  # a red cube on the right, a blue cone on the left
    sample = tasks.task_box_list(scene, np.random.default_rng(1))
    assert (sample.task, sample.prompt) == ("box_list", "Locate the objects.")
    assert sample.answer == "blue cone [[100,700,200,900]] red cube [[600,600,800,800]]"
    mirrored = tasks.task_box_list(tasks.mirror_scene(scene), np.random.default_rng(1))
    assert mirrored.answer == "red cube [[200,600,400,800]] blue cone [[800,700,900,900]]"
    assert tasks.task_box_list(SimpleNamespace(image=scene.image, objects=[]), np.random.default_rng(1)) is None
    batch = tasks.SampleStream(FakeRenderer(), tasks.base_mix(0.0, {"box_list": 0.5, "count": 0.5}), 8).batch(0)
    assert sorted(s.task for s in batch) == ["box_list"] * 4 + ["count"] * 4


def test_the_curriculum_weights_are_a_base_parameter_in_its_key():
    """`base.mix` replaces `tasks.BASE_MIX` (the batches follow it, `object_pose` beside it); the
    weights are the key's, however set: BASE_MIX written out is the default's base, another mix a
    new one, and unknown tasks, head pose, cube poses and an adapter's mix are refused by name."""
    objects = {"box": 0.4, "box_object": 0.2, "orient": 0.2, "colour": 0.1, "count": 0.1}  # OA
    assert tasks.base_mix(0.1, objects) == {**objects, "pose_object": 0.1}
    assert tasks.base_mix(0.0, {}) == tasks.BASE_MIX
    batch = tasks.SampleStream(FakeRenderer(), tasks.base_mix(0.0, {"box_object": 1.0, "count": 1.0}),
                               batch_size=16).batch(0)
    assert sorted(s.task for s in batch) == ["box"] * 8 + ["count"] * 8  # box_object samples are "box" tasks
    assert all(s.meta["target_kind"] == "object" for s in batch if s.task == "box")
    default = train.base_key(make_config("default"))  # the objects listed (LA), 2600 bf16 steps of it since session 18
    steps = {**FLOAT32_2000, "base.max_steps": 1300}  # the curriculum before the seventeenth session
    assert train.base_key(make_config("default", steps)) == "3877c341fc69" != default  # LA's cached base
    oa = train.base_key(make_config("default", {**steps, "base.mix": objects}))
    assert oa == "75f0bce0c236" != default  # OA's cached base
    vs1 = train.base_key(make_config("default", {**steps, "base.mix": {}}))  # {}: tasks.BASE_MIX, the base before OA
    assert train.base_key(make_config("default", {**steps, "base.mix": dict(tasks.BASE_MIX)})) == vs1 == "99826dc8a04a"
    for bad, match in (({"hpe": 1.0}, "base.mix names \\['hpe'\\]"), ({"pose_object": 1.0}, "base.object_pose"),
                       ({"boxes": 1.0}, "box_object")):
        with pytest.raises(ValueError, match=match):
            train.base_key(make_config("default", {"base.mix": bad}))
    for bad in ({"box": -1.0}, {"box": 0.0}, ["box"]):
        with pytest.raises(ValueError, match="base.mix"):
            make_config("default", {"base.mix": bad})
    with pytest.raises(ValueError, match="lora.train.mix"):
        make_config("default", {"lora.train.mix": objects})


def test_object_pose_is_a_base_parameter_refused_for_adapters():
    with pytest.raises(ValueError, match="object_pose"):
        make_config("smoke", {"base.object_pose": -1})
    with pytest.raises(ValueError, match="lora.train.object_pose"):
        make_config("smoke", {"lora.train.object_pose": 0.1})
    # the default's tower and curriculum before VS1
    op1 = {**FLOAT32_2000, "base.vision_steps": 0, "base.vision_minutes": 10, "base.mix": {}, "base.max_steps": 1300}
    assert train.base_key(make_config("default", {**op1, "base.object_pose": 0})) == "96289dffbd1e"  # DC1 alone
    assert train.base_key(make_config("default", op1)) == "f20e59d3c2ca" != "96289dffbd1e"


def test_axis_angles():
    assert tasks.axis_angles([0, 1, 0]) == (0, 0)
    assert tasks.axis_angles([0, -1, 0]) == (0, 0)  # a line: the sign does not matter
    assert tasks.axis_angles([0, 0, 1])[1] == 90
    tilt, _ = tasks.axis_angles([-math.sin(0.5), math.cos(0.5), 0])
    assert tilt == round(math.degrees(0.5))


# ------------------------------------------------------------------------------------ schedule and scoring
def test_lr_factor_warms_up_then_decays():
    f = [train.lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(train.MIN_LR_FRACTION, abs=1e-3)
    assert train.lr_factor(50, 10, None) == 1.0  # length not fixed yet


def test_score_answers_counts_invalid_as_misses():
    r = FakeRenderer()
    samples = tasks.eval_set(r, ["hpe", "box_head"], n=2)
    assert [s.task for s in samples] == ["box", "box", "hpe", "hpe"]  # box_head samples are "box" prompts
    answers = [samples[0].answer, "[[000,000,001,001]]", samples[2].answer, "nonsense"]
    table = train.score_answers(samples, answers)
    m = train.summarize(table)
    assert m["box_head/valid_rate"] == 1.0 and m["box_head/acc50"] == 0.5  # a valid box can miss
    assert m["hpe/valid_rate"] == 0.5 and m["hpe/mae_mean"] < 0.6  # rounding to integers only
    assert m["valid_rate"] == 0.75
    poses = tasks.eval_set(r, ["pose_object"], n=2)  # the base's object poses are scored as head poses are
    m = train.summarize(train.score_answers(poses, [poses[0].answer, "[[000,000,001,001]]"]))
    assert m["pose_object/valid_rate"] == 0.5 and m["pose_object/mae_mean"] < 0.6
    assert m["pose_object/acc50"] == 0.5


# ------------------------------------------------------------------------------------ the loop
def _fit(out_dir, max_steps, stop_after_steps=None, backend=None, **overrides):
    config = make_config("smoke")
    backend = backend or TinyBackend.build(config, spec=MICRO, seed=0)
    stream = tasks.SampleStream(FakeRenderer(), {"hpe": 0.5, "box": 0.5}, batch_size=4, seed=0)
    tc = make_config("smoke", {"base.max_steps": max_steps, "base.minutes": 30.0, "base.eval_every": 3,
                               "base.checkpoint_every": 2, "base.warmup_steps": 2, "base.grad_accum": 2,
                               **{f"base.{k}": v for k, v in overrides.items()}}).base
    evals = tasks.eval_set(FakeRenderer(), ["hpe"], n=2)
    history = train.fit(backend, stream, evals, tc, out_dir, progress=False, stop_after_steps=stop_after_steps)
    return backend, history


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    full, h_full = _fit(tmp_path / "full", max_steps=5)
    _, h_part = _fit(tmp_path / "resumed", max_steps=5, stop_after_steps=3)
    assert not h_part.attrs["finished"] and len(h_part) == 3
    # checkpoints every 2 steps: the "interrupt" after step 3 loses step 3, which is redone
    assert train.latest_checkpoint(tmp_path / "resumed").name == "checkpoint-0000002"
    resumed, h_res = _fit(tmp_path / "resumed", max_steps=5)
    assert h_res["step"].tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(h_res["lr"], h_full["lr"])
    np.testing.assert_allclose(h_res["loss"], h_full["loss"], rtol=1e-5)
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    out = tmp_path / "resumed"
    assert (out / train.HISTORY_CSV).exists() and (out / train.LOSS_PNG).exists()
    assert "hpe/valid_rate" in pd.read_csv(out / train.HISTORY_CSV).columns
    assert len(list(out.glob(f"{train.CHECKPOINT_PREFIX}*"))) == 1  # older checkpoints pruned
    assert not list(out.glob(".*tmp"))


def test_a_training_with_other_settings_is_set_aside_not_resumed(tmp_path, capsys):
    """Rerunning into a folder whose checkpoint was made with another learning rate trains afresh;
    the old folder is kept beside it and the note names what changed."""
    _, h_part = _fit(tmp_path / "t", max_steps=5, stop_after_steps=3)
    assert train.latest_checkpoint(tmp_path / "t") is not None
    capsys.readouterr()
    _, h_new = _fit(tmp_path / "t", max_steps=5, lr=2e-3)
    _, h_fresh = _fit(tmp_path / "fresh", max_steps=5, lr=2e-3)
    np.testing.assert_allclose(h_new["loss"], h_fresh["loss"], rtol=1e-5)  # trained afresh, not resumed at step 2
    assert "train.lr" in capsys.readouterr().out
    (aside,) = tmp_path.glob("t.replaced-*")
    assert (aside / train.SETTINGS_JSON).exists() and train.latest_checkpoint(aside) is not None
    assert io.read_json(tmp_path / "t" / train.SETTINGS_JSON)["train"]["lr"] == 2e-3


def test_autocast_bf16_runs_the_forward_in_bfloat16_and_keeps_float32_weights(tmp_path):
    """`train.autocast_bf16`: the layers compute in bfloat16 during training steps, the trained
    weights and the held-out checks stay float32, and the loss still falls."""
    backend = TinyBackend.build(make_config("smoke"), spec=MICRO, seed=0)
    seen = {"train": set(), "eval": set()}
    layer = backend.model.model.language_model.layers[0].mlp.down_proj
    layer.register_forward_hook(lambda m, args, out: seen["train" if m.training else "eval"].add(out.dtype))
    _, history = _fit(tmp_path, max_steps=12, backend=backend, autocast_bf16=True, lr=3e-3)
    assert seen == {"train": {torch.bfloat16}, "eval": {torch.float32}}
    assert {p.dtype for p in backend.model.parameters()} == {torch.float32}
    assert history["loss"].iloc[-3:].mean() < history["loss"].iloc[:3].mean()
    _, plain = _fit(tmp_path / "fp32", max_steps=1)
    assert plain["loss"].iloc[0] != history["loss"].iloc[0]  # the flag changes the arithmetic


def test_lora_stage_saves_a_peft_adapter(tmp_path, monkeypatch):
    config = make_config("smoke", {"lora.train.max_steps": 2, "lora.train.eval_every": 2,
                                   "lora.train.eval_samples": 2})
    base = TinyBackend.build(config, spec=MICRO, seed=0)
    base.save(tmp_path / "base")
    monkeypatch.setattr(train, "make_renderer", lambda config, domain=None: FakeRenderer())
    backend, history = train.train_lora(config, tmp_path / "base", "hpe_rehearsal", 0.25, tmp_path / "adapter",
                                        progress=False)
    out = tmp_path / "adapter"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert history["step"].tolist() == [1, 2]
    where = train.io.read_json(out / "metrics.json")["device"]  # where it trained: cpu, or cuda:0 (its name)
    assert where == train.device_name(train.resolve_device(config)) and train.device_name("cpu") == "cpu"
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(TinyBackend.load(tmp_path / "base").model, out)
    n_lora = sum(1 for n, _ in reloaded.named_parameters() if "lora_" in n)
    assert n_lora == sum(1 for n, _ in backend.model.named_parameters() if "lora_" in n) > 0
    # only LoRA weights were trained
    trainable = [n for n, p in backend.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_plus_ratio_gives_the_b_matrices_a_larger_step(tmp_path, monkeypatch):
    """`lora.train.lora_plus_ratio` (LoRA+): B learns at that many times the schedule's rate, A at
    the rate itself. After AdamW's first step (B starts at 0, so A's gradient is 0 and B's step is
    lr x sign), B has moved 16 times as far as with the plain optimiser; a base refuses the setting."""
    from safetensors.torch import load_file

    monkeypatch.setattr(train, "make_renderer", lambda config, domain=None: FakeRenderer())
    base = TinyBackend.build(make_config("smoke"), spec=MICRO, seed=0)
    base.save(tmp_path / "base")
    moved, a_matrices = {}, {}
    for ratio in (1.0, 16.0):
        config = make_config("smoke", {"lora.train.max_steps": 1, "lora.train.eval_samples": 2,
                                       "lora.train.lora_plus_ratio": ratio})
        train.train_lora(config, tmp_path / "base", "hpe", 0.0, tmp_path / f"r{ratio}", progress=False)
        weights = load_file(str(tmp_path / f"r{ratio}" / "adapter_model.safetensors"))
        moved[ratio] = torch.cat([w.abs().flatten() for n, w in weights.items() if "lora_B" in n]).mean()
        a_matrices[ratio] = {n: w for n, w in weights.items() if "lora_A" in n}
    assert float(moved[1.0]) > 0 and float(moved[16.0] / moved[1.0]) == pytest.approx(16.0, rel=0.05)
    assert a_matrices[1.0].keys() == a_matrices[16.0].keys() and a_matrices[1.0]
    for n, w in a_matrices[1.0].items():  # the same initial A, not moved (its gradient was 0)
        torch.testing.assert_close(a_matrices[16.0][n], w)
    with pytest.raises(ValueError, match="base.lora_plus_ratio"):
        make_config("smoke", {"base.lora_plus_ratio": 4.0})


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_smoke_profile_trains_base_and_lora(tmp_path, monkeypatch):
    """The whole training path on real renders with the smoke profile (the CI budget)."""
    monkeypatch.setenv("HPE_DATA_DIR", str(tmp_path / "data"))
    config = make_config("smoke")
    backend, history = train.train_base(config, tmp_path / "run" / "base", progress=False)
    assert (tmp_path / "run" / "base" / "base.json").exists()
    assert train.io.read_json(train.base_cache_dir(config) / train.DONE)["device"] == train.device_name(backend.device)
    again, _ = train.train_base(config, progress=False)  # cached: loads, does not train
    torch.testing.assert_close(next(iter(again.model.parameters())), next(iter(backend.model.parameters())))
    _, lh = train.train_lora(config, train.base_model_dir(config), "hpe", 0.0, tmp_path / "run" / "adapters" / "hpe",
                             progress=False)
    assert (tmp_path / "run" / "adapters" / "hpe" / "adapter_model.safetensors").exists()
    assert "hpe/valid_rate" in lh.columns


@pytest.mark.slow
def test_accelerate_launch_runs_two_processes_of_lora(tmp_path):
    config = make_config("smoke")
    TinyBackend.build(config, spec=MICRO, seed=0).save(tmp_path / "base")
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu, not --cpu: in accelerate 1.x `--cpu --num_processes 2` starts ONE process unless an
    # MPI host file is given; --multi_gpu starts two torchrun ranks, which run on the CPU here (gloo)
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "hpelib.train", "lora",
           "--profile", "smoke", "--base-dir", str(tmp_path / "base"), "--out", str(tmp_path / "adapter"),
           "--rehearsal", "0.25", "--set", "lora.train.max_steps=2", "lora.train.eval_every=2",
           "lora.train.eval_samples=2"]
    env = dict(os.environ, HPE_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    history = pd.read_csv(tmp_path / "adapter" / "history.csv")
    assert history["step"].tolist() == [1, 2]
    assert train.io.read_json(tmp_path / "adapter" / "training" / train.STATUS_JSON)["processes"] == 2


@pytest.mark.usefixtures("data_dir")
def test_base_trains_in_data_parallel_processes_and_reports_their_failure():
    """`base.processes` 2: two torchrun ranks train the base (each half of the batch); a rank that
    fails (here on a corrupt checkpoint) surfaces as an error naming the launch log."""
    config = make_config("smoke", {"base.processes": 2, "base.max_steps": 3, "base.eval_every": 3,
                                   "base.eval_samples": 2, "base.checkpoint_every": 2})
    assert train.base_key(config) != train.base_key(make_config("smoke", {"base.max_steps": 3, "base.eval_every": 3,
                                                                          "base.eval_samples": 2,
                                                                          "base.checkpoint_every": 2}))
    work = train.base_cache_dir(config) / "training"
    corrupt = work / f"{train.CHECKPOINT_PREFIX}0000002"
    corrupt.mkdir(parents=True)
    (corrupt / "state.json").write_text("{}")
    (corrupt / "trainable.safetensors").write_bytes(b"not a safetensors file")
    (work / train.LATEST).write_text(corrupt.name)
    with pytest.raises(RuntimeError, match="launch.log"):
        train.train_base(config, progress=False)
    assert "safetensors" in (work / train.LAUNCH_LOG).read_text().lower()

    (work / train.LATEST).unlink()
    backend, history = train.train_base(config, progress=False)
    assert history["step"].tolist() == [1, 2, 3]
    assert train.io.read_json(work / train.STATUS_JSON)["processes"] == 2
    assert train.io.read_json(train.base_cache_dir(config) / train.DONE)["processes"] == 2
    assert backend.model.config.vision_config.patch_size > 0  # the saved base loads


def test_data_parallel_settings_are_checked(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="base.batch_size must be a multiple of processes"):
        make_config("smoke", {"base.processes": 3})
    with pytest.raises(ValueError, match="lora.train.processes must be 1"):
        make_config("smoke", {"lora.train.processes": 2})
    monkeypatch.setenv("HPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(train, "resolve_device", lambda config: torch.device("cuda"))
    with pytest.raises(ValueError, match="set base.processes 1"):
        train.train_base(make_config("smoke", {"base.processes": 2}), progress=False)


@pytest.mark.usefixtures("data_dir")
def test_adapters_and_evaluation_in_worker_processes_match_one_process(tmp_path):
    """`lora.workers` / `eval.workers` 2 give what one process gives with the same thread count."""
    from hpelib import evaluate, parallel

    threads = parallel.worker_threads(2)
    steps = {"lora.train.max_steps": 3, "lora.train.eval_every": 3, "lora.train.eval_samples": 2}
    config = make_config("smoke", {**steps, "lora.workers": 2, "eval.workers": 2})
    serial = make_config("smoke", {**steps, "lora.workers": 1, "eval.workers": 1})
    TinyBackend.build(config, spec=MICRO, seed=0).save(train.base_model_dir(config))
    (train.base_cache_dir(config) / train.DONE).write_text("{}")

    summary, histories = train.train_adapters(config, tmp_path / "parallel", progress=False)
    assert list(summary["adapter"]) == ["hpe", "hpe_rehearsal"] and set(histories) == {"hpe", "hpe_rehearsal"}
    status = train.io.read_json(tmp_path / "parallel" / "adapters" / "hpe" / "training" / train.STATUS_JSON)
    assert status["step"] == status["total"] == 3
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref_summary, ref_histories = train.train_adapters(serial, tmp_path / "serial", progress=False)
        for name in ("hpe", "hpe_rehearsal"):
            np.testing.assert_allclose(histories[name]["loss"], ref_histories[name]["loss"], rtol=1e-5)
        from safetensors.torch import load_file

        for name in ("hpe", "hpe_rehearsal"):
            a = load_file(tmp_path / "parallel" / "adapters" / name / "adapter_model.safetensors")
            b = load_file(tmp_path / "serial" / "adapters" / name / "adapter_model.safetensors")
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], msg=k)

        variants = evaluate.run_variants(tmp_path / "serial")
        samples = {"synth-train": train.lora_eval_set(config, 2)}
        base = train.load_base(config)
        m_par, t_par = evaluate.evaluate_run(base, variants, samples, config, tmp_path / "eval", progress=False)
        m_ser, t_ser = evaluate.evaluate_run(base, variants, samples, serial, progress=False)
    finally:
        torch.set_num_threads(old)
    assert list(variants["variant"]) == ["base", "lora:hpe", "lora:hpe_rehearsal"]
    assert m_par.keys() == m_ser.keys() and "lora:hpe/synth-train/valid_rate" in m_par
    np.testing.assert_allclose([m_par[k] for k in m_ser], [m_ser[k] for k in m_ser], equal_nan=True)
    assert list(t_par["answer"]) == list(t_ser["answer"])
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["base.csv", "lora:hpe.csv",
                                                                   "lora:hpe_rehearsal.csv"]


@pytest.mark.usefixtures("data_dir")
def test_vision_pretraining_trains_the_tower_before_the_curriculum(tmp_path):
    """`base.vision_minutes`: the tower trains first with the temporary head (its own history and
    checkpoints under training/vision) for `base.vision_steps`, then the base curriculum; a base
    resumed after the vision stage starts from the tower that stage trained."""
    from hpelib import vision_pretrain

    config = make_config("smoke", {"base.vision_minutes": 1.0, "base.vision_steps": 4, "base.max_steps": 3,
                                   "base.eval_every": 3, "base.eval_samples": 2, "base.checkpoint_every": 2})
    assert train.base_key(config) != train.base_key(make_config("smoke", {"base.max_steps": 3, "base.eval_every": 3,
                                                                          "base.eval_samples": 2,
                                                                          "base.checkpoint_every": 2}))
    assert train.base_key(config) != train.base_key(make_config("smoke", {"base.vision_minutes": 1.0,
                                                                          "base.max_steps": 3, "base.eval_every": 3,
                                                                          "base.eval_samples": 2,
                                                                          "base.checkpoint_every": 2}))
    _, history = train.train_base(config, tmp_path / "run" / "base", progress=False)
    vision = train.base_cache_dir(config) / "training" / train.VISION_DIR
    assert train.vision_history(tmp_path / "run" / "base")["step"].tolist() == [1, 2, 3, 4]
    base_json = train.io.read_json(tmp_path / "run" / "base" / "base.json")
    assert base_json["vision"]["steps"] == 4 and base_json["device"] == train.device_name(train.resolve_device(config))
    assert history["step"].tolist() == [1, 2, 3]
    vh = pd.read_csv(vision / train.HISTORY_CSV)
    assert vh["step"].tolist() == [1, 2, 3, 4] and np.isfinite(vh["loss"]).all()
    assert (vision / train.LOSS_PNG).exists() and train.io.read_json(vision / train.DONE)["steps"] == 4

    fresh = TinyBackend.build(config)
    before = {n: p.clone() for n, p in fresh.model.model.visual.named_parameters()}
    train._vision_stage(config, fresh, vision, progress=False)  # done: loads the trained tower
    from safetensors.torch import load_file

    saved = load_file(str(train.latest_checkpoint(vision) / "trainable.safetensors"))
    for n, p in fresh.model.model.visual.named_parameters():
        torch.testing.assert_close(p, saved[f"visual.{n}"], msg=n)
    assert any(not torch.equal(before[n], p) for n, p in fresh.model.model.visual.named_parameters())
    assert not any(k.startswith("head.") for k in dict(TinyBackend.load(train.base_model_dir(config)).model.named_parameters()))

    with pytest.raises(ValueError, match="face parts"):
        vision_pretrain.scene_targets(FakeRenderer().render(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="lora.train.vision_minutes"):
        make_config("smoke", {"lora.train.vision_minutes": 1.0})
    with pytest.raises(ValueError, match="lora.train.vision_steps"):
        make_config("smoke", {"lora.train.vision_steps": 10})
    with pytest.raises(ValueError, match="base.vision_steps"):
        make_config("smoke", {"base.vision_steps": -1})
    with pytest.raises(ValueError, match="base.vision_steps.*vision_minutes > 0"):
        make_config("smoke", {"base.vision_steps": 10})


@pytest.mark.usefixtures("data_dir")
def test_dense_targets_describe_each_cell():
    """`vision_targets = "dense"`: the head's cell holds its box and landmarks (relative to the box),
    each object's cell its box, colour, shape and axis; a scene without landmarks is refused by name."""
    from hpelib import vision_pretrain as vp

    renderer = train.make_renderer(make_config("default"))
    rng = np.random.default_rng(3)
    scenes = [renderer.render(rng) for _ in range(6)]
    scene = max(scenes, key=lambda s: len(s.objects))
    assert scene.objects
    t = vp.dense_targets(scene, 4)
    x0, y0, x1, y1 = scene.box
    col, row = int((x0 + x1) / 2 * 4), int((y0 + y1) / 2 * 4)
    assert t["head_index"] == row * 4 + col and t["head_cell"].sum() == 1 and t["head_cell"][row * 4 + col] == 1
    lm = t["head"][4:].reshape(68, 2) * [x1 - x0, y1 - y0] + [x0, y0]
    np.testing.assert_allclose(lm, scene.meta["landmarks"], atol=1e-5)
    np.testing.assert_allclose(t["head"][:4], scene.box)
    for cell in np.flatnonzero(t["obj_cell"]):
        obj = next(o for o in tasks.scene_objects(scene) if np.allclose(o["box"], t["obj_box"][cell]))
        bx0, by0, bx1, by1 = obj["box"]
        assert int((by0 + by1) / 2 * 4) * 4 + int((bx0 + bx1) / 2 * 4) == cell
        assert vp.COLOUR_NAMES[t["colour"][cell]] == obj["colour"] and vp.SHAPES[t["shape"][cell]] == obj["shape"]
        assert t["axis_mask"][cell] == (obj["shape"] != "sphere" and obj["axis"] is not None)
    assert (t["colour"][t["obj_cell"] == 0] == -1).all()
    with pytest.raises(ValueError, match=r"meta\['landmarks'\]"):
        vp.dense_targets(FakeRenderer().render(np.random.default_rng(0)), 4)


@pytest.mark.usefixtures("data_dir")
def test_dense_vision_pretraining_then_a_frozen_tower(tmp_path):
    """`base.vision_targets = "dense"` trains the tower with the per-token head; `base.freeze_vision`
    then keeps the tower's blocks as that stage left them while the curriculum trains its mergers.
    `base.autocast_bf16` is the curriculum's: the tower's stage stays float32."""
    from safetensors.torch import load_file

    settings = {"base.vision_minutes": 1.0, "base.vision_targets": "dense", "base.max_steps": 2,
                "base.eval_every": 2, "base.eval_samples": 2, "base.checkpoint_every": 2}
    config = make_config("smoke", {**settings, "base.freeze_vision": True, "base.autocast_bf16": True})
    unfrozen = make_config("smoke", settings)
    assert len({train.base_key(config), train.base_key(unfrozen),
                train.base_key(make_config("smoke", {**settings, "base.vision_targets": "boxes"}))}) == 3
    backend, _ = train.train_base(config, tmp_path / "base", progress=False)
    vision = train.base_cache_dir(config) / "training" / train.VISION_DIR
    vh = pd.read_csv(vision / train.HISTORY_CSV)
    assert vh["step"].tolist() == [1, 2] and np.isfinite(vh["loss"]).all()
    autocast = {stage: json.loads((folder / "settings.json").read_text())["train"]["autocast_bf16"]
                for stage, folder in (("vision", vision), ("curriculum", vision.parent))}
    assert autocast == {"vision": False, "curriculum": True}
    tower = load_file(str(train.latest_checkpoint(vision) / "trainable.safetensors"))
    from hpelib import vision_pretrain as vp

    assert tower["head.2.weight"].shape[0] == vp.DENSE_OUT  # the per-token head trained, not V1's
    fresh = TinyBackend.build(config).model.model.visual
    changed = {"blocks": 0, "merger": 0}
    for n, p in backend.model.model.visual.named_parameters():
        if "merger" in n:
            changed["merger"] += not torch.equal(p, tower[f"visual.{n}"])
        else:
            torch.testing.assert_close(p, tower[f"visual.{n}"], msg=n)  # frozen after the vision stage
            changed["blocks"] += not torch.equal(p, dict(fresh.named_parameters())[n])
    assert changed["merger"] > 0 and changed["blocks"] > 0


def test_the_base_key_knows_a_conv_stem_and_leaves_plain_bases_keys_alone(monkeypatch):
    """`TinySpec.stem` came after bases were cached: a conv stem is a new base, a plain one keeps its
    key (the stem's widths are unused and not part of it)."""
    import functools

    from hpelib.backends import tiny

    config = make_config("quick")
    plain = train.base_key(config)
    monkeypatch.setattr(tiny, "TinySpec", functools.partial(TinySpec, stem="conv"))
    assert train.base_key(config) != plain
    monkeypatch.setattr(tiny, "TinySpec", functools.partial(TinySpec, stem_widths=[8, 8, 8]))
    assert train.base_key(config) == plain


def test_how_the_batches_are_made_is_not_part_of_the_base_key():
    config = make_config("default")
    for overrides in ({"base.prefetch": False}, {"base.prefetch_workers": 4}):
        assert train.base_key(make_config("default", overrides)) == train.base_key(config), overrides
    with pytest.raises(ValueError, match="prefetch_workers"):
        make_config("default", {"base.prefetch_workers": 0})


def test_bf16_autocast_is_a_new_base_and_leaves_cached_bases_keys_alone():
    """The keys of the bases the docs and profiles name stay as they were: the float32 ones trained
    before `autocast_bf16` existed (`quick`, the default before it was the curriculum's) and the
    default's, whose curriculum runs under autocast; a base trained under autocast is a new one. If a
    deliberate change re-keys every base (a new task word, BASE_VERSION), update the keys here and say
    so in the commit."""
    assert train.base_key(make_config("quick")) == "cf8ff0410dca"
    assert train.base_key(make_config("pose")) == train.base_key(make_config("default")) == "d33d04b1667d"
    assert train.base_key(make_config("default", FOUR_LAYERS)) == "400f6e4f160a"
    assert train.base_key(make_config("default", FLOAT32_2000)) == "d589255fb8b1"
    assert train.base_key(make_config("quick", {"base.autocast_bf16": True})) != "cf8ff0410dca"

def test_model_tiny_spec_builds_that_model_and_is_its_base_key(monkeypatch):
    """`model.tiny_spec` is the parameter for the tiny model's shape: the base built has it, and the
    base key is the one the same TinySpec gave before the parameter existed (set by patching the
    class, as the experiments did), so cached bases serve."""
    import functools

    from hpelib.backends import tiny

    fields = {"stem": "conv", "angle_circle": 5.0, "vision_depth": 2}
    config = make_config("smoke", {"model.tiny_spec": fields})
    backend = tiny.TinyBackend.build(config)
    assert (backend.spec.stem, backend.spec.angle_circle, backend.spec.vision_depth) == ("conv", 5.0, 2)
    assert len(backend.model.model.visual.blocks) == 2
    assert isinstance(backend.model.model.visual.patch_embed.stem, tiny.ConvStem)
    by_parameter = train.base_key(config)
    assert by_parameter != train.base_key(make_config("smoke"))
    monkeypatch.setattr(tiny, "TinySpec", functools.partial(TinySpec, **fields))
    assert train.base_key(make_config("smoke")) == by_parameter


def test_model_tiny_spec_refuses_what_tiny_spec_does():
    with pytest.raises(ValueError, match=r"model\.tiny_spec = \{'stme': 'conv'\}.*unexpected keyword argument 'stme'"):
        make_config("default", {"model.tiny_spec": {"stme": "conv"}})
    with pytest.raises(ValueError, match=r"model\.tiny_spec.*TinySpec\.stem must be one of"):
        make_config("default", {"model.tiny_spec": {"stem": "cnn"}})
    with pytest.raises(ValueError, match=r"model\.tiny_spec must be empty when model\.backend is 'qwen2_vl'"):
        make_config("default", {"model.tiny_spec": {"stem": "conv"}, "model.backend": "qwen2_vl", "model.model_id": "x"})
    with pytest.raises(ValueError, match=r"default profile sets it .* --profile gpu, real or quick"):
        make_config("default", {"model.backend": "qwen2_vl", "model.model_id": "x"})
    assert make_config("default", {"model.backend": "qwen2_vl", "model.model_id": "x", "model.tiny_spec": {}}).model.tiny_spec == {}


def test_the_pose_profile_reuses_the_base_its_numbers_came_from():
    """The `pose` and `default` profiles' base is DC1 of docs/tiny_backend.md, trained by `tiny_experiment.py base
    --spec '{"stem": "conv", "angle_circle": 5}' --set base.vision_minutes=10 ...`, with cube poses in its
    curriculum since the fourteenth session (`base.object_pose 0.1`, OP1) and its tower trained for 2600
    steps since the fifteenth (`base.vision_steps`, VS1), and since the sixteenth a curriculum (`base.mix`)
    with objects listed (LA; before it objects 40 % of the curriculum, OA, cached by `tiny_experiment.py base
    --base-mix ...`), 2000 steps of it since the seventeenth (1300 before), and 2600 under bf16 autocast since
    the eighteenth (`tiny_experiment.py base --set base.autocast_bf16=true ...`), with six decoder layers since
    the nineteenth (`tiny_experiment.py base --spec '{"stem": "conv", "angle_circle": 5, "layers": 6}'`,
    L6): the same keys."""
    dc1 = {"model.tiny_spec": {"stem": "conv", "angle_circle": 5}, "base.vision_minutes": 10,
           "base.vision_targets": "dense", "base.freeze_vision": True, "base.minutes": 18}
    op1 = {**dc1, "base.object_pose": 0.1}
    vs1 = {**op1, "base.vision_steps": 2600, "base.vision_minutes": 15}
    la = {"box": 0.4, "box_object": 0.2, "box_list": 0.2, "orient": 0.1, "colour": 0.05, "count": 0.05}
    b16 = {**vs1, "base.mix": la, "base.autocast_bf16": True, "base.max_steps": 2600, "base.minutes": 17}
    assert train.base_key(make_config("default", FOUR_LAYERS)) == train.base_key(make_config("quick", b16))
    l6 = {**b16, "model.tiny_spec": {"stem": "conv", "angle_circle": 5, "layers": 6}}
    assert train.base_key(make_config("pose")) == train.base_key(make_config("default")) == train.base_key(
        make_config("quick", l6))
    assert train.base_key(make_config("default", FLOAT32_2000)) == train.base_key(
        make_config("quick", {**vs1, "base.mix": la, "base.max_steps": 2000}))
    steps = {**FLOAT32_2000, "base.max_steps": 1300}
    assert train.base_key(make_config("default", steps)) == train.base_key(
        make_config("quick", {**vs1, "base.mix": la}))  # `quick`'s base.max_steps: 1300
    oa = {"box": 0.4, "box_object": 0.2, "orient": 0.2, "colour": 0.1, "count": 0.1}
    assert train.base_key(make_config("default", {**steps, "base.mix": oa})) == train.base_key(
        make_config("quick", {**vs1, "base.mix": oa}))
    assert train.base_key(make_config("default", {**steps, "base.mix": {}})) == train.base_key(make_config("quick", vs1))
    before = {**steps, "base.vision_steps": 0, "base.vision_minutes": 10, "base.mix": {}}
    assert train.base_key(make_config("default", before)) == train.base_key(make_config("quick", op1))
    assert (train.base_key(make_config("default", {**before, "base.object_pose": 0}))
            == train.base_key(make_config("quick", dc1)))
    assert make_config("pose").lora.train.minutes > make_config("default").lora.train.minutes
