"""SynthHeads: the head asset, the renderer's conventions and labels, and splits on disk.

The head scan is fetched (or taken from the repository's own data/assets) once per session; every
test then points HPE_DATA_DIR at its own temporary folder, with the scan linked into it.
"""

from __future__ import annotations

import io as _io
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from hpelib import plots, prompts
from hpelib.data import assets, render, synth
from hpelib.geometry import euler_to_matrix

SIZE = 64  # small renders keep the whole file at a few seconds


def _plain(params: synth.SceneParams, yaw: float, pitch: float, roll: float) -> synth.SceneParams:
    """The scene's head alone, centred, frontal light, grey background, at the given pose."""
    p = synth.with_pose(params, yaw, pitch, roll)
    head = p.draw.instances[0]
    d = -head.translation[2]
    head = render.Instance("head", head.rotation, (0.0, 0.0, -d), color=(1, 1, 1))
    draw = render.DrawSpec(fov_deg=p.draw.fov_deg, background=render.Background("solid", ((0.5, 0.5, 0.5),) * 2),
                           light=render.Light((0.0, 0.0, 1.0), 0.5, 0.6), instances=[head])
    return synth.SceneParams(p.domain, draw, yaw, pitch, roll, [], p.meta)


# --------------------------------------------------------------------------- the asset
def _fake_sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))
    return path


def test_head_assets_have_their_published_hashes(head_assets):
    assets.verify_assets(head_assets)
    assert sorted(p.name for p in head_assets.iterdir()) == sorted(assets.ASSET_MEMBERS.values())
    assert "Redistribution and use in source and binary forms" in (head_assets / "LICENSE.txt").read_text()


def test_wrong_sha_raises_with_the_manual_step(tmp_path):
    sdist = _fake_sdist(tmp_path / assets.MENPO3D_SDIST, {"x": b"not menpo3d"})
    with pytest.raises(RuntimeError, match="SHA-256 mismatch") as e:
        assets.verify_sdist(sdist)
    assert "pip download" in str(e.value) and assets.MENPO3D_SHA256 in str(e.value)


def test_corrupt_local_asset_is_refused(tmp_path, head_assets):
    for name in assets.ASSET_MEMBERS.values():
        (tmp_path / name).write_bytes((head_assets / name).read_bytes())
    (tmp_path / "james.obj.mtl").write_text("tampered")
    with pytest.raises(RuntimeError, match="james.obj.mtl"):
        assets.verify_assets(tmp_path)


def test_extract_takes_only_the_asset_files(tmp_path):
    members = {m: m.encode() for m in assets.ASSET_MEMBERS}
    members["menpo3d-0.8.6/setup.py"] = b"print()"
    sdist = _fake_sdist(tmp_path / "s.tar.gz", members)
    out = assets.extract_assets(sdist, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(assets.ASSET_MEMBERS.values())
    assert (out / "james.obj").read_bytes() == b"menpo3d-0.8.6/menpo3d/data/james.obj"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_pip_failure_gives_the_manual_step(tmp_path, monkeypatch):
    monkeypatch.setenv("HPE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(assets, "pip_download_command",
                        lambda dest: [sys.executable, "-c", "import sys; print('no index'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match="could not download") as e:
        assets.head_mesh_files()
    assert "no index" in str(e.value) and "--no-binary :all:" in str(e.value)
    assert str(tmp_path / "assets" / "menpo3d") in str(e.value)
    assert not (tmp_path / "assets" / "menpo3d").exists()


# --------------------------------------------------------------------------- renderer
def test_missing_egl_names_the_packages():
    def broken(**kwargs):
        raise Exception("libEGL.so.1: cannot open shared object file")

    with pytest.raises(render.RenderError, match="libegl1 libegl-mesa0 libgl1-mesa-dri"):
        render.create_context(broken)


def test_fast_rotation_matches_geometry():
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in rng.uniform(-99, 99, (50, 3)):
        np.testing.assert_allclose(synth.rotation(yaw, pitch, roll), euler_to_matrix(yaw, pitch, roll), atol=1e-12)


def test_canonical_head_frame(data_dir):
    mesh = render.get_head_mesh(render.head_cell(SIZE))
    head = mesh.positions[mesh.part == render.ID_HEAD]
    np.testing.assert_allclose([head[:, 1].min(), head[:, 1].max()], [-1, 1], atol=0.05)  # decimated
    nose = mesh.nose_tip
    assert nose[2] > 0.5 and abs(nose[0]) < 0.05  # the face looks along +z, nose on the midline
    lm = mesh.landmarks
    assert lm[render.LANDMARK_GROUPS["reye"]].mean(0)[0] > lm[render.LANDMARK_GROUPS["leye"]].mean(0)[0]


def test_same_rng_same_scene(data_dir):
    r = synth.SceneRenderer("synth-aflw", SIZE)
    a = r.render(synth.scene_rng("synth-aflw", "test", 0, 3))
    b = synth.SceneRenderer("synth-aflw", SIZE).render(synth.scene_rng("synth-aflw", "test", 0, 3))
    c = r.render(synth.scene_rng("synth-aflw", "test", 0, 4))
    assert np.array_equal(a.image, b.image) and a.box == b.box and a.objects == b.objects
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("domain", list(synth.DOMAINS))
def test_labels_agree_with_pixels(data_dir, domain):
    r = synth.SceneRenderer(domain, SIZE)
    for i in range(12):
        s = r.render(synth.scene_rng(domain, "test", 1, i))
        spec = synth.DOMAINS[domain]
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        for angle, dist in (("yaw", spec.yaw), ("pitch", spec.pitch), ("roll", spec.roll)):
            assert abs(getattr(s, angle)) <= dist.limit <= 99
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        # the box is exactly the box of the head's pixels
        ys, xs = np.nonzero(s.ids == render.ID_HEAD)
        assert (xs.min() / SIZE, ys.min() / SIZE, (xs.max() + 1) / SIZE, (ys.max() + 1) / SIZE) == s.box
        # the projected head centre and (visible or not) nose tip lie in it, within 2 px
        tol = 2 / SIZE
        for x, y in (s.meta["center_xy"], s.meta["nose_xy"]):
            assert x0 - tol <= x <= x1 + tol and y0 - tol <= y <= y1 + tol, (i, s.box, x, y)
        names = [o["name"] for o in s.objects]
        assert len(names) == len(set(names))
        for o in s.objects:
            assert o["name"] == f"{o['color']} {o['shape']}" and o["shape"] in synth.SHAPES
            assert o["pixels"] >= r.min_object_pixels
            np.testing.assert_allclose(o["axis"], synth.rotation(o["yaw"], o["pitch"], o["roll"])[:, 1], atol=1e-4)


def test_face_part_boxes_sit_in_the_head_and_follow_the_pose(data_dir):
    from hpelib.data import tasks

    r = synth.SceneRenderer("synth-train", 128)
    base = r.sample(synth.scene_rng("synth-train", "test", 0, 0))
    frontal, right = r.draw(_plain(base, 0, 0, 0)), r.draw(_plain(base, 40, 0, 0))
    tol = 2 / 128
    for s in (frontal, right):
        parts = s.meta["parts"]
        assert set(parts) == set(synth.FACE_PARTS) == set(tasks.PART_WORDS)  # the tokenizer knows every part
        x0, y0, x1, y1 = s.box
        for name, (a, b, c, d) in parts.items():
            assert x0 - tol <= a < c <= x1 + tol and y0 - tol <= b < d <= y1 + tol, name
        # top to bottom in an upright face: eyes, nose tip region, mouth
        assert parts["eyes"][1] < parts["mouth"][1] and parts["nose"][3] <= parts["mouth"][3]
    centre = lambda b: (b[0] + b[2]) / 2  # noqa: E731
    assert centre(right.meta["parts"]["nose"]) > centre(frontal.meta["parts"]["nose"])  # yaw + turns to image right
    # mirroring maps every part onto the mirrored box of the same part (each is left-right symmetric)
    mirrored = tasks.mirror_scene(right)
    for name, (a, b, c, d) in right.meta["parts"].items():
        np.testing.assert_allclose(mirrored.meta["parts"][name], [1 - c, b, 1 - a, d])
    sample = tasks.task_part(right, np.random.default_rng(0))
    assert sample.task == "box" and sample.meta["target_kind"] == "part"
    assert sample.prompt == f"Where is the {sample.meta['target']}?"


def test_landmarks_follow_the_pose_and_mirror_onto_the_mirrored_pose(data_dir):
    """`meta["landmarks"]`: 68 image points of the head; the mirror of a head at (yaw, pitch, roll)
    has the landmarks of the head at (-yaw, pitch, -roll), each under its own index (the left eye's
    points become the right eye's: `render.landmark_mirror`)."""
    from hpelib.data import tasks

    r = synth.SceneRenderer("synth-train", 128)
    base = r.sample(synth.scene_rng("synth-train", "test", 0, 1))
    turned, opposite = r.draw(_plain(base, 40, 10, 15)), r.draw(_plain(base, -40, 10, -15))
    lm = turned.meta["landmarks"]
    assert lm.shape == (68, 2)
    nose_tip = lm[render.NOSE_TIP]
    np.testing.assert_allclose(nose_tip, turned.meta["nose_xy"], atol=1e-5)
    perm = render.landmark_mirror()
    assert sorted(perm) == list(range(68)) and (perm[perm] == np.arange(68)).all() and perm[0] == 16
    # the scan is not exactly symmetric (its mirrored landmarks sit up to 0.085 half-heights off their
    # counterparts), so the mirrored pose's points agree within ~2 px at 128 px, not exactly ...
    err = np.abs(tasks.mirror_scene(turned).meta["landmarks"] - opposite.meta["landmarks"])
    assert err.max() < 0.025 and err.mean() < 0.005
    # ... while flipping x without swapping left and right is off by up to a quarter of the image
    flipped = np.stack([1 - lm[:, 0], lm[:, 1]], axis=1)
    assert np.abs(flipped - opposite.meta["landmarks"]).max() > 0.15


def _skin_offset(scene: synth.Scene) -> np.ndarray:
    """Centroid of the head's bright (skin) pixels minus that of all its pixels, in pixels (x, y)."""
    mask = scene.ids == render.ID_HEAD
    lum = scene.image.astype(float).mean(-1)
    bright = mask & (lum > np.median(lum[mask]))
    ys, xs = np.nonzero(mask)
    bys, bxs = np.nonzero(bright)
    return np.array([bxs.mean() - xs.mean(), bys.mean() - ys.mean()])


def test_pose_conventions_on_real_renders(data_dir):
    """Yaw + turns the face to image right, pitch + tips it down, roll + turns it counter-clockwise.

    Checked on pixels, not on the labels: the face (bright skin) sits right of the head's centroid
    when the dark hair fills the left, and so on.
    """
    r = synth.SceneRenderer("synth-train", 128)
    base = r.sample(synth.scene_rng("synth-train", "test", 0, 0))
    draw = lambda y, p, ro: r.draw(_plain(base, y, p, ro))  # noqa: E731
    right, left = draw(40, 0, 0), draw(-40, 0, 0)
    assert _skin_offset(right)[0] > 3 and _skin_offset(left)[0] < -3
    assert right.meta["nose_xy"][0] > right.meta["center_xy"][0] > left.meta["nose_xy"][0]
    down, up = draw(0, 35, 0), draw(0, -35, 0)
    assert _skin_offset(down)[1] > _skin_offset(up)[1] + 3  # image y runs down
    assert down.meta["nose_xy"][1] > up.meta["nose_xy"][1]
    # roll: the head's long axis leans left at the top (x falls as image-up rises) for roll +30
    for roll, sign in ((30, 1), (-30, -1)):
        ys, xs = np.nonzero(draw(0, 0, roll).ids == render.ID_HEAD)
        cov = np.cov(xs, ys)[0, 1]  # x against image-down y: positive when the top leans left
        assert np.sign(cov) == sign
    # mirror symmetry: yaw +40 looks like yaw -40 mirrored (within the scan's asymmetry)
    overlap = (right.ids == render.ID_HEAD) & (left.ids[:, ::-1] == render.ID_HEAD)
    union = (right.ids == render.ID_HEAD) | (left.ids[:, ::-1] == render.ID_HEAD)
    assert overlap.sum() / union.sum() > 0.8


def test_domain_spec_validation():
    with pytest.raises(ValueError, match="limit"):
        synth.AngleDist(120)
    spec = synth.DOMAINS["synth-train"]
    with pytest.raises(ValueError, match="backgrounds"):
        synth.DomainSpec(**{**spec.__dict__, "backgrounds": (("wallpaper", 1.0),)})
    with pytest.raises(ValueError, match="head_height"):
        synth.DomainSpec(**{**spec.__dict__, "head_height": (0.8, 0.2)})
    with pytest.raises(ValueError, match="domain must be one of"):
        synth.SceneRenderer("synth-celeba", SIZE)


# --------------------------------------------------------------------------- splits on disk
def test_build_split_manifest_and_answers(data_dir):
    path = synth.build_split("synth-train", "test", 6, SIZE, 0, progress=False)
    assert path.parent == data_dir / "synth" and path.name.startswith("synth-train-test-")
    df = synth.load_split(path)
    for col in ("image", "yaw", "pitch", "roll", "x0", "y0", "x1", "y1", "domain", "split", "seed", "index",
                "objects", "hpe_prompt", "hpe_answer", "grounding"):
        assert col in df.columns
    assert list(df.columns[:8]) == ["image", "yaw", "pitch", "roll", "x0", "y0", "x1", "y1"]
    assert len(df) == 6 and list(df["index"]) == list(range(6))
    for row in df.itertuples():
        assert os.path.isabs(row.image) and os.path.isfile(row.image)
        parsed = prompts.parse_response(row.hpe_answer, task="hpe")
        assert parsed.kind == "hpe"
        assert abs(parsed.yaw - row.yaw) <= 0.5 and abs(parsed.roll - row.roll) <= 0.5
        np.testing.assert_allclose(parsed.box, (row.x0, row.y0, row.x1, row.y1), atol=1.01e-3)
        assert row.grounding[0]["target"] == "head"
        assert [g["target"] for g in row.grounding[1:]] == [o["name"] for o in row.objects]
        for g in row.grounding:
            assert prompts.parse_response(g["answer"], task="box").kind == "box"
    # the scene on disk is the scene rendered on the fly
    s = synth.SceneRenderer("synth-train", SIZE).render(synth.scene_rng("synth-train", "test", 0, 2))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(df.image[2])), s.image)


def test_build_is_deterministic_and_test_is_held_out(tmp_path, data_dir, monkeypatch):
    a = synth.build_split("synth-biwi", "test", 3, SIZE, 5, progress=False)
    other = tmp_path / "other"
    (other / "assets").mkdir(parents=True)
    os.symlink(os.readlink(data_dir / "assets" / "menpo3d"), other / "assets" / "menpo3d")
    monkeypatch.setenv("HPE_DATA_DIR", str(other))
    b = synth.build_split("synth-biwi", "test", 3, SIZE, 5, progress=False)
    assert a != b and a.name == b.name
    for rel in ["manifest.jsonl"] + [f"images/{i:06d}.png" for i in range(3)]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    train = synth.build_split("synth-biwi", "train", 3, SIZE, 5, progress=False)
    for i in range(3):
        assert (train / f"images/{i:06d}.png").read_bytes() != (a / f"images/{i:06d}.png").read_bytes()


def test_rebuild_reuses_and_half_built_is_rebuilt(data_dir):
    path = synth.build_split("synth-aflw", "val", 3, SIZE, 0, progress=False)
    manifest = path / synth.MANIFEST
    mtime = manifest.stat().st_mtime_ns
    start = time.perf_counter()
    assert synth.build_split("synth-aflw", "val", 3, SIZE, 0, progress=False) == path
    assert time.perf_counter() - start < 0.05
    assert manifest.stat().st_mtime_ns == mtime
    # an interrupted build: no marker, a missing image
    (path / synth.COMPLETE).unlink()
    (path / "images" / "000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete"):
        synth.load_split(path)
    assert synth.build_split("synth-aflw", "val", 3, SIZE, 0, progress=False) == path
    assert synth.is_complete(path) and (path / "images" / "000001.png").is_file()
    assert len(synth.load_split(path)) == 3
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp folder left


# --------------------------------------------------------------------------- figures
def test_gallery_and_histograms_render(data_dir, tmp_path):
    import pandas as pd

    r = synth.SceneRenderer("synth-train", SIZE)
    scenes = [r.render(synth.scene_rng("synth-train", "test", 2, i)) for i in range(5)]
    fig = plots.plot_gallery([s.image for s in scenes], [s.box for s in scenes],
                             [(s.yaw, s.pitch, s.roll) for s in scenes], ncols=3,
                             pred_boxes=[s.box for s in scenes[:4]] + [None],
                             pred_poses=[(s.yaw + 10, s.pitch, s.roll) for s in scenes])
    assert len(fig.axes) == 6
    assert any(line.get_linestyle() == "--" for line in fig.axes[0].lines)
    assert plots.save_figure(fig, tmp_path / "gallery.png").stat().st_size > 0
    df = pd.DataFrame({"yaw": [s.yaw for s in scenes] * 2, "pitch": [s.pitch for s in scenes] * 2,
                       "roll": [s.roll for s in scenes] * 2, "domain": ["a"] * 5 + ["b"] * 5})
    fig = plots.plot_pose_histograms(df)
    assert len(fig.axes) == 3
    assert plots.save_figure(fig, tmp_path / "hist.png").stat().st_size > 0
    with pytest.raises(ValueError, match="domain"):
        plots.plot_pose_histograms(df.drop(columns="domain"))


def test_override_domain_replaces_the_spec_and_validates_it(monkeypatch):
    from hpelib.data import synth

    monkeypatch.setitem(synth.DOMAINS, "synth-train", synth.DOMAINS["synth-train"])  # restored after
    spec = synth.override_domain("synth-train", {"n_objects": [1, 1]})
    assert spec.n_objects == (1, 1) and synth.get_domain("synth-train") is spec
    with pytest.raises(ValueError, match="n_objects"):
        synth.override_domain("synth-train", {"n_objects": [3, 1]})
