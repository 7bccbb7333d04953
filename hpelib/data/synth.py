"""SynthHeads: rendered scenes of a real head scan at known pose, with simple objects beside it.

Domains stand in for the paper's datasets (train on 300W-LP, test on AFLW2000 and BIWI), so the
cross-domain evaluation measures a real shift: other backgrounds, light, head sizes, camera and
pose spread. Each domain is a named, frozen `DomainSpec`; `DOMAINS` holds them.

| domain | stands in for | yaw | pitch | roll | head height | camera fov | backgrounds | light |
|---|---|---|---|---|---|---|---|---|
| `synth-train` | 300W-LP | U(+-90) | U(+-40) | U(+-30) | 35-70 % | 25-40 deg | solid, gradient, colour noise | soft, frontal |
| `synth-aflw` | AFLW2000 | N(0, 45) in +-90 | N(0, 20) in +-60 | N(0, 15) in +-45 | 45-80 %, centred | 15-30 deg (tele) | colour photographs, noise | hard, from the side, tinted |
| `synth-biwi` | BIWI | N(0, 35) in +-75 | N(0, 12) in +-30 | N(0, 8) in +-25 | 20-38 % | 50-60 deg (Kinect-like) | grey photographs (textures), gradient | flat indoor, sensor noise |

Pitch in `synth-aflw` reaches beyond the training range, as AFLW2000's does beyond 300W-LP's.
Angles are in degrees, in the camera frame (`hpelib.geometry`): a head off the optical axis is
seen slightly from the side (by up to `atan(offset * tan(fov / 2))`, ~10 deg in synth-train),
exactly as in a real photograph; `meta["view_offset_deg"]` records that angle.

`SceneRenderer(domain, image_size).render(rng)` makes one scene on the fly (training calls it
directly); `build_split` writes a split to disk once (images plus `manifest.jsonl`) and reuses it;
`load_split` reads it back as a DataFrame.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpelib import io, paths, prompts
from hpelib.data import render as R

# bump when a change to the rendering or sampling changes the images of a seed: splits built by
# an older version then live in other folders and are never mixed with new ones
SYNTH_VERSION = 1

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.jsonl"
COMPLETE = "COMPLETE"  # written last: a split folder without it is half-built
IMAGES = "images"

# object colours by name (linear-ish RGB albedo); names are what grounding prompts ask for
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.08, 0.08),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (1.00, 0.45, 0.05),
    "purple": (0.50, 0.15, 0.70),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.10, 0.80, 0.85),
}
SHAPES = R.SHAPES  # the object shapes: cube, sphere, cone, cylinder, torus
BACKGROUND_KINDS = ("solid", "gradient", "noise", "photo")
OBJECT_ANGLE_LIMIT = 90.0  # object orientations: yaw, pitch, roll each U(-90, 90)
_PLACEMENT_TRIES = 30  # candidate positions per object before it is left out


# --------------------------------------------------------------------------- domain specs
def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_range(name: str, value: Any, lo: float = -np.inf, hi: float = np.inf) -> None:
    ok = (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
          and lo <= value[0] <= value[1] <= hi)
    _check(ok, name, value, f"a (low, high) tuple with {lo} <= low <= high <= {hi}")


@dataclass(frozen=True)
class AngleDist:
    """How one pose angle is drawn: uniform in [-limit, limit] when `sd` is None, else a normal
    N(0, sd) truncated to [-limit, limit] (redrawn, not clipped, so the limits get no spike)."""

    limit: float
    sd: float | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.limit, (int, float)) and 0 <= self.limit <= 99, "limit", self.limit,
               "in [0, 99] degrees (the evaluation drops |angle| > 99)")
        _check(self.sd is None or (isinstance(self.sd, (int, float)) and self.sd > 0), "sd", self.sd,
               "None (uniform) or a positive number")

    def sample(self, rng: np.random.Generator) -> float:
        if self.sd is None:
            return float(rng.uniform(-self.limit, self.limit))
        for _ in range(64):
            v = float(rng.normal(0.0, self.sd))
            if abs(v) <= self.limit:
                return v
        return float(rng.uniform(-self.limit, self.limit))  # practically never reached


@dataclass(frozen=True)
class DomainSpec:
    """One SynthHeads domain: the distributions every scene parameter is drawn from.

    Ranges are `(low, high)` tuples drawn uniformly. Lengths are in head radii (the head spans
    y in [-1, 1] in its own frame).
    """

    name: str
    stands_for: str
    yaw: AngleDist
    pitch: AngleDist
    roll: AngleDist
    head_height: tuple[float, float]  # projected head height / image height (sets the distance)
    max_offset: float  # head centre: fraction of the room left in the image it may use (0 = centred)
    fov_deg: tuple[float, float]  # vertical field of view of the camera
    backgrounds: tuple[tuple[str, float], ...]  # (kind, probability)
    photos: tuple[str, ...] = ()
    photo_crop: tuple[float, float] = (0.3, 1.0)  # crop side / shorter photo side
    ambient: tuple[float, float] = (0.35, 0.65)
    diffuse: tuple[float, float] = (0.35, 0.75)
    light_cone_deg: float = 60.0  # light directions: within this angle of the camera axis
    light_tint: float = 0.08  # per-channel light colour 1 +- tint
    texture_gain: float = 0.08  # per-channel texture gain 1 +- gain (skin tone jitter)
    brightness: tuple[float, float] = (0.85, 1.15)
    saturation: tuple[float, float] = (0.7, 1.3)
    n_objects: tuple[int, int] = (0, 3)  # inclusive
    object_size: tuple[float, float] = (0.25, 0.5)  # half-extent of an object, head radii
    noise_sigma: tuple[float, float] = (0.0, 0.03)

    def __post_init__(self) -> None:
        for name in ("yaw", "pitch", "roll"):
            _check(isinstance(getattr(self, name), AngleDist), name, getattr(self, name), "an AngleDist")
        _check_range("head_height", self.head_height, 0.02, 1.5)
        _check(0 <= self.max_offset <= 1, "max_offset", self.max_offset, "in [0, 1]")
        _check_range("fov_deg", self.fov_deg, 1.0, 120.0)
        kinds = [k for k, _ in self.backgrounds]
        _check(len(kinds) > 0 and all(k in BACKGROUND_KINDS for k in kinds), "backgrounds", self.backgrounds,
               f"(kind, probability) pairs with kinds from {list(BACKGROUND_KINDS)}")
        _check(abs(sum(p for _, p in self.backgrounds) - 1) < 1e-6 and all(p >= 0 for _, p in self.backgrounds),
               "backgrounds probabilities", [p for _, p in self.backgrounds], "non-negative and summing to 1")
        _check("photo" not in kinds or len(self.photos) > 0, "photos", self.photos,
               "non-empty when backgrounds include 'photo'")
        for p in self.photos:
            _check(p in R.COLOR_PHOTOS + R.GREY_PHOTOS, "photos", p, f"one of {list(R.COLOR_PHOTOS + R.GREY_PHOTOS)}")
        _check_range("photo_crop", self.photo_crop, 0.05, 1.0)
        _check_range("ambient", self.ambient, 0.0, 2.0)
        _check_range("diffuse", self.diffuse, 0.0, 2.0)
        _check(0 <= self.light_cone_deg <= 90, "light_cone_deg", self.light_cone_deg, "in [0, 90]")
        _check(0 <= self.light_tint < 1, "light_tint", self.light_tint, "in [0, 1)")
        _check(0 <= self.texture_gain < 1, "texture_gain", self.texture_gain, "in [0, 1)")
        _check_range("brightness", self.brightness, 0.0, 3.0)
        _check_range("saturation", self.saturation, 0.0, 3.0)
        _check(isinstance(self.n_objects, tuple) and len(self.n_objects) == 2
               and 0 <= self.n_objects[0] <= self.n_objects[1] <= len(COLORS),
               "n_objects", self.n_objects, f"(low, high) integers with 0 <= low <= high <= {len(COLORS)}")
        _check_range("object_size", self.object_size, 0.01, 2.0)
        _check_range("noise_sigma", self.noise_sigma, 0.0, 0.5)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DOMAINS: dict[str, DomainSpec] = {
    "synth-train": DomainSpec(
        name="synth-train",
        stands_for="300W-LP: wide, flat yaw spread (profiles included); studio-like scenes",
        yaw=AngleDist(90), pitch=AngleDist(40), roll=AngleDist(30),
        head_height=(0.35, 0.7), max_offset=0.7, fov_deg=(25.0, 40.0),
        backgrounds=(("solid", 0.2), ("gradient", 0.35), ("noise", 0.45)),
    ),
    "synth-aflw": DomainSpec(
        name="synth-aflw",
        stands_for="AFLW2000: in-the-wild photographs, hard light, mostly frontal with long tails "
                   "(pitch beyond the training range)",
        yaw=AngleDist(90, sd=45), pitch=AngleDist(60, sd=20), roll=AngleDist(45, sd=15),
        head_height=(0.45, 0.8), max_offset=0.3, fov_deg=(15.0, 30.0),
        backgrounds=(("photo", 0.8), ("noise", 0.2)), photos=R.COLOR_PHOTOS,
        ambient=(0.1, 0.35), diffuse=(0.7, 1.2), light_cone_deg=85.0, light_tint=0.2,
        texture_gain=0.12, saturation=(0.6, 1.4),
        n_objects=(0, 2), noise_sigma=(0.0, 0.02),
    ),
    "synth-biwi": DomainSpec(
        name="synth-biwi",
        stands_for="BIWI: one indoor room, small heads seen by a wide-angle depth camera, "
                   "narrow pitch, sensor noise",
        yaw=AngleDist(75, sd=35), pitch=AngleDist(30, sd=12), roll=AngleDist(25, sd=8),
        head_height=(0.2, 0.38), max_offset=0.6, fov_deg=(50.0, 60.0),
        backgrounds=(("photo", 0.6), ("gradient", 0.4)), photos=R.GREY_PHOTOS, photo_crop=(0.5, 1.0),
        ambient=(0.4, 0.6), diffuse=(0.3, 0.5), light_cone_deg=40.0, light_tint=0.05,
        texture_gain=0.05, brightness=(0.8, 1.05), saturation=(0.6, 1.0),
        n_objects=(1, 3), object_size=(0.3, 0.6), noise_sigma=(0.02, 0.05),
    ),
}


def get_domain(domain: str | DomainSpec) -> DomainSpec:
    if isinstance(domain, DomainSpec):
        return domain
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    return DOMAINS[domain]


def override_domain(name: str, fields: dict) -> DomainSpec:
    """Replace `DOMAINS[name]` by a copy with `fields` changed (lists become tuples; the spec
    validates them), for experiments in this process. Returns the new spec."""
    spec = dataclasses.replace(get_domain(name), **{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in fields.items()})
    DOMAINS[name] = spec
    return spec


# --------------------------------------------------------------------------- scenes
@dataclass
class SceneParams:
    """A sampled scene before drawing: what to draw plus the labels that do not need pixels."""

    domain: str
    draw: R.DrawSpec
    yaw: float
    pitch: float
    roll: float
    objects: list[dict]  # name, shape, color, yaw, pitch, roll, axis, id (boxes come from the render)
    meta: dict


@dataclass
class Scene:
    """One rendered scene with its labels.

    Attributes:
        image: `(H, W, 3)` uint8 RGB.
        box: the head's box `(x0, y0, x1, y1)`, relative to the image size, origin top-left: the
            box of its visible pixels (the neck excluded).
        yaw, pitch, roll: head pose in degrees (`hpelib.geometry` convention).
        objects: one dict per visible object: `name` ("red cube"), `shape`, `color`, `box`,
            `yaw`/`pitch`/`roll` of its orientation (same convention; ambiguous for symmetric
            shapes: any for a sphere, the 24 cube symmetries, spins about the axis of a cone,
            cylinder or torus), `axis` (its symmetry axis, +y of the shape, in the camera frame:
            a cone's apex direction) and `pixels` (visible pixel count).
        meta: domain, camera, head placement, light and background parameters, projected nose tip
            (`nose_xy`) and head centre (`center_xy`) in relative image coordinates, the face
            parts' boxes (`parts`) and the 68 landmarks' image points (`landmarks`, `(68, 2)`,
            self-occluded ones too).
        ids: `(H, W)` uint8 instance ids (`render.ID_*`; objects from `ID_FIRST_OBJECT`).
    """

    image: np.ndarray
    box: tuple[float, float, float, float]
    yaw: float
    pitch: float
    roll: float
    objects: list[dict]
    meta: dict
    ids: np.ndarray | None = field(default=None, repr=False)


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _light(spec: DomainSpec, rng: np.random.Generator) -> R.Light:
    cos_max = np.cos(np.radians(spec.light_cone_deg))
    theta = np.arccos(rng.uniform(cos_max, 1.0))
    phi = rng.uniform(0, 2 * np.pi)
    direction = (float(np.sin(theta) * np.cos(phi)), float(np.sin(theta) * np.sin(phi)), float(np.cos(theta)))
    color = tuple(float(c) for c in 1.0 + rng.uniform(-spec.light_tint, spec.light_tint, 3))
    return R.Light(direction=direction, ambient=_uniform(rng, spec.ambient), diffuse=_uniform(rng, spec.diffuse),
                   color=color)


def _background(spec: DomainSpec, rng: np.random.Generator) -> R.Background:
    kinds = [k for k, _ in spec.backgrounds]
    probs = np.array([p for _, p in spec.backgrounds])
    kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]
    colors = tuple(tuple(float(c) for c in rng.uniform(0, 1, 3)) for _ in range(2))
    if kind == "solid":
        return R.Background("solid", colors)
    if kind == "gradient":
        return R.Background("gradient", colors, angle_deg=float(rng.uniform(0, 360)))
    if kind == "noise":
        k = int(rng.integers(2, 9))  # 2x2 .. 8x8 colour blobs
        return R.Background("noise", colors, noise=rng.integers(0, 256, (k, k, 3), dtype=np.uint8))
    photo = spec.photos[int(rng.integers(len(spec.photos)))]
    h, w = R.load_photo(photo).shape[:2]
    side = _uniform(rng, spec.photo_crop) * min(h, w)  # a square crop, in pixels
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    crop = (float(x0 / w), float(y0 / h), float((x0 + side) / w), float((y0 + side) / h))
    tint = tuple(float(c) for c in 1.0 + rng.uniform(-0.15, 0.15, 3))
    return R.Background("photo", (tint, tint), photo=photo, crop=crop, flip=bool(rng.integers(2)))


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """`euler_to_matrix` for one angle triple, without scipy's per-call overhead (~50 us, a
    noticeable share of a ~1.5 ms render); tests check that both agree."""
    cy, sy = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    cp, sp = math.cos(math.radians(pitch)), math.sin(math.radians(pitch))
    cr, sr = math.cos(math.radians(roll)), math.sin(math.radians(roll))
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    return rz @ ry @ rx


def _round_angle(v: float) -> float:
    # labels are stored with 2 decimals; rendering uses the rounded value so the label is exact
    return round(float(v), 2) + 0.0


def sample_scene(domain: str | DomainSpec, rng: np.random.Generator) -> SceneParams:
    """Draw every parameter of one scene from the domain's distributions.

    Deterministic given the generator's state; draws happen in a fixed order.
    """
    spec = get_domain(domain)
    yaw, pitch, roll = (_round_angle(d.sample(rng)) for d in (spec.yaw, spec.pitch, spec.roll))

    # camera and head placement: a head spans 2 radii, so it looks `head_height` tall at distance
    # 1 / (head_height * tan(fov / 2)); its centre goes to `offset` in normalised device coords
    fov = _uniform(rng, spec.fov_deg)
    tan_half = float(np.tan(np.radians(fov) / 2))
    height = _uniform(rng, spec.head_height)
    dist = 1.0 / (height * tan_half)
    room = np.maximum(1.0 - np.array([0.8 * height, height]), 0.0)  # the head is ~0.8 as wide as tall
    offset = spec.max_offset * room * rng.uniform(-1, 1, 2)
    head_t = (float(offset[0] * dist * tan_half), float(offset[1] * dist * tan_half), -dist)

    light = _light(spec, rng)
    background = _background(spec, rng)
    brightness = _uniform(rng, spec.brightness)
    gain = tuple(float(g) for g in brightness * (1.0 + rng.uniform(-spec.texture_gain, spec.texture_gain, 3)))
    head = R.Instance("head", rotation(yaw, pitch, roll), head_t, 1.0, color=gain,
                      saturation=_uniform(rng, spec.saturation),
                      back_color=tuple(float(c) for c in np.array([0.09, 0.07, 0.06]) * brightness))

    # objects: beside the head, not over it, and not over each other (circles in NDC)
    instances = [head]
    objects = []
    centres, radii = [offset], [0.85 * height]  # placed circles in NDC, the head first
    n_obj = int(rng.integers(spec.n_objects[0], spec.n_objects[1] + 1))
    names = list(COLORS)
    color_order = rng.permutation(len(names))
    for i in range(n_obj):
        shape = R.SHAPES[int(rng.integers(len(R.SHAPES)))]
        color = names[int(color_order[i])]
        size = _uniform(rng, spec.object_size)
        depth = dist * float(rng.uniform(0.85, 1.25))
        r_ndc = 1.3 * size / (depth * tan_half)  # a cube's corners reach ~1.3 half-extents
        angles = [_round_angle(a) for a in rng.uniform(-OBJECT_ANGLE_LIMIT, OBJECT_ANGLE_LIMIT, 3)]
        # 30 candidate centres inside the image; the first clear of everything placed wins
        candidates = rng.uniform(-1, 1, (_PLACEMENT_TRIES, 2)) * max(1.0 - r_ndc, 0.0)
        gaps = np.linalg.norm(candidates[:, None, :] - np.asarray(centres)[None], axis=-1) - np.asarray(radii)
        clear = np.flatnonzero((gaps >= r_ndc).all(axis=1))
        if clear.size == 0:
            continue  # no room: fewer objects in this scene
        centre = candidates[clear[0]]
        centres.append(centre)
        radii.append(r_ndc)
        rot = rotation(*angles)
        oid = R.ID_FIRST_OBJECT + len(objects)
        instances.append(R.Instance(shape, rot, (float(centre[0] * depth * tan_half),
                                                 float(centre[1] * depth * tan_half), -depth),
                                    size, color=COLORS[color], id=oid))
        objects.append({"name": f"{color} {shape}", "shape": shape, "color": color,
                        "yaw": angles[0], "pitch": angles[1], "roll": angles[2],
                        "axis": [round(float(a), 4) for a in rot[:, 1]], "id": oid})

    draw = R.DrawSpec(fov_deg=fov, background=background, light=light, instances=instances,
                      noise_sigma=_uniform(rng, spec.noise_sigma), noise_seed=float(rng.uniform(0, 100)))
    meta = {
        "fov_deg": fov, "distance": dist, "head_height": height,
        "head_translation": list(head_t),
        "view_offset_deg": float(np.degrees(np.arctan(np.hypot(*offset) * tan_half))),
        "background": background.kind, "photo": background.photo,
        "light_direction": list(light.direction), "ambient": light.ambient, "diffuse": light.diffuse,
        "noise_sigma": draw.noise_sigma,
    }
    return SceneParams(spec.name, draw, yaw, pitch, roll, objects, meta)


def with_pose(params: SceneParams, yaw: float, pitch: float, roll: float) -> SceneParams:
    """A copy of `params` with the head turned to another pose (everything else unchanged)."""
    head = dataclasses.replace(params.draw.instances[0], rotation=rotation(yaw, pitch, roll))
    draw = dataclasses.replace(params.draw, instances=[head, *params.draw.instances[1:]])
    return dataclasses.replace(params, draw=draw, yaw=float(yaw), pitch=float(pitch), roll=float(roll))


# Face parts as unions of iBUG landmark groups (`render.LANDMARK_GROUPS`); each is symmetric under
# left-right mirroring, so a mirrored scene's part is the mirrored box of the same name.
FACE_PARTS = {"face": ("chin", "leye", "reye", "leyebrow", "nose", "reyebrow", "mouth"),
              "eyes": ("leye", "reye"), "nose": ("nose",), "mouth": ("mouth",)}


def face_part_boxes(landmarks_camera: np.ndarray, fov_deg: float) -> dict[str, list[float]]:
    """Relative image boxes `(x0, y0, x1, y1)` of the face parts, from the head's 68 landmarks in
    the camera frame: the box around each part's projected landmarks (self-occluded ones too, so a
    part's box is a geometric fact of the pose, not of what the renderer happened to show)."""
    xy = R.project(np.asarray(landmarks_camera, np.float64), fov_deg)
    out = {}
    for name, groups in FACE_PARTS.items():
        pts = np.concatenate([xy[R.LANDMARK_GROUPS[g]] for g in groups])
        lo, hi = np.clip(pts.min(0), 0.0, 1.0), np.clip(pts.max(0), 0.0, 1.0)
        out[name] = [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]
    return out


class SceneRenderer:
    """Renders scenes of one domain at one size; cheap to call in a training loop.

    The OpenGL context is created on the first `render`/`draw` (not in `__init__`), so a renderer
    can be built before a DataLoader forks its workers.
    """

    def __init__(self, domain: str | DomainSpec, image_size: int):
        self.spec = get_domain(domain)
        _check(isinstance(image_size, (int, np.integer)) and 16 <= image_size <= 2048, "image_size", image_size,
               "an integer in [16, 2048]")
        self.image_size = int(image_size)
        self.min_object_pixels = max(3, round(0.0008 * image_size ** 2))

    def sample(self, rng: np.random.Generator) -> SceneParams:
        return sample_scene(self.spec, rng)

    def render(self, rng: np.random.Generator) -> Scene:
        """Sample and draw one scene; deterministic given `rng`'s state."""
        return self.draw(self.sample(rng))

    def draw(self, params: SceneParams) -> Scene:
        image, ids = R.get_renderer(self.image_size).draw(params.draw)
        boxes = R.boxes_from_ids(ids, [R.ID_HEAD] + [o["id"] for o in params.objects])
        if R.ID_HEAD not in boxes:
            raise RuntimeError(f"the head is not visible in a {params.domain} scene (meta {params.meta})")
        box, head_pixels = boxes[R.ID_HEAD]
        objects = []
        for o in params.objects:
            if o["id"] in boxes and boxes[o["id"]][1] >= self.min_object_pixels:
                b, n = boxes[o["id"]]
                objects.append({**o, "box": [float(v) for v in b], "pixels": n})
        head = params.draw.instances[0]
        Rm = np.asarray(head.rotation)
        t = np.asarray(head.translation)
        mesh = R.load_head_mesh()
        meta = dict(params.meta, domain=params.domain, head_pixels=head_pixels,
                    nose_xy=[float(v) for v in R.project(Rm @ mesh.nose_tip + t, params.draw.fov_deg)],
                    center_xy=[float(v) for v in R.project(t, params.draw.fov_deg)],
                    parts=face_part_boxes(mesh.landmarks @ Rm.T + t, params.draw.fov_deg),
                    landmarks=R.project(mesh.landmarks @ Rm.T + t, params.draw.fov_deg).astype(np.float32))
        return Scene(image, tuple(float(v) for v in box), params.yaw, params.pitch, params.roll,
                     objects, meta, ids)


def scene_prompts(scene: Scene, decimals: int = 0) -> dict:
    """The prompt/answer pairs of a scene: head pose, and grounding of the head and each object.

    Returns:
        `{"hpe_prompt", "hpe_answer", "grounding": [{"target", "prompt", "answer"}, ...]}`, the
        head first.
    """
    grounding = [{"target": prompts.HEAD, "prompt": prompts.grounding_prompt(prompts.HEAD),
                  "answer": prompts.format_box(scene.box)}]
    for o in scene.objects:
        grounding.append({"target": o["name"], "prompt": prompts.grounding_prompt(o["name"]),
                          "answer": prompts.format_box(o["box"])})
    return {"hpe_prompt": prompts.HPE_PROMPT,
            "hpe_answer": prompts.format_hpe(scene.box, scene.yaw, scene.pitch, scene.roll, decimals=decimals),
            "grounding": grounding}


# --------------------------------------------------------------------------- splits on disk
def scene_rng(domain: str, split: str, seed: int, index: int) -> np.random.Generator:
    """The generator of scene `index` of a split.

    One independent stream per (seed, domain, split, index): test scenes never repeat training
    scenes, and the first k scenes of a split do not depend on its size.
    """
    key = [int(seed), zlib.crc32(domain.encode()), zlib.crc32(split.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(key))


def split_key(domain: str, split: str, n: int, image_size: int, seed: int, decimals: int = 0) -> str:
    """A short hash of everything that decides a split's content."""
    payload = {"domain": get_domain(domain).to_dict(), "split": split, "n": n, "image_size": image_size,
               "seed": seed, "decimals": decimals, "version": SYNTH_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def split_dir(domain: str, split: str, n: int, image_size: int, seed: int, decimals: int = 0) -> Path:
    return paths.synth_dir() / f"{domain}-{split}-{split_key(domain, split, n, image_size, seed, decimals)}"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE).is_file()


def _manifest_row(scene: Scene, domain: str, split: str, seed: int, index: int, image: str,
                  image_size: int, decimals: int) -> dict:
    x0, y0, x1, y1 = scene.box
    m = scene.meta
    objects = [{k: v for k, v in o.items() if k != "id"} for o in scene.objects]
    return {"image": image, "yaw": scene.yaw, "pitch": scene.pitch, "roll": scene.roll,
            "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "domain": domain, "split": split, "seed": seed, "index": index, "image_size": image_size,
            "objects": objects, **scene_prompts(scene, decimals),
            "background": m["background"], "photo": m["photo"], "fov_deg": m["fov_deg"],
            "distance": m["distance"], "view_offset_deg": m["view_offset_deg"],
            "nose_x": m["nose_xy"][0], "nose_y": m["nose_xy"][1], "head_pixels": m["head_pixels"],
            "light_direction": m["light_direction"], "ambient": m["ambient"], "diffuse": m["diffuse"],
            "noise_sigma": m["noise_sigma"]}


def build_split(domain: str, split: str, n: int, image_size: int, seed: int, *, decimals: int = 0,
                progress: bool = True) -> Path:
    """Render a split to `synth_dir()/<domain>-<split>-<hash>/`, or reuse it if it exists.

    The folder holds `images/000000.png ...`, `manifest.jsonl` (one row per image, see
    `load_split`), `config.json` and, written last, `COMPLETE`. It is built in a temporary folder
    and renamed at the end, so it is either whole or absent; a folder without `COMPLETE` (left
    by an older, interrupted build) is deleted and rebuilt. Same arguments, same bytes.

    Args:
        domain: a name in `DOMAINS`.
        split: "train", "val" or "test"; each has its own random stream (`scene_rng`).
        n: number of scenes.
        image_size: side of the square images in pixels.
        seed: the study's seed.
        decimals: decimals of the angles in the answers (`format_hpe`).
        progress: show a tqdm progress bar.

    Returns:
        The split folder.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    spec = get_domain(domain)
    _check(split in SPLITS, "split", split, f"one of {list(SPLITS)}")
    _check(isinstance(n, int) and n > 0, "n", n, "a positive integer")
    _check(isinstance(seed, int) and seed >= 0, "seed", seed, "an integer >= 0")
    out = split_dir(spec.name, split, n, image_size, seed, decimals)
    if is_complete(out):
        return out
    if out.exists():  # half-built: never used, rebuilt from scratch
        shutil.rmtree(out)

    def save_png(image: np.ndarray, path: Path) -> None:
        # zlib level 1: a third of level 6's time for ~10 % more bytes (noisy 128 px scenes)
        Image.fromarray(image).save(path, compress_level=1)

    renderer = SceneRenderer(spec, image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / IMAGES).mkdir()
        rows = []
        # PNG encoding (PIL releases the GIL) overlaps the next renders in two threads
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending: deque = deque()
            for i in tqdm(range(n), desc=f"{spec.name} {split}", unit="img", disable=not progress):
                scene = renderer.render(scene_rng(spec.name, split, seed, i))
                rel = f"{IMAGES}/{i:06d}.png"
                pending.append(pool.submit(save_png, scene.image, tmp / rel))
                rows.append(_manifest_row(scene, spec.name, split, seed, i, rel, image_size, decimals))
                while len(pending) > 64:  # bounded: memory stays small for any n
                    pending.popleft().result()
            for f in pending:
                f.result()  # re-raises an encoding error
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")  # insertion order: the columns of load_split
        io.write_json(tmp / "config.json", {"domain": spec.to_dict(), "split": split, "n": n,
                                            "image_size": image_size, "seed": seed, "decimals": decimals,
                                            "version": SYNTH_VERSION})
        (tmp / COMPLETE).write_text("ok\n", encoding="utf-8")  # last
        tmp.chmod(0o755)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_complete(out):  # not a concurrent build of the same split that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_split(path: str | os.PathLike):
    """A built split as a DataFrame, one row per image.

    Columns: `image` (absolute path), `yaw`, `pitch`, `roll` (degrees), `x0`, `y0`, `x1`, `y1`
    (head box, relative), `domain`, `split`, `seed`, `index`, `image_size`, `objects` (list of
    dicts), `hpe_prompt`, `hpe_answer`, `grounding` (list of {target, prompt, answer}), and
    scene metadata (`background`, `photo`, `fov_deg`, `distance`, `view_offset_deg`, `nose_x`,
    `nose_y`, `head_pixels`, light and noise).

    Raises:
        FileNotFoundError: `path` is not a complete split folder.
    """
    import pandas as pd

    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete SynthHeads split (no {COMPLETE} marker); "
                                f"build it with hpelib.data.synth.build_split")
    with open(path / MANIFEST, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    df = pd.DataFrame(rows)
    df["image"] = [str((path / p).resolve()) for p in df["image"]]
    return df
