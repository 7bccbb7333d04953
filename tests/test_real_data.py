"""The real dataset readers, on small files written in exactly the published layouts.

300W-LP / AFLW2000: `NAME.jpg` + `NAME.mat` (scipy.io.savemat) with `Pose_Para` (1, 7) =
[pitch, yaw, roll, tdx, tdy, tdz, scale] in radians and `pt2d` (2, 68). BIWI: an `.npz` (np.savez)
with `image` (N, H, W, 3) uint8 and `pose` (N, 3) = [yaw, pitch, roll] in degrees.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image
from scipy.io import savemat

from hpelib.data import read_300wlp, read_aflw2000, read_biwi
from hpelib.data.real import (
    EXPANSIONS,
    SUBSETS_300WLP,
    BadSampleWarning,
    DatasetFormatError,
    expand_box,
    load_image,
)

W, H = 64, 48  # fixture image size (pixels)


def landmarks(x_min, y_min, x_max, y_max, n=68, seed=0):
    """(2, n) landmarks whose box is exactly (x_min, y_min, x_max, y_max)."""
    rng = np.random.default_rng(seed)
    pts = np.stack([rng.uniform(x_min, x_max, n), rng.uniform(y_min, y_max, n)])
    pts[:, 0] = x_min, y_min
    pts[:, 1] = x_max, y_max
    return pts


def write_pair(folder: Path, stem: str, pitch=0.0, yaw=0.0, roll=0.0, pt2d=None, size=(W, H), mat=None):
    """NAME.jpg + NAME.mat as 300W-LP and AFLW2000 ship them; angles given in degrees."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 90, 60)).save(folder / f"{stem}.jpg", quality=90)
    if mat is None:
        pose = np.array([[math.radians(pitch), math.radians(yaw), math.radians(roll), 30.0, 20.0, 5.0, 0.001]])
        mat = {
            "Pose_Para": pose,
            "pt2d": landmarks(20, 15, 40, 35) if pt2d is None else pt2d,
            "pt3d_68": np.zeros((3, 68)),  # AFLW2000 carries more fields; the reader ignores them
        }
    savemat(folder / f"{stem}.mat", mat)


def tree_digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def quiet(reader, *args, **kwargs):
    """The reader without its progress bar and summary line (BIWI has no progress bar)."""
    if reader is not read_biwi:
        kwargs["progress"] = False
    return reader(*args, verbose=False, **kwargs)


# --------------------------------------------------------------------------------------------
# boxes


def sixdrepnet_aflw2000_box(x_min, y_min, x_max, y_max):
    """6DRepNet's AFLW2000 crop, statement by statement (sixdrepnet/datasets.py, class AFLW2000)."""
    k = 0.20
    x_min -= 2 * k * abs(x_max - x_min)
    y_min -= 2 * k * abs(y_max - y_min)
    x_max += 2 * k * abs(x_max - x_min)
    y_max += 0.6 * k * abs(y_max - y_min)
    return x_min, y_min, x_max, y_max


def sixdrepnet_300wlp_box(x_min, y_min, x_max, y_max, k):
    """6DRepNet's 300W-LP crop for one draw of k (sixdrepnet/datasets.py, class Pose_300W_LP)."""
    x_min -= 0.6 * k * abs(x_max - x_min)
    y_min -= 2 * k * abs(y_max - y_min)
    x_max += 0.6 * k * abs(x_max - x_min)
    y_max += 0.6 * k * abs(y_max - y_min)
    return x_min, y_min, x_max, y_max


def test_expand_box_is_6drepnets_crop():
    box = (100.0, 80.0, 180.0, 170.0)
    assert_allclose(expand_box(*box, "aflw2000"), sixdrepnet_aflw2000_box(*box))
    assert_allclose(expand_box(*box, "300wlp"), sixdrepnet_300wlp_box(*box, 0.3))
    assert_allclose(expand_box(*box, "300wlp", k=0.25), sixdrepnet_300wlp_box(*box, 0.25))
    assert_allclose(expand_box(*box, "tight"), box)
    # worked numbers: w = 80, h = 90; left 0.4 w = 32; top 0.4 h = 36; the right side sees the
    # moved left (w' = 112): 0.4 * 112 = 44.8; the bottom sees h' = 126: 0.12 * 126 = 15.12
    assert_allclose(expand_box(*box), (68.0, 44.0, 224.8, 185.12))


def test_expand_box_rejects_bad_parameters():
    with pytest.raises(ValueError, match=r"expansion must be one of .*'aflw2000'.*got 'wide'"):
        expand_box(0, 0, 1, 1, "wide")
    with pytest.raises(ValueError, match="k must be a finite number >= 0, got -0.1"):
        expand_box(0, 0, 1, 1, "300wlp", k=-0.1)
    assert set(EXPANSIONS) == {"aflw2000", "300wlp", "tight"}


# --------------------------------------------------------------------------------------------
# AFLW2000


def test_aflw2000_angles_in_degrees_from_pitch_yaw_roll_order(tmp_path):
    write_pair(tmp_path, "image00002", pitch=-7.5, yaw=33.0, roll=4.25)
    df = quiet(read_aflw2000, tmp_path)
    assert len(df) == 1
    r = df.iloc[0]
    assert (r.yaw, r.pitch, r.roll) == pytest.approx((33.0, -7.5, 4.25))
    assert r["name"] == "image00002" and r.dataset == "AFLW2000"
    assert r.image == str(tmp_path.resolve() / "image00002.jpg")
    assert r.source == str(tmp_path.resolve() / "image00002.mat")
    assert (r.width, r.height) == (W, H)
    for col in ["image", "yaw", "pitch", "roll", "x0", "y0", "x1", "y1", "width", "height", "source", "dataset"]:
        assert col in df.columns


def test_aflw2000_box_is_the_expanded_landmark_box_relative_and_clipped(tmp_path):
    big = (200, 160)
    write_pair(tmp_path, "image00010", pt2d=landmarks(80, 50, 120, 100), size=big)  # fits in the image
    write_pair(tmp_path, "image00011", pt2d=landmarks(5, 4, 40, 35), size=big)  # runs off the top left
    df = quiet(read_aflw2000, tmp_path).set_index("name")

    x0, y0, x1, y1 = sixdrepnet_aflw2000_box(80, 50, 120, 100)
    got = df.loc["image00010", ["x0", "y0", "x1", "y1"]].to_numpy(float)
    assert_allclose(got, [x0 / 200, y0 / 160, x1 / 200, y1 / 160])
    x0, y0, x1, y1 = sixdrepnet_aflw2000_box(5, 4, 40, 35)
    assert x0 < 0 and y0 < 0
    assert_allclose(df.loc["image00011", ["x0", "y0", "x1", "y1"]].to_numpy(float), [0, 0, x1 / 200, y1 / 160])
    # the pixel box comes back from width/height
    r = df.loc["image00010"]
    assert r.x1 * r.width == pytest.approx(sixdrepnet_aflw2000_box(80, 50, 120, 100)[2])

    tight = quiet(read_aflw2000, tmp_path, expansion="tight").set_index("name")
    assert_allclose(tight.loc["image00010", ["x0", "y0", "x1", "y1"]].to_numpy(float), [0.4, 50 / 160, 0.6, 100 / 160])


def test_aflw2000_negative_landmarks_are_left_out_by_default(tmp_path):
    pts = landmarks(20, 15, 40, 35)
    pts[:, 5] = -1.0  # AFLW2000 has negative (unseen) points
    write_pair(tmp_path, "image00003", pt2d=pts)
    r = quiet(read_aflw2000, tmp_path, expansion="tight").iloc[0]
    assert (r.x0, r.y0) == pytest.approx((20 / W, 15 / H)) and r.n_landmarks == 67
    r = quiet(read_aflw2000, tmp_path, expansion="tight", ignore_negative_landmarks=False).iloc[0]
    assert (r.x0, r.y0) == (0.0, 0.0) and r.n_landmarks == 68  # 6DRepNet's min/max over all 68


def test_aflw2000_protocol_drops_any_angle_beyond_99_and_reports_it(tmp_path, capsys):
    write_pair(tmp_path, "image00001", yaw=10)
    write_pair(tmp_path, "image00002", yaw=99.0, pitch=-99.0, roll=98.0)  # at the limit: kept
    write_pair(tmp_path, "image00003", yaw=100.0)
    write_pair(tmp_path, "image00004", pitch=-120.0)
    write_pair(tmp_path, "image00005", roll=99.5)
    df = read_aflw2000(tmp_path, progress=False)
    assert df["name"].tolist() == ["image00001", "image00002"]
    assert sorted(Path(p).name for p in df.attrs["dropped"]) == ["image00003.jpg", "image00004.jpg", "image00005.jpg"]
    assert df.attrs["n_read"] == 5 and df.attrs["skipped"] == [] and df.attrs["max_abs_angle"] == 99.0
    out = capsys.readouterr().out
    assert "AFLW2000: 2 samples" in out and "3 dropped with an |angle| > 99 deg" in out

    everything = quiet(read_aflw2000, tmp_path, max_abs_angle=None)
    assert len(everything) == 5 and everything.attrs["dropped"] == []
    with pytest.raises(ValueError, match="max_abs_angle must be a number > 0 or None"):
        read_aflw2000(tmp_path, max_abs_angle=-1)


def test_missing_root_names_it_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder \(expected the AFLW2000 layout"):
        read_aflw2000(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder \(expected the 300W-LP layout: folders AFW"):
        read_300wlp(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"BIWI.npz: no such file \(expected the BIWI .npz layout"):
        read_biwi(tmp_path / "BIWI.npz")
    (tmp_path / "AFLW2000").mkdir()
    with pytest.raises(DatasetFormatError, match="did you mean .*AFLW2000"):
        read_aflw2000(tmp_path)


# --------------------------------------------------------------------------------------------
# bad files


def test_bad_files_raise_naming_the_file(tmp_path):
    cases = {}
    d = tmp_path / "nopose"
    write_pair(d, "image00002", mat={"pt2d": landmarks(20, 15, 40, 35)})
    cases[d] = r"nopose/image00002\.mat: no 'Pose_Para' field \(expected the 300W-LP/AFLW2000 \.mat layout"

    d = tmp_path / "corrupt"
    write_pair(d, "image00002")
    (d / "image00002.mat").write_bytes(b"this is not a MATLAB file" * 10)
    cases[d] = r"corrupt/image00002\.mat: not a readable \.mat file"

    d = tmp_path / "nomat"
    write_pair(d, "image00002")
    (d / "image00002.mat").unlink()
    cases[d] = r"nomat/image00002\.jpg: no annotation image00002\.mat beside it"

    d = tmp_path / "nojpg"
    write_pair(d, "image00002")
    (d / "image00002.jpg").unlink()
    cases[d] = r"nojpg/image00002\.mat: no image image00002\.jpg beside it"

    d = tmp_path / "badjpg"
    write_pair(d, "image00002")
    (d / "image00002.jpg").write_bytes(b"not a jpeg")
    cases[d] = r"badjpg/image00002\.jpg: not a readable image"

    d = tmp_path / "badshape"
    write_pair(d, "image00002", mat={"Pose_Para": np.zeros((1, 2)), "pt2d": landmarks(20, 15, 40, 35)})
    cases[d] = r"badshape/image00002\.mat: Pose_Para has shape \(1, 2\)"

    d = tmp_path / "badpt2d"
    write_pair(d, "image00002", mat={"Pose_Para": np.zeros((1, 7)), "pt2d": np.zeros((68, 3))})
    cases[d] = r"badpt2d/image00002\.mat: pt2d has shape \(68, 3\)"

    d = tmp_path / "offimage"
    write_pair(d, "image00002", pt2d=landmarks(500, 500, 600, 600))
    cases[d] = r"offimage/image00002\.mat: the head box .* lies outside the 64x48 image"

    for folder, message in cases.items():
        with pytest.raises(DatasetFormatError, match=message):
            quiet(read_aflw2000, folder)


def test_truncated_jpeg_is_caught_when_decoding(tmp_path):
    write_pair(tmp_path, "image00002", size=(256, 256))
    jpg = tmp_path / "image00002.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:2000])
    assert len(quiet(read_aflw2000, tmp_path)) == 1  # the header alone is fine
    with pytest.raises(DatasetFormatError, match=r"image00002\.jpg: not a readable image"):
        quiet(read_aflw2000, tmp_path, decode_images=True)


def test_skip_bad_skips_counts_and_warns(tmp_path):
    for i in range(3):
        write_pair(tmp_path, f"image0000{i}", yaw=5.0 * i)
    write_pair(tmp_path, "image00007")
    (tmp_path / "image00007.mat").write_bytes(b"garbage")
    write_pair(tmp_path, "image00008")
    (tmp_path / "image00008.mat").unlink()
    with pytest.warns(BadSampleWarning, match=r"skipped 2 bad file\(s\)"):
        df = quiet(read_aflw2000, tmp_path, skip_bad=True)
    assert df["name"].tolist() == ["image00000", "image00001", "image00002"]
    skipped = df.attrs["skipped"]
    assert len(skipped) == 2
    assert "image00007.mat: not a readable .mat" in skipped[0]
    assert "image00008.jpg: no annotation image00008.mat" in skipped[1]

    # nothing is skipped silently: a clean folder reads without any warning
    for p in ["image00007.jpg", "image00007.mat", "image00008.jpg"]:
        (tmp_path / p).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quiet(read_aflw2000, tmp_path, skip_bad=True).attrs["skipped"] == []


# --------------------------------------------------------------------------------------------
# 300W-LP


def make_300wlp(root: Path) -> None:
    for j, subset in enumerate(SUBSETS_300WLP):
        write_pair(root / subset, f"{subset}_100{j}_1_0", pitch=j, yaw=-10.0 * j, roll=0.5 * j)
    write_pair(root / "AFW", "AFW_999_1_1", yaw=150.0)  # dropped by the 99 degree filter
    (root / "landmarks" / "AFW").mkdir(parents=True)
    savemat(root / "landmarks" / "AFW" / "AFW_1000_1_0_pts.mat", {"pts_2d": np.zeros((68, 2))})
    (root / "Code").mkdir()
    (root / "Code" / "readme.txt").write_text("not data")


def test_300wlp_walks_the_eight_folders(tmp_path):
    make_300wlp(tmp_path)
    df = quiet(read_300wlp, tmp_path)
    assert len(df) == 8 and df.attrs["n_read"] == 9 and len(df.attrs["dropped"]) == 1
    assert df["subset"].tolist() == list(SUBSETS_300WLP)
    assert set(df["dataset"]) == {"300W-LP"}
    r = df.set_index("subset").loc["HELEN_Flip"]  # j = 3
    assert r["name"] == "HELEN_Flip/HELEN_Flip_1003_1_0"
    assert (r.pitch, r.yaw, r.roll) == pytest.approx((3.0, -30.0, 1.5))
    assert Path(r.image).parent.name == "HELEN_Flip" and Path(r.source).suffix == ".mat"
    x0, y0, x1, y1 = sixdrepnet_300wlp_box(20, 15, 40, 35, k=0.3)
    assert_allclose(r[["x0", "y0", "x1", "y1"]].to_numpy(float), [x0 / W, max(y0, 0) / H, x1 / W, y1 / H])
    assert df.attrs["k"] == 0.3 and df.attrs["expansion"] == "300wlp"

    afw = quiet(read_300wlp, tmp_path, subsets=["AFW"], max_abs_angle=None)
    assert afw["name"].tolist() == ["AFW/AFW_1000_1_0", "AFW/AFW_999_1_1"]


def test_300wlp_missing_folder_is_named(tmp_path):
    make_300wlp(tmp_path)
    for p in (tmp_path / "IBUG").iterdir():
        p.unlink()
    (tmp_path / "IBUG").rmdir()
    with pytest.raises(FileNotFoundError, match=r"missing 300W-LP folder\(s\) IBUG .*pass subsets="):
        read_300wlp(tmp_path)
    df = quiet(read_300wlp, tmp_path, subsets=[s for s in SUBSETS_300WLP if s != "IBUG"])
    assert "IBUG" not in set(df["subset"])


def test_readers_never_modify_the_source_data(tmp_path):
    make_300wlp(tmp_path / "300W_LP")
    write_pair(tmp_path / "AFLW2000", "image00002")
    images = np.random.default_rng(1).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "BIWI.npz", image=images, pose=np.zeros((3, 3)))
    before = tree_digest(tmp_path)
    quiet(read_300wlp, tmp_path / "300W_LP")
    quiet(read_aflw2000, tmp_path / "AFLW2000", decode_images=True)
    df = quiet(read_biwi, tmp_path / "BIWI.npz")
    for ref in df["image"]:
        load_image(ref)[:] = 0  # the returned array is a copy
    assert tree_digest(tmp_path) == before


# --------------------------------------------------------------------------------------------
# BIWI and load_image


def write_biwi(path: Path, n=4, size=(16, 12), compressed=False):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (n, size[1], size[0], 3), dtype=np.uint8)
    # columns: yaw, pitch, roll
    pose = np.stack([np.linspace(-60, 60, n), np.linspace(-30, 20, n), np.linspace(-10, 15, n)], axis=1)
    (np.savez_compressed if compressed else np.savez)(path, image=images, pose=pose, img_size=size[0])
    return images, pose


@pytest.mark.parametrize("compressed", [False, True])
def test_biwi_pose_is_yaw_pitch_roll_and_the_box_is_the_crop(tmp_path, compressed):
    path = tmp_path / "BIWI_noTrack.npz"
    images, pose = write_biwi(path, compressed=compressed)
    df = quiet(read_biwi, path)
    assert len(df) == 4 and set(df["dataset"]) == {"BIWI"}
    assert_allclose(df[["yaw", "pitch", "roll"]].to_numpy(), pose)
    assert df["image"].tolist() == [f"{path.resolve()}#{i}" for i in range(4)]
    assert df["name"].tolist() == [f"BIWI_noTrack#{i}" for i in range(4)]
    assert (df[["x0", "y0", "x1", "y1"]].to_numpy() == [0, 0, 1, 1]).all()
    assert (df["width"] == 16).all() and (df["height"] == 12).all() and (df["source"] == str(path.resolve())).all()

    # load_image: the stored crop, flipped from FSA-Net's BGR to RGB unless told otherwise
    for i in range(4):
        assert_array_equal(load_image(df.image[i]), images[i][..., ::-1])
        got = load_image(df.image[i], npz_channels="RGB")
        assert got.dtype == np.uint8 and got.shape == (12, 16, 3)
        assert_array_equal(got, images[i])

    boxed = quiet(read_biwi, path, box=(2 / 9, 2 / 9, 7 / 9, 7 / 9))
    assert boxed.x0[0] == pytest.approx(2 / 9) and boxed.y1[0] == pytest.approx(7 / 9)


def test_biwi_filter_and_bad_files(tmp_path):
    path = tmp_path / "BIWI.npz"
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(path, image=images, pose=np.array([[0, 0, 0], [120.0, 0, 0], [np.nan, 0, 0]]))
    with pytest.raises(DatasetFormatError, match=r"BIWI\.npz#2: pose .* is not finite"):
        quiet(read_biwi, path)
    with pytest.warns(BadSampleWarning, match=r"skipped 1 bad file"):
        df = quiet(read_biwi, path, skip_bad=True)
    assert len(df) == 1 and len(df.attrs["dropped"]) == 1 and len(df.attrs["skipped"]) == 1

    bad = tmp_path / "nopose.npz"
    np.savez(bad, image=images, yaw_pitch_roll=np.zeros((3, 3)))
    with pytest.raises(DatasetFormatError, match=r"nopose\.npz: no 'pose' array .*expected the BIWI \.npz layout"):
        quiet(read_biwi, bad)
    bad = tmp_path / "short.npz"
    np.savez(bad, image=images, pose=np.zeros((2, 3)))
    with pytest.raises(DatasetFormatError, match=r"short\.npz: pose is float64 \(2, 3\) for 3 images"):
        quiet(read_biwi, bad)
    bad = tmp_path / "gray.npz"
    np.savez(bad, image=np.zeros((3, 8, 8), np.uint8), pose=np.zeros((3, 3)))
    with pytest.raises(DatasetFormatError, match=r"gray\.npz: image is uint8 \(3, 8, 8\)"):
        quiet(read_biwi, bad)
    bad = tmp_path / "junk.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatasetFormatError, match=r"junk\.npz: not an \.npz file"):
        quiet(read_biwi, bad)


def test_load_image_reads_paths_and_caches_the_npz(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 255, (10, 14, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert_array_equal(load_image(tmp_path / "a.png"), pixels)
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.png")  # grayscale comes back RGB
    assert load_image(str(tmp_path / "gray.png")).shape == (10, 14, 3)
    write_pair(tmp_path, "image00002")
    jpg = load_image(tmp_path / "image00002.jpg")
    assert jpg.shape == (H, W, 3) and jpg.dtype == np.uint8

    with pytest.raises(FileNotFoundError, match=r"missing\.jpg: no such image"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetFormatError, match=r"bad\.jpg: not a readable image"):
        load_image(tmp_path / "bad.jpg")

    path = tmp_path / "B.npz"
    write_biwi(path, n=3)
    from hpelib.data import real

    real._cached_npz_array.cache_clear()
    for i in [0, 1, 2, 1, 0]:
        load_image(f"{path}#{i}")
    assert real._cached_npz_array.cache_info().misses == 1  # opened once
    with pytest.raises(IndexError, match=r"B\.npz#3: index 3 out of range for 3 images"):
        load_image(f"{path}#3")
    # a replaced file is opened again, not served from the cache
    images, _ = write_biwi(path, n=5, size=(6, 5))
    assert_array_equal(load_image(f"{path}#4", npz_channels="RGB"), images[4])
