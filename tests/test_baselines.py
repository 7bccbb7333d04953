"""The baselines: 6D head, geodesic loss, RepVGG re-parameterisation, a short training run,
safetensors round trip, MediaPipe's angle conversion, and the flat metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from numpy.testing import assert_allclose

from hpelib import baselines as B
from hpelib.geometry import euler_to_matrix, geodesic_distance, matrix_to_euler

TINY = B.CNNConfig(widths=(8, 8, 16), depths=(1, 2, 1), image_size=32)


@pytest.fixture(autouse=True)
def _one_thread():
    # two cores shared by many processes: more threads only add contention
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- 6D head and loss
def test_6d_head_gives_rotations():
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    R = B.rotation_from_6d(x)
    eye = torch.eye(3, dtype=torch.float64).expand(256, 3, 3)
    assert_allclose(R.transpose(1, 2) @ R, eye, atol=1e-12)
    assert_allclose(torch.linalg.det(R), np.ones(256), atol=1e-12)


def test_6d_head_keeps_a_rotations_first_two_columns():
    # 6DRepNet's convention: the 6 numbers are columns 0 and 1 of the matrix
    R = euler_to_matrix([10.0, -70.0], [20.0, 5.0], [-30.0, 80.0])
    x = torch.from_numpy(np.concatenate([R[:, :, 0], R[:, :, 1]], axis=1))
    assert_allclose(B.rotation_from_6d(x).numpy(), R, atol=1e-12)


def test_gradient_flows_through_gram_schmidt():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    target = torch.from_numpy(euler_to_matrix(np.linspace(-60, 60, 8), 10.0, -5.0)).float()
    B.geodesic_loss(B.rotation_from_6d(x), target).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.abs().sum(dim=1) > 0).all()  # every sample's 6 numbers get a gradient


def test_geodesic_loss_zero_for_equal_and_pi_for_opposite():
    R = torch.from_numpy(euler_to_matrix([0.0, 30.0, -80.0], [0.0, -20.0, 45.0], [0.0, 10.0, 170.0]))
    assert B.geodesic_loss(R, R).item() == pytest.approx(0.0, abs=1e-3)  # acos(1 - 1e-7) ~ 4.5e-4
    flip = torch.from_numpy(euler_to_matrix(0.0, 0.0, 180.0))  # 180 deg about the view axis
    assert B.geodesic_loss(R, R @ flip).item() == pytest.approx(math.pi, abs=1e-3)
    assert B.GeodesicLoss()(R, R @ flip).item() == pytest.approx(math.pi, abs=1e-3)


def test_geodesic_loss_matches_the_geometry_module():
    rng = np.random.default_rng(2)
    a = euler_to_matrix(*rng.uniform(-80, 80, (3, 16)))
    b = euler_to_matrix(*rng.uniform(-80, 80, (3, 16)))
    loss = B.geodesic_loss(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert math.degrees(loss) == pytest.approx(geodesic_distance(a, b).mean(), abs=1e-3)


def test_6drepnet_euler_formulas_are_the_project_convention():
    # sixdrepnet/utils.py compute_euler_angles_from_rotation_matrices: x = pitch, y = yaw, z = roll
    yaw, pitch, roll = np.array([35.0, -60.0]), np.array([-20.0, 15.0]), np.array([10.0, -40.0])
    R = euler_to_matrix(yaw, pitch, roll)
    x = np.degrees(np.arctan2(R[:, 2, 1], R[:, 2, 2]))
    y = np.degrees(np.arctan2(-R[:, 2, 0], np.hypot(R[:, 0, 0], R[:, 1, 0])))
    z = np.degrees(np.arctan2(R[:, 1, 0], R[:, 0, 0]))
    assert_allclose(np.stack([y, x, z]), np.stack([yaw, pitch, roll]), atol=1e-9)


def test_flip_negates_yaw_and_roll():
    # mirroring the image is F R F with F = diag(-1, 1, 1): the augmentation's label rule
    F = np.diag([-1.0, 1.0, 1.0])
    R = euler_to_matrix(40.0, -15.0, 25.0)
    assert_allclose(np.stack(matrix_to_euler(F @ R @ F)), [-40.0, -15.0, -25.0], atol=1e-9)


# --------------------------------------------------------------------------- RepVGG
def test_repvgg_reparameterisation_gives_the_same_output():
    torch.manual_seed(0)
    model = B.SixDRepNetLite(TINY)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    fused = B.reparameterized(model)
    assert_allclose(fused(x).detach().numpy(), model(x).detach().numpy(), atol=1e-5)
    assert all(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
               for b in fused.modules() if isinstance(b, B.RepVGGBlock) for m in b.children())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched


def test_config_is_validated():
    with pytest.raises(ValueError, match="image_size"):
        B.CNNConfig(widths=(8, 8, 8), depths=(1, 1, 1), image_size=4)
    with pytest.raises(ValueError, match="same length"):
        B.CNNConfig(widths=(8, 8), depths=(1,))


# --------------------------------------------------------------------------- crops and training
def test_crop_head_takes_the_expanded_box():
    img = np.zeros((100, 200, 3), np.uint8)
    img[20:60, 50:150] = 255  # the box (0.25, 0.2, 0.75, 0.6)
    crop = B.crop_head(img, (0.25, 0.2, 0.75, 0.6), 16, expansion="tight")
    assert crop.shape == (16, 16, 3) and crop.min() == 255
    loose = B.crop_head(img, (0.25, 0.2, 0.75, 0.6), 16, expansion="300wlp", k=0.3)
    # 300W-LP coefficients: 2k of the height above, 0.6k below and 0.6k on each side, so the box's
    # 40 x 100 px fill (40 / 75) x (100 / 139) of the crop: y in [-4, 71], x in [32, 171]
    white = loose.min(axis=2) > 127
    assert white.mean() == pytest.approx((40 / 75) * (100 / 139), abs=0.05)
    assert loose[:4].max() == 0 and white[8, 8]


def _toy_source(rng: np.random.Generator):
    """A head stand-in whose brighter half tells the yaw's sign (flips stay consistent)."""
    yaw = float(rng.choice([-50.0, 50.0]))
    img = np.full((48, 48, 3), 40, np.uint8)
    if yaw > 0:
        img[8:40, 24:40] = 230
    else:
        img[8:40, 8:24] = 230
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return img, (0.15, 0.15, 0.85, 0.85), yaw, 0.0, 0.0


def test_training_lowers_the_loss_and_round_trips(tmp_path):
    model, hist = B.train_cnn(_toy_source, minutes=1.0, max_steps=60, batch_size=16, lr=3e-3, seed=0,
                              eval_source=_toy_source, n_eval=32, eval_every=20, pool_size=64,
                              config=TINY, augment=B.AugmentConfig(blur=0.0), out_dir=tmp_path,
                              progress=False)
    assert list(hist["step"]) == [20, 40, 60]
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    assert hist["eval_mae_yaw"].min() < 35.0  # chance on +-50 deg is ~50
    assert hist.attrs["stopped"] == "max_steps" and hist.attrs["train_seconds"] > 0
    assert (tmp_path / "cnn6d_log.csv").is_file()
    logged = pd.read_csv(tmp_path / "cnn6d_log.csv")
    assert list(logged["step"]) == [20, 40, 60]

    # safetensors round trip, train-time and re-parameterised
    loaded = B.load_cnn(tmp_path / "cnn6d.safetensors")
    x = torch.randn(3, 3, 32, 32)
    assert_allclose(loaded(x).detach().numpy(), model(x).detach().numpy(), atol=1e-6)
    B.save_cnn(B.reparameterized(model), tmp_path / "fused.safetensors")
    assert_allclose(B.load_cnn(tmp_path / "fused.safetensors")(x).detach().numpy(),
                    model(x).detach().numpy(), atol=1e-5)

    # predict_cnn on raw images and relative boxes
    samples = [_toy_source(np.random.default_rng(i)) for i in range(6)]
    pred = B.predict_cnn(model, [s[0] for s in samples], [s[1] for s in samples])
    assert pred.shape == (6, 3) and np.isfinite(pred).all()


def test_patience_stops_early():
    _, hist = B.train_cnn(_toy_source, minutes=1.0, max_steps=1000, batch_size=4, lr=1e-9, seed=0,
                          eval_source=_toy_source, n_eval=8, eval_every=2, patience=2, min_delta=1.0,
                          pool_size=16, config=TINY, progress=False)
    assert hist.attrs["stopped"] == "converged" and hist.attrs["steps"] == 6


def test_snapshot_is_the_model_a_shorter_run_returns(tmp_path):
    # one run to 40 steps with a snapshot at 20 against a separate 20-step run of the same seed:
    # same draws up to step 20 (constant lr), so the same weights (cnn6d@budget from cnn6d@converged)
    kw = dict(minutes=1.0, batch_size=8, lr=3e-3, seed=3, eval_source=_toy_source, n_eval=16,
              eval_every=10, pool_size=32, config=TINY, augment=B.AugmentConfig(blur=0.0), progress=False)
    long_model, hist = B.train_cnn(_toy_source, max_steps=40, out_dir=tmp_path / "long", name="long",
                                   snapshot_steps=20, snapshot_name="short", **kw)
    short_model, short_hist = B.train_cnn(_toy_source, max_steps=20, out_dir=tmp_path / "sep", name="sep", **kw)
    snap = hist.attrs["snapshot"]
    assert snap["steps"] == 20 and snap["best_step"] == short_hist.attrs["best_step"]
    assert hist.attrs["steps"] == 40
    x = torch.randn(2, 3, 32, 32)
    expected = short_model(x).detach().numpy()
    assert_allclose(B.load_cnn(tmp_path / "long" / "short.safetensors")(x).detach().numpy(), expected, atol=1e-6)
    assert_allclose(B.load_cnn(tmp_path / "sep" / "sep.safetensors")(x).detach().numpy(), expected, atol=1e-6)
    assert not np.allclose(long_model(x).detach().numpy(), expected)  # the long run went on training
    with pytest.raises(ValueError, match="snapshot_name"):
        B.train_cnn(_toy_source, max_steps=2, snapshot_steps=1, snapshot_name="cnn6d", config=TINY, progress=False)


def test_patience_waits_for_the_snapshot():
    _, hist = B.train_cnn(_toy_source, minutes=1.0, max_steps=1000, batch_size=4, lr=1e-9, seed=0,
                          eval_source=_toy_source, n_eval=8, eval_every=2, patience=2, min_delta=1.0,
                          pool_size=16, config=TINY, snapshot_steps=10, snapshot_name="early", progress=False)
    assert hist.attrs["stopped"] == "converged" and hist.attrs["steps"] == 10
    assert hist.attrs["snapshot"]["steps"] == 10


def _toy_manifest(folder, n: int = 4) -> pd.DataFrame:
    """`n` toy heads saved as PNG files, as a manifest frame (the columns `prepare` writes)."""
    from PIL import Image

    rows = []
    for i in range(n):
        img, box, yaw, pitch, roll = _toy_source(np.random.default_rng(i))
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append({"image": str(folder / f"{i}.png"), "yaw": yaw, "pitch": pitch, "roll": roll,
                     "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "domain": "toy"})
    return pd.DataFrame(rows)


def test_a_manifest_frame_is_a_source(tmp_path):
    frame = _toy_manifest(tmp_path)
    img, box, yaw, *_ = B.frame_source(frame)(np.random.default_rng(0))
    assert img.shape == (48, 48, 3) and yaw in (-50.0, 50.0)
    _, hist = B.train_cnn(frame, minutes=1.0, max_steps=2, batch_size=4, config=TINY, progress=False)
    assert hist.attrs["steps"] == 2
    with pytest.raises(ValueError, match="lacks columns"):
        B.frame_source(frame.drop(columns=["yaw"]))


def test_baselines_train_once_into_the_cache_and_copy_into_each_run(tmp_path, monkeypatch):
    from hpelib.config import make_config

    monkeypatch.setenv("HPE_DATA_DIR", str(tmp_path / "data"))
    datasets = {"train": {"toy": _toy_manifest(tmp_path)}}
    overrides = {"lora.train.max_steps": 2, "baselines.cnn_converged_minutes": 0, "baselines.cnn_image_size": 32,
                 "baselines.cnn_batch_size": 4, "eval.n_samples": 4}
    config = make_config("smoke", overrides)
    first = B.train_baselines(config, tmp_path / "run1", datasets, progress=False)
    assert list(first["variant"]) == [B.CNN_BUDGET] and not first["cached"].iloc[0]
    assert first["steps"].iloc[0] == 2
    cache = tmp_path / "data" / "cache" / f"baselines-{B.baselines_key(config)}"
    assert (cache / f"{B.CNN_BUDGET}.safetensors").is_file()

    # another run whose baselines settings are the same (LoRA rank differs): copied, not trained
    again = make_config("smoke", {**overrides, "lora.rank": 4})
    assert B.baselines_key(again) == B.baselines_key(config)
    second = B.train_baselines(again, tmp_path / "run2", datasets, progress=False)
    assert second["cached"].iloc[0] and second["path"].iloc[0] == str(tmp_path / "run2" / "baselines" /
                                                                      f"{B.CNN_BUDGET}.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert_allclose(B.load_cnn(second["path"].iloc[0])(x).detach().numpy(),
                    B.load_cnn(first["path"].iloc[0])(x).detach().numpy())

    # the LoRA budget defines cnn6d@budget: a new budget is a new key
    assert B.baselines_key(make_config("smoke", {**overrides, "lora.train.max_steps": 3})) != B.baselines_key(config)


# --------------------------------------------------------------------------- MediaPipe
def test_mediapipe_matrix_conversion_is_pure_rotation():
    R = euler_to_matrix(25.0, -10.0, 5.0)
    M = np.eye(4)
    M[:3, :3] = 1.7 * R  # MediaPipe's matrix carries the face model's scale
    M[:3, 3] = [1.0, -2.0, -40.0]
    assert_allclose(np.stack(B.mediapipe_matrix_to_euler(M)), [25.0, -10.0, 5.0], atol=1e-9)
    C = euler_to_matrix(0.0, -12.0, 0.0)
    assert_allclose(np.stack(B.mediapipe_matrix_to_euler(R, head_frame=C)), [25.0, -22.0, 5.0], atol=1e-6)


def test_calibrate_head_frame_recovers_a_fixed_offset():
    rng = np.random.default_rng(3)
    gt = rng.uniform(-50, 50, (40, 3))
    C = euler_to_matrix(3.0, 13.0, -2.0)
    pred = np.stack(matrix_to_euler(euler_to_matrix(*gt.T) @ C.T), axis=1)  # pred = gt @ C^-1
    assert_allclose(B.calibrate_head_frame(pred, gt), C, atol=1e-9)


def _mediapipe_or_skip():
    ok, why = B.mediapipe_available()
    if not ok:
        pytest.skip(f"the optional extra is not installed: {why}")
    try:
        from hpelib.data.synth import SceneRenderer

        renderer = SceneRenderer("synth-aflw", 256)
        params = renderer.sample(np.random.default_rng(1))
        renderer.draw(params)
    except Exception as e:  # no EGL, no head scan
        pytest.skip(f"SynthHeads cannot render here ({type(e).__name__}: {e})")
    try:
        B.mediapipe_model_path()
    except Exception as e:
        pytest.skip(f"the FaceLandmarker model file is not available: {e}")
    return renderer, params


def test_mediapipe_conversion_on_rendered_heads():
    """Pins MediaPipe's matrix to the project convention: yaw and roll signs and sizes agree on
    rendered heads of known pose; pitch carries the two heads' frame offset (~+10 deg)."""
    from hpelib.data.synth import with_pose

    renderer, params = _mediapipe_or_skip()
    poses = np.array([(0, 0, 0), (35, 0, 0), (-35, 0, 0), (0, 0, 25), (0, 0, -25), (20, 15, -10)], float)
    scenes = [renderer.draw(with_pose(params, *p)) for p in poses]
    pred = B.mediapipe_pose([s.image for s in scenes], [s.box for s in scenes])
    assert pred["detected"].all()
    got = pred[["yaw", "pitch", "roll"]].to_numpy()
    assert_allclose(got[:, 0], poses[:, 0], atol=10.0)  # yaw
    assert_allclose(got[:, 2], poses[:, 2], atol=10.0)  # roll
    assert np.all(np.abs(got[:, 1] - poses[:, 1]) < 25.0)  # pitch: offset + MediaPipe's noise
    assert np.sign(got[1, 0]) == 1 and np.sign(got[2, 0]) == -1  # no mirror: yaw keeps its sign
    assert np.sign(got[3, 2]) == 1 and np.sign(got[4, 2]) == -1
    # a head-frame calibration on the first poses lowers the pitch error on all of them
    # (what mediapipe_pose(head_frame=C) returns: R_mediapipe @ C)
    C = B.calibrate_head_frame(got[:3], poses[:3])
    fixed = np.stack(matrix_to_euler(euler_to_matrix(*got.T) @ C), axis=1)
    assert np.abs(fixed[:, 1] - poses[:, 1]).mean() < np.abs(got[:, 1] - poses[:, 1]).mean()


# --------------------------------------------------------------------------- metrics
def test_baseline_metrics_flat_keys_coverage_and_wrap():
    gt = pd.DataFrame({"yaw": [179.0, 10.0, 0.0, 0.0], "pitch": [0.0, 0.0, 0.0, 179.9], "roll": [0.0] * 4})
    cnn = np.array([[-179.0, 0.0, 0.0], [12.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    mp_pred = pd.DataFrame({"yaw": [np.nan, 10.0, 0.0, 0.0], "pitch": [np.nan, 0.0, 0.0, 0.0],
                            "roll": [np.nan, 0.0, 0.0, 0.0], "detected": [False, True, True, True]})
    m = B.baseline_metrics({"cnn6d@converged": {"synth-aflw": cnn}, "mediapipe": {"synth-aflw": mp_pred}},
                           {"synth-aflw": gt}, train_seconds={"cnn6d@converged": 12.5}, max_abs_angle=179.5)
    assert m["cnn6d@converged/synth-aflw/n_filtered"] == 1  # pitch 179.9 is out of the protocol
    assert m["cnn6d@converged/synth-aflw/n"] == 3
    assert m["cnn6d@converged/synth-aflw/mae_yaw"] == pytest.approx((2.0 + 2.0 + 0.0) / 3)  # wrap-aware
    assert m["cnn6d@converged/synth-aflw/mae_pitch"] == pytest.approx(1.0)
    assert m["cnn6d@converged/synth-aflw/coverage"] == 1.0
    assert m["cnn6d@converged/synth-aflw/train_seconds"] == 12.5
    assert m["mediapipe/synth-aflw/coverage"] == pytest.approx(2 / 3)
    assert "mediapipe/synth-aflw/train_seconds" not in m

    rel = B.relative_to_baseline({**m, "wta_cosine@0.9999/synth-aflw/mae_mean": 0.5})
    ref = m["cnn6d@converged/synth-aflw/mae_mean"]
    assert rel["wta_cosine@0.9999/synth-aflw/vs_cnn6d"] == pytest.approx((0.5 - ref) / ref)
    assert rel["mediapipe/synth-aflw/vs_cnn6d"] == pytest.approx((m["mediapipe/synth-aflw/mae_mean"] - ref) / ref)
    assert "cnn6d@converged/synth-aflw/vs_cnn6d" not in rel
    assert "wta_cosine@0.9999/synth-aflw/vs_cnn6d" not in m  # the input is not modified
