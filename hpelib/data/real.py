"""Readers of the real head-pose datasets in their published file layouts.

Every reader returns one row per sample, in a pandas DataFrame with these columns:

- `name`: the sample's id, as 6DRepNet's file lists write it (`AFW/AFW_134212_1_0`,
  `image00002`, `BIWI_noTrack#17`).
- `image`: what `load_image` opens: an absolute image path, or `"/abs/path/BIWI.npz#17"` for the
  17th image (0-based) of a BIWI `.npz`.
- `source`: the annotation file the labels came from (the `.mat`, or the `.npz`).
- `dataset`: `"300W-LP"`, `"AFLW2000"` or `"BIWI"`; 300W-LP adds `subset` (its folder, `AFW_Flip`...).
- `yaw`, `pitch`, `roll`: degrees, DESIGN.md's convention (R = Rz(roll) Ry(yaw) Rx(pitch)).
- `x0`, `y0`, `x1`, `y1`: the head box, corners RELATIVE to the image size, in [0, 1], origin top
  left, as DESIGN.md's text boxes want them (the text form multiplies by 1000).
- `width`, `height`: the source image size in pixels, so the pixel box is `x0 * width`, ...
  (continuous coordinates: `img.crop((x0 * width, y0 * height, x1 * width, y1 * height))`).
- `n_landmarks` (300W-LP, AFLW2000): how many of the 2-D landmarks made the box.

`df.attrs` records how the table was made: `dropped` (the images removed by the angle filter),
`skipped` (`"file: reason"` for each bad file skipped with `skip_bad=True`), and the parameters.

The layouts, as 6DRepNet (thohemp/6DRepNet, `sixdrepnet/datasets.py`, `utils.py`,
`create_filename_list.py`) and Hopenet (natanielruiz/deep-head-pose, `code/datasets.py`) read them:

- 300W-LP and AFLW2000: `NAME.jpg` beside `NAME.mat`; the `.mat` holds `Pose_Para` (1, 7) =
  [pitch, yaw, roll, tdx, tdy, tdz, scale] with the angles in RADIANS, and `pt2d` (2, 68), the 2-D
  landmarks (row 0 = x, row 1 = y, pixels). 300W-LP keeps them in eight folders (AFW, AFW_Flip,
  HELEN, HELEN_Flip, IBUG, IBUG_Flip, LFPW, LFPW_Flip; `landmarks/` holds other `.mat` files and is
  not read); AFLW2000 is one flat folder.
- The head box is the landmarks' box made loose, as 6DRepNet crops faces (`EXPANSIONS`).
- `create_filename_list.py` keeps a sample only when |pitch|, |yaw|, |roll| <= 99 degrees, for
  300W-LP and AFLW2000 alike; on AFLW2000 that keeps the published 1969 of 2000.
- BIWI: one `.npz` (FSA-Net's `data/TYY_create_db_biwi.py`, which 6DRepNet's README points to;
  6DRepNet's `class BIWI` reads it) with `image` (N, H, W, 3) uint8, face crops already, and
  `pose` (N, 3) = [yaw, pitch, roll] in DEGREES. FSA-Net read the frames with `cv2.imread`, so the
  stored channels are BGR; `load_image` returns RGB.

The source data is only ever read: files are opened read-only, and the BIWI images are read
through a read-only memory map.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "BadSampleWarning",
    "DatasetFormatError",
    "EXPANSIONS",
    "Expansion",
    "SUBSETS_300WLP",
    "expand_box",
    "load_image",
    "read_300wlp",
    "read_aflw2000",
    "read_biwi",
]

# The eight image folders of the published 300W-LP archive (300W_LP.zip from 3DDFA's page).
SUBSETS_300WLP = ("AFW", "AFW_Flip", "HELEN", "HELEN_Flip", "IBUG", "IBUG_Flip", "LFPW", "LFPW_Flip")

_MAT_LAYOUT = (
    "the 300W-LP/AFLW2000 .mat layout: Pose_Para (1, 7) = [pitch, yaw, roll, tdx, tdy, tdz, scale]"
    " in radians, pt2d (2, 68) landmarks"
)
_BIWI_LAYOUT = (
    "the BIWI .npz layout of FSA-Net/6DRepNet: image (N, H, W, 3) uint8, pose (N, 3) ="
    " [yaw, pitch, roll] in degrees"
)


class DatasetFormatError(ValueError):
    """A file is missing, unreadable, or not in the layout its reader expects (the message names it)."""


class BadSampleWarning(UserWarning):
    """Bad files were skipped (`skip_bad=True`); `df.attrs["skipped"]` lists them."""


# --------------------------------------------------------------------------------------------
# boxes


@dataclass(frozen=True)
class Expansion:
    """How 6DRepNet makes the landmarks' box loose: each side moves out by `coef * k * size`.

    The sides move in 6DRepNet's order (left, top, right, bottom), and the right and bottom sides
    use the width and height measured AFTER the left and top moved, exactly as its code does
    (`x_max += c * k * abs(x_max - x_min)` with the already-moved `x_min`).
    """

    left: float
    top: float
    right: float
    bottom: float
    k: float  # the default k
    source: str


EXPANSIONS: dict[str, Expansion] = {
    # sixdrepnet/datasets.py, class AFLW2000: k = 0.20 fixed (the test-set crop).
    "aflw2000": Expansion(2.0, 2.0, 2.0, 0.6, k=0.2, source="thohemp/6DRepNet sixdrepnet/datasets.py class AFLW2000"),
    # sixdrepnet/datasets.py, class Pose_300W_LP: k = U[0.2, 0.4) drawn per sample, a training
    # augmentation; a reader must be deterministic, so the default is that draw's mean, 0.3.
    "300wlp": Expansion(0.6, 2.0, 0.6, 0.6, k=0.3, source="thohemp/6DRepNet sixdrepnet/datasets.py class Pose_300W_LP"),
    # the landmarks' own box
    "tight": Expansion(0.0, 0.0, 0.0, 0.0, k=0.0, source="the 2-D landmarks' min/max"),
}


def _resolve_expansion(expansion: str, k: float | None) -> tuple[Expansion, float]:
    if expansion not in EXPANSIONS:
        raise ValueError(f"expansion must be one of {sorted(EXPANSIONS)}, got {expansion!r}")
    e = EXPANSIONS[expansion]
    k = e.k if k is None else k
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k < 0:
        raise ValueError(f"k must be a finite number >= 0, got {k!r}")
    return e, float(k)


def expand_box(x_min, y_min, x_max, y_max, expansion: str = "aflw2000", k: float | None = None):
    """The loose head box around a landmarks' box, in the same units (pixels), not clipped.

    Args:
        x_min, y_min, x_max, y_max: the landmarks' box; floats or arrays of one shape.
        expansion: a key of `EXPANSIONS` ("aflw2000", "300wlp", "tight").
        k: the expansion's k; None takes the expansion's default (0.2 for AFLW2000, 0.3 for
            300W-LP).

    Returns:
        (x_min, y_min, x_max, y_max) of the loose box.
    """
    e, k = _resolve_expansion(expansion, k)
    # 6DRepNet's four statements, in its order: right and bottom see the moved left and top.
    x_min = x_min - e.left * k * abs(x_max - x_min)
    y_min = y_min - e.top * k * abs(y_max - y_min)
    x_max = x_max + e.right * k * abs(x_max - x_min)
    y_max = y_max + e.bottom * k * abs(y_max - y_min)
    return x_min, y_min, x_max, y_max


def _relative_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel box -> relative corners clipped to [0, 1]; raises when nothing of it lies in the image."""
    x0, y0, x1, y1 = box
    rx0, rx1 = min(max(x0 / width, 0.0), 1.0), min(max(x1 / width, 0.0), 1.0)
    ry0, ry1 = min(max(y0 / height, 0.0), 1.0), min(max(y1 / height, 0.0), 1.0)
    if not (rx1 > rx0 and ry1 > ry0):
        raise ValueError(
            f"the head box ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) px lies outside the"
            f" {width}x{height} image"
        )
    return rx0, ry0, rx1, ry1


# --------------------------------------------------------------------------------------------
# 300W-LP and AFLW2000: NAME.jpg + NAME.mat


def _read_image_size(path: Path, decode: bool) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            if decode:
                im.load()
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: no such file") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DatasetFormatError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return size


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pitch, yaw, roll) in radians and the (2, N) landmarks of one 300W-LP/AFLW2000 .mat."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, variable_names=["Pose_Para", "pt2d"])
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: no such file (expected {_MAT_LAYOUT})") from None
    except Exception as e:  # scipy raises ValueError, MatReadError, TypeError, NotImplementedError...
        raise DatasetFormatError(
            f"{path}: not a readable .mat file ({type(e).__name__}: {e}); expected {_MAT_LAYOUT}"
        ) from None
    for field in ("Pose_Para", "pt2d"):
        if field not in mat:
            raise DatasetFormatError(f"{path}: no {field!r} field (expected {_MAT_LAYOUT})")
    try:
        pose = np.asarray(mat["Pose_Para"], dtype=float)
        pt2d = np.asarray(mat["pt2d"], dtype=float)
    except (TypeError, ValueError) as e:
        raise DatasetFormatError(f"{path}: Pose_Para/pt2d are not numeric ({e}); expected {_MAT_LAYOUT}") from None
    if pose.ndim != 2 or pose.shape[0] < 1 or pose.shape[1] < 3:
        raise DatasetFormatError(f"{path}: Pose_Para has shape {pose.shape} (expected {_MAT_LAYOUT})")
    if pt2d.ndim != 2 or pt2d.shape[0] != 2 or pt2d.shape[1] < 2:
        raise DatasetFormatError(f"{path}: pt2d has shape {pt2d.shape} (expected {_MAT_LAYOUT})")
    angles = pose[0, :3]
    if not np.all(np.isfinite(angles)):
        raise DatasetFormatError(f"{path}: Pose_Para angles are not finite: {angles.tolist()}")
    return angles, pt2d


def _pairs(folder: Path) -> list[tuple[str, Path | None, Path | None]]:
    """(stem, jpg, mat) for every stem with a .jpg or a .mat in `folder` (not recursive), sorted."""
    jpgs: dict[str, Path] = {}
    mats: dict[str, Path] = {}
    with os.scandir(folder) as it:
        for entry in it:
            if not entry.is_file():
                continue
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() == ".jpg":
                jpgs[stem] = Path(entry.path)
            elif ext.lower() == ".mat":
                mats[stem] = Path(entry.path)
    return [(s, jpgs.get(s), mats.get(s)) for s in sorted(jpgs.keys() | mats.keys())]


def _read_mat_sample(
    jpg: Path | None,
    mat: Path | None,
    stem: str,
    expansion: str,
    k: float,
    ignore_negative_landmarks: bool,
    decode_images: bool,
) -> dict:
    if mat is None:
        raise DatasetFormatError(f"{jpg}: no annotation {stem}.mat beside it (expected NAME.jpg + NAME.mat pairs)")
    if jpg is None:
        raise DatasetFormatError(f"{mat}: no image {stem}.jpg beside it (expected NAME.jpg + NAME.mat pairs)")
    angles, pt2d = _read_mat(mat)
    width, height = _read_image_size(jpg, decode_images)

    xs, ys = pt2d[0], pt2d[1]
    keep = np.isfinite(xs) & np.isfinite(ys)
    if ignore_negative_landmarks:
        # FSA-Net (data/type1/TYY_create_db_type1.py): "I found negative value in AFLW2000. It
        # need to be removed." -- such points would stretch the box to the image corner.
        keep &= (xs >= 0) & (ys >= 0)
    if not keep.any():
        raise DatasetFormatError(f"{mat}: no usable landmark in pt2d (all negative or not finite)")
    xs, ys = xs[keep], ys[keep]
    box = expand_box(xs.min(), ys.min(), xs.max(), ys.max(), expansion, k)
    try:
        x0, y0, x1, y1 = _relative_box(box, width, height)
    except ValueError as e:
        raise DatasetFormatError(f"{mat}: {e}") from None

    pitch, yaw, roll = np.degrees(angles)  # Pose_Para[0][:3] = pitch, yaw, roll (radians)
    return {
        "image": str(jpg),
        "source": str(mat),
        "yaw": float(yaw),
        "pitch": float(pitch),
        "roll": float(roll),
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "width": int(width),
        "height": int(height),
        "n_landmarks": int(keep.sum()),
    }


def _check_angle_limit(max_abs_angle: float | None) -> None:
    if max_abs_angle is None:
        return
    if isinstance(max_abs_angle, bool) or not isinstance(max_abs_angle, (int, float)) or not max_abs_angle > 0:
        raise ValueError(f"max_abs_angle must be a number > 0 or None (keep all), got {max_abs_angle!r}")


def _progress(items: Sequence, desc: str, progress: bool) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="file", disable=not progress or len(items) == 0)


def _collect(
    jobs: Sequence,
    read_one: Callable,
    dataset: str,
    skip_bad: bool,
    progress: bool,
) -> tuple[list[dict], list[str]]:
    """Run `read_one` on each job; a DatasetFormatError raises, or is recorded under skip_bad."""
    rows: list[dict] = []
    skipped: list[str] = []
    for job in _progress(jobs, f"reading {dataset}", progress):
        try:
            rows.append(read_one(job))
        except DatasetFormatError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    return rows, skipped


def _finish(
    rows: list[dict],
    columns: list[str],
    dataset: str,
    where: Path,
    max_abs_angle: float | None,
    skipped: list[str],
    attrs: dict,
    verbose: bool,
) -> pd.DataFrame:
    """The table of `rows`, filtered by the angle protocol, with its report in `df.attrs`."""
    df = pd.DataFrame(rows, columns=columns)
    df = df.astype({"yaw": float, "pitch": float, "roll": float, "x0": float, "y0": float, "x1": float, "y1": float})
    n_read = len(df)
    dropped: list[str] = []
    if max_abs_angle is not None and n_read:
        # 6DRepNet's create_filename_list.py keeps |pitch|, |yaw|, |roll| <= 99
        out = (df[["yaw", "pitch", "roll"]].abs() > max_abs_angle).any(axis=1)
        dropped = df.loc[out, "image"].tolist()
        df = df.loc[~out].reset_index(drop=True)
    df.attrs.update(attrs)
    df.attrs.update(
        dataset=dataset,
        root=str(where),
        max_abs_angle=max_abs_angle,
        n_read=n_read,
        dropped=dropped,
        skipped=skipped,
    )
    if skipped:
        shown = "; ".join(skipped[:3]) + (f"; ... ({len(skipped) - 3} more)" if len(skipped) > 3 else "")
        warnings.warn(
            f"{dataset} at {where}: skipped {len(skipped)} bad file(s), listed in df.attrs['skipped']: {shown}",
            BadSampleWarning,
            stacklevel=3,
        )
    if verbose:
        if max_abs_angle is None:
            limit = "no angle filter"
        else:
            limit = f"{len(dropped)} dropped with an |angle| > {max_abs_angle:g} deg"
        print(
            f"{dataset}: {len(df)} samples from {where} ({n_read} read, {limit}, {len(skipped)} bad file(s) skipped)"
        )
    if not n_read:
        raise DatasetFormatError(f"{where}: no readable {dataset} sample ({len(skipped)} bad file(s) skipped)")
    return df


_MAT_COLUMNS = [
    "name", "image", "source", "dataset", "yaw", "pitch", "roll",
    "x0", "y0", "x1", "y1", "width", "height", "n_landmarks",
]  # fmt: skip


def _check_root(root: str | os.PathLike, dataset: str, layout: str) -> Path:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        what = "no such folder" if not root.exists() else "not a folder"
        raise FileNotFoundError(f"{root}: {what} (expected the {dataset} layout: {layout})")
    return root


def read_aflw2000(
    root: str | os.PathLike,
    *,
    max_abs_angle: float | None = 99.0,
    expansion: str = "aflw2000",
    k: float | None = None,
    ignore_negative_landmarks: bool = True,
    skip_bad: bool = False,
    decode_images: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> pd.DataFrame:
    """Read AFLW2000(-3D): one flat folder of `imageNNNNN.jpg` + `imageNNNNN.mat` pairs.

    Args:
        root: the `AFLW2000` folder.
        max_abs_angle: the test protocol drops a sample when any |yaw|, |pitch|, |roll| exceeds this
            many degrees (99 keeps 1969 of the 2000); None keeps all. The dropped images are
            listed in `df.attrs["dropped"]` and counted in a printed note.
        expansion, k: how the landmarks' box becomes the head box (`EXPANSIONS`; by default
            6DRepNet's AFLW2000 crop, k = 0.2).
        ignore_negative_landmarks: leave out landmarks with a negative coordinate, which AFLW2000
            has for some points (FSA-Net removes them); False takes all 68, as 6DRepNet does.
        skip_bad: skip bad files (missing partner, unreadable image or .mat, wrong fields) instead
            of raising; they are listed in `df.attrs["skipped"]` and a `BadSampleWarning` says how
            many.
        decode_images: decode every image fully (catches truncated JPEGs; slower). Otherwise only
            the header is read, for the image size.
        progress: show a progress bar. verbose: print the one-line summary.

    Returns:
        One row per kept sample; columns in the module docstring. Boxes are relative to the image.

    Raises:
        FileNotFoundError: `root` is not a folder.
        DatasetFormatError: a bad file (named in the message), unless `skip_bad`.
    """
    _check_angle_limit(max_abs_angle)
    _, k = _resolve_expansion(expansion, k)
    root = _check_root(root, "AFLW2000", "a flat folder of imageNNNNN.jpg + imageNNNNN.mat pairs")
    pairs = _pairs(root)
    if not pairs:
        hint = f"; did you mean {root / 'AFLW2000'}?" if (root / "AFLW2000").is_dir() else ""
        raise DatasetFormatError(
            f"{root}: no .jpg or .mat file (expected AFLW2000's imageNNNNN.jpg + .mat pairs){hint}"
        )

    def read_one(pair):
        stem, jpg, mat = pair
        row = _read_mat_sample(jpg, mat, stem, expansion, k, ignore_negative_landmarks, decode_images)
        return {"name": stem, "dataset": "AFLW2000", **row}

    rows, skipped = _collect(pairs, read_one, "AFLW2000", skip_bad, progress)
    attrs = dict(expansion=expansion, k=k, ignore_negative_landmarks=ignore_negative_landmarks)
    return _finish(rows, _MAT_COLUMNS, "AFLW2000", root, max_abs_angle, skipped, attrs, verbose)


def read_300wlp(
    root: str | os.PathLike,
    *,
    subsets: Sequence[str] = SUBSETS_300WLP,
    max_abs_angle: float | None = 99.0,
    expansion: str = "300wlp",
    k: float | None = None,
    ignore_negative_landmarks: bool = False,
    skip_bad: bool = False,
    decode_images: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> pd.DataFrame:
    """Read 300W-LP: the folders in `subsets`, each a flat folder of `NAME.jpg` + `NAME.mat` pairs.

    `landmarks/` (other .mat files) and anything not in `subsets` is not read.

    Args:
        root: the `300W_LP` folder.
        subsets: which folders to read (all eight by default); a missing one raises.
        max_abs_angle: drop a sample when any |angle| exceeds this many degrees, as 6DRepNet's
            `create_filename_list.py` does for its training list; None keeps all.
        expansion, k: the head box (`EXPANSIONS`; by default 6DRepNet's 300W-LP crop with
            k = 0.3, the mean of the U[0.2, 0.4) it draws per sample while training). Pass
            `expansion="aflw2000"` to give training boxes the same shape as the AFLW2000 test boxes.
        ignore_negative_landmarks, skip_bad, decode_images, progress, verbose: as `read_aflw2000`.

    Returns:
        One row per kept sample; columns in the module docstring plus `subset`.
    """
    _check_angle_limit(max_abs_angle)
    _, k = _resolve_expansion(expansion, k)
    if isinstance(subsets, str) or not subsets:
        raise ValueError(f"subsets must be a non-empty list of folder names, got {subsets!r}")
    layout = f"folders {', '.join(SUBSETS_300WLP)}, each of NAME.jpg + NAME.mat pairs"
    root = _check_root(root, "300W-LP", layout)
    missing = [s for s in subsets if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{root}: missing 300W-LP folder(s) {', '.join(missing)} (expected {layout};"
            " pass subsets=[...] to read only some)"
        )

    jobs = [(s, *pair) for s in subsets for pair in _pairs(root / s)]

    def read_one(job):
        subset, stem, jpg, mat = job
        row = _read_mat_sample(jpg, mat, stem, expansion, k, ignore_negative_landmarks, decode_images)
        return {"name": f"{subset}/{stem}", "dataset": "300W-LP", "subset": subset, **row}

    rows, skipped = _collect(jobs, read_one, "300W-LP", skip_bad, progress)
    attrs = dict(expansion=expansion, k=k, ignore_negative_landmarks=ignore_negative_landmarks, subsets=list(subsets))
    columns = _MAT_COLUMNS[:4] + ["subset"] + _MAT_COLUMNS[4:]
    return _finish(rows, columns, "300W-LP", root, max_abs_angle, skipped, attrs, verbose)


# --------------------------------------------------------------------------------------------
# BIWI: one .npz of face crops


def _npz_member_offset(info: zipfile.ZipInfo, path: Path) -> int:
    """Byte offset of a stored (uncompressed) member's data in the zip file."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise DatasetFormatError(f"{path}: broken zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _open_npz_array(path: Path, key: str) -> np.ndarray:
    """The array `key` of the .npz at `path`, without loading it when it is stored uncompressed."""
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected {_BIWI_LAYOUT})") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetFormatError(f"{path}: not an .npz file ({e}); expected {_BIWI_LAYOUT}") from None
    with zf:
        names = set(zf.namelist())
        member = f"{key}.npy"
        if member not in names:
            have = sorted(n.removesuffix(".npy") for n in names)
            raise DatasetFormatError(f"{path}: no {key!r} array (has {have}; expected {_BIWI_LAYOUT})")
        info = zf.getinfo(member)
        try:
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                data_start = f.tell()
        except Exception as e:
            raise DatasetFormatError(
                f"{path}: {member} is not a readable .npy ({e}); expected {_BIWI_LAYOUT}"
            ) from None
        if info.compress_type == zipfile.ZIP_STORED and not dtype.hasobject:
            offset = _npz_member_offset(info, path) + data_start
            if int(np.prod(shape)) == 0:
                return np.empty(shape, dtype=dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    # compressed: the only way in is to decompress it all
    try:
        with np.load(path, allow_pickle=False) as d:
            return d[key]
    except Exception as e:
        raise DatasetFormatError(
            f"{path}: cannot read {key!r} ({type(e).__name__}: {e}); expected {_BIWI_LAYOUT}"
        ) from None


@functools.lru_cache(maxsize=4)
def _cached_npz_array(path: str, key: str, mtime_ns: int, size: int) -> np.ndarray:
    # mtime and size are in the key so that a replaced file is opened again
    return _open_npz_array(Path(path), key)


def _npz_array(path: Path, key: str) -> np.ndarray:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected {_BIWI_LAYOUT})") from None
    return _cached_npz_array(str(path), key, st.st_mtime_ns, st.st_size)


def read_biwi(
    npz_path: str | os.PathLike,
    *,
    box: str | Sequence[float] = "full",
    max_abs_angle: float | None = 99.0,
    skip_bad: bool = False,
    verbose: bool = True,
) -> pd.DataFrame:
    """Read BIWI as 6DRepNet tests on it: one .npz (`BIWI_noTrack.npz`) of face crops.

    Args:
        npz_path: the .npz with `image` (N, H, W, 3) uint8 and `pose` (N, 3) = [yaw, pitch, roll]
            in degrees (FSA-Net's `TYY_create_db_biwi.py` layout).
        box: the head box in each crop. "full" is the whole crop (the crops ARE the heads); or
            four relative corners (x0, y0, x1, y1) used for every sample, e.g. the detector box
            inside FSA-Net's crop, which adds a margin of ad = 0.4 of the box on each side:
            (ad / (1 + 2 ad), ..., (1 + ad) / (1 + 2 ad)) = (2/9, 2/9, 7/9, 7/9).
        max_abs_angle: drop samples with any |angle| above this many degrees (BIWI's poses lie
            within it, so it normally drops none, and says so); None keeps all.
        skip_bad: skip samples whose pose is not finite instead of raising (a broken .npz always
            raises: there is nothing left to read).
        verbose: print the one-line summary.

    Returns:
        One row per kept sample; `image` is `"/abs/path/file.npz#i"` for `load_image`.
    """
    _check_angle_limit(max_abs_angle)
    if isinstance(box, str):
        if box != "full":
            raise ValueError(f"box must be 'full' or four relative corners (x0, y0, x1, y1), got {box!r}")
        rel = (0.0, 0.0, 1.0, 1.0)
    else:
        rel = tuple(float(v) for v in box)
        if len(rel) != 4 or not (0 <= rel[0] < rel[2] <= 1 and 0 <= rel[1] < rel[3] <= 1):
            raise ValueError(
                f"box must be four relative corners with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1, got {box!r}"
            )
    path = Path(npz_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {_BIWI_LAYOUT})")

    images = _npz_array(path, "image")
    pose = np.asarray(_npz_array(path, "pose"))
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(f"{path}: image is {images.dtype} {images.shape} (expected {_BIWI_LAYOUT})")
    pose_ok = pose.ndim == 2 and pose.shape[1] == 3 and pose.shape[0] == images.shape[0]
    if not pose_ok or not np.issubdtype(pose.dtype, np.number):
        raise DatasetFormatError(
            f"{path}: pose is {pose.dtype} {pose.shape} for {images.shape[0]} images (expected {_BIWI_LAYOUT})"
        )
    n, height, width = images.shape[:3]
    pose = pose.astype(float)
    finite = np.isfinite(pose).all(axis=1)
    skipped = [f"{path}#{i}: pose {pose[i].tolist()} is not finite" for i in np.flatnonzero(~finite)]
    if skipped and not skip_bad:
        raise DatasetFormatError(skipped[0])

    idx = np.flatnonzero(finite)
    df = pd.DataFrame(
        {
            "name": [f"{path.stem}#{i}" for i in idx],
            "image": [f"{path}#{i}" for i in idx],
            "source": str(path),
            "dataset": "BIWI",
            "yaw": pose[idx, 0],  # pose = [yaw, pitch, roll] (FSA-Net; 6DRepNet's class BIWI)
            "pitch": pose[idx, 1],
            "roll": pose[idx, 2],
            "x0": rel[0],
            "y0": rel[1],
            "x1": rel[2],
            "y1": rel[3],
            "width": int(width),
            "height": int(height),
        }
    )
    columns = list(df.columns)
    attrs = {"box": list(rel), "n_in_file": int(n)}
    return _finish(df.to_dict("records"), columns, "BIWI", path, max_abs_angle, skipped, attrs, verbose)


# --------------------------------------------------------------------------------------------
# images


def _split_npz_ref(ref: str) -> tuple[str, int] | None:
    head, sep, tail = ref.rpartition("#")
    if sep and head.lower().endswith(".npz") and tail.isdigit():
        return head, int(tail)
    return None


def load_image(ref: str | os.PathLike, *, npz_channels: str = "BGR") -> np.ndarray:
    """The RGB image (H, W, 3) uint8 that a reader's `image` column names.

    Args:
        ref: an image path (anything PIL opens), or `"/path/file.npz#i"`: image i of the .npz's
            `image` array. The .npz is opened once and kept (memory-mapped when stored
            uncompressed), so reading all of BIWI does not reopen it per image.
        npz_channels: the channel order stored in the .npz. FSA-Net's BIWI script stores
            `cv2.imread` frames, BGR, so "BGR" (the default) flips them; "RGB" returns them as they are.

    Returns:
        A new array (H, W, 3) uint8, RGB; writing to it never touches the source.
    """
    if npz_channels not in ("BGR", "RGB"):
        raise ValueError(f"npz_channels must be 'BGR' or 'RGB', got {npz_channels!r}")
    parsed = _split_npz_ref(os.fspath(ref))
    if parsed is not None:
        npz, i = parsed
        images = _npz_array(Path(npz), "image")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DatasetFormatError(f"{npz}: image has shape {images.shape} (expected {_BIWI_LAYOUT})")
        if not 0 <= i < images.shape[0]:
            raise IndexError(f"{ref}: index {i} out of range for {images.shape[0]} images")
        img = np.array(images[i], dtype=np.uint8)
        return np.ascontiguousarray(img[..., ::-1]) if npz_channels == "BGR" else img

    from PIL import Image

    path = Path(ref)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    except Exception as e:
        raise DatasetFormatError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
