"""Headless OpenGL rendering of SynthHeads scenes (moderngl on EGL, Mesa's llvmpipe).

What a scene is made of, all in the camera frame of `hpelib.geometry` (x to image right, y up,
z toward the viewer; the camera sits at the origin and looks along -z, OpenGL's eye space):

- a background drawn as a full-screen quad: a solid colour, a linear gradient, smooth colour
  noise, or a crop of a photograph;
- the head scan (`james.obj`, textured with `james.jpg`), put into a canonical frame where the
  face looks along +z, so that a pose `R = euler_to_matrix(yaw, pitch, roll)` applied to it is
  exactly the head's pose in the camera frame; its lighting is Lambert plus ambient, with a
  colour jitter of the texture;
- simple coloured primitives (cube, sphere, cone, cylinder, torus from trimesh).

Every fragment also writes an *instance id* into the alpha channel (0 background, 1 head,
2 neck, 3.. objects), read back with the colour, so the head box is the box of the head's
visible pixels (occlusion and image borders included), not a guess from its 3D extent.

One EGL context per process (`get_context`), created on first use, and one `GLRenderer` per
image size holding the uploaded meshes and textures (`get_renderer`). A context does not survive
`fork`, so create renderers in the process that uses them (e.g. inside a DataLoader worker).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri"

# instance ids written to the alpha channel
ID_BACKGROUND = 0
ID_HEAD = 1
ID_NECK = 2  # drawn with the head, but not part of its box (300W-LP boxes stop at the chin)
ID_FIRST_OBJECT = 3

NEAR, FAR = 0.1, 200.0  # clip planes in head radii; scenes sit 2-25 radii from the camera

# the 68 iBUG landmarks of james.ljson, by the groups that file names
LANDMARK_GROUPS = {"chin": slice(0, 17), "leye": slice(17, 23), "reye": slice(23, 29),
                    "leyebrow": slice(29, 34), "nose": slice(34, 43), "reyebrow": slice(43, 48),
                    "mouth": slice(48, 68)}
NOSE_TIP = 37  # landmark index of the nose tip (the nose point farthest from the face)
CHIN = 8  # landmark index of the chin's lowest point
NECK_SLOPE_DEG = 30.0  # the head/neck boundary rises 30 deg backwards from the chin


class RenderError(RuntimeError):
    """OpenGL/EGL is not usable here."""


# --------------------------------------------------------------------------- the head mesh
@dataclass(frozen=True)
class HeadMesh:
    """The head scan in its canonical frame.

    Canonical frame: x from the subject's right eye to the left eye (image right when the face
    looks at the camera), y up (perpendicular to x, from the mouth toward the eyes), z = x cross y
    toward the face (the nose). The origin is the centre of the head's box (neck excluded) and one
    unit is half the head's height, so the head spans y in [-1, 1].

    Attributes:
        positions: `(N, 3)` float32 vertex positions (one vertex per position/uv pair of the OBJ).
        normals: `(N, 3)` float32 unit normals, outward.
        uvs: `(N, 2)` float32 texture coordinates (OpenGL: v = 0 at the image's bottom row).
        part: `(N,)` uint8, `ID_HEAD` or `ID_NECK`.
        faces: `(F, 3)` uint32 counter-clockwise seen from outside.
        texture: `(H, W, 3)` uint8, rows bottom-up (ready for OpenGL).
        landmarks: `(68, 3)` float64 iBUG landmarks in the canonical frame.
    """

    positions: np.ndarray
    normals: np.ndarray
    uvs: np.ndarray
    part: np.ndarray
    faces: np.ndarray
    texture: np.ndarray
    landmarks: np.ndarray

    @property
    def nose_tip(self) -> np.ndarray:
        return self.landmarks[NOSE_TIP]


def _parse_obj(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions `(V, 3)`, uvs `(T, 2)`, and per-corner indices `(F, 3)` into each, 0-based."""
    v, vt, fv, ft = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("v "):
                v.append(line.split()[1:4])
            elif line.startswith("vt "):
                vt.append(line.split()[1:3])
            elif line.startswith("f "):
                corners = [c.split("/") for c in line.split()[1:]]
                if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                    raise ValueError(f"{path}: expected triangles with texture coordinates, got {line.strip()!r}")
                fv.append([int(c[0]) - 1 for c in corners])
                ft.append([int(c[1]) - 1 for c in corners])
    return (np.asarray(v, np.float64), np.asarray(vt, np.float64),
            np.asarray(fv, np.int64), np.asarray(ft, np.int64))


def _vertex_normals(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals `(V, 3)` of a triangle mesh (counter-clockwise faces)."""
    p = positions[faces]  # (F, 3, 3)
    fn = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])  # length = 2 x area
    vn = np.zeros_like(positions)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def canonical_frame(landmarks: np.ndarray) -> np.ndarray:
    """Rotation `(3, 3)` whose rows are the canonical x, y, z axes in scan coordinates.

    Args:
        landmarks: `(68, 3)` iBUG landmarks of the scan, in `LANDMARK_GROUPS` order.
    """
    g = {k: landmarks[s] for k, s in LANDMARK_GROUPS.items()}
    x = g["reye"].mean(0) - g["leye"].mean(0)  # "reye" is the eye on the image's right
    up = (g["leye"].mean(0) + g["reye"].mean(0)) / 2 - g["mouth"].mean(0)
    x /= np.linalg.norm(x)
    y = up - x * (up @ x)
    y /= np.linalg.norm(y)
    z = np.cross(x, y)
    return np.stack([x, y, z])


@functools.lru_cache(maxsize=1)
def landmark_mirror() -> np.ndarray:
    """`(68,)` the index of each landmark's left-right counterpart (the chin's ends swap, the
    nose's middle line maps to itself): the assignment of the canonical landmarks to their mirror
    images (x -> -x) with the least total distance, an involution."""
    from scipy.optimize import linear_sum_assignment

    lm = load_head_mesh().landmarks
    dist = np.linalg.norm((lm * np.array([-1.0, 1.0, 1.0]))[:, None] - lm[None], axis=-1)
    perm = linear_sum_assignment(dist)[1]
    if not (perm[perm] == np.arange(len(lm))).all():
        raise RuntimeError("the head scan's landmarks are not left-right symmetric enough to pair them")
    return perm


@functools.lru_cache(maxsize=2)
def load_head_mesh(texture_width: int = 1024) -> HeadMesh:
    """Parse the head scan (fetching it on first use) and put it into the canonical frame.

    Args:
        texture_width: the texture is downsampled to this width (the 2400 px original is far
            more than a 128-1024 px render needs); mipmaps do the rest.
    """
    from PIL import Image

    from hpelib.data import assets

    obj_path, tex_path = assets.head_mesh_files()
    ljson = json.loads(assets.head_landmarks_file().read_text(encoding="utf-8"))
    landmarks = np.asarray(ljson["groups"]["LJSON"]["landmarks"]["points"], np.float64)
    if landmarks.shape != (68, 3):
        raise ValueError(f"{assets.head_landmarks_file()}: expected 68 3D landmarks, got {landmarks.shape}")

    v, vt, fv, ft = _parse_obj(obj_path)

    # canonical frame: rotate, then centre and scale on the head part (neck excluded)
    frame = canonical_frame(landmarks)
    v = v @ frame.T
    lm = landmarks @ frame.T
    chin = lm[CHIN]
    # the neck: below a plane through the chin that rises toward the back of the head
    neck = v[:, 1] < chin[1] + np.tan(np.radians(NECK_SLOPE_DEG)) * (chin[2] - v[:, 2])
    head_v = v[~neck]
    centre = (head_v.min(0) + head_v.max(0)) / 2
    scale = (head_v[:, 1].max() - head_v[:, 1].min()) / 2
    v = (v - centre) / scale
    lm = (lm - centre) / scale

    # outward, counter-clockwise winding: the nose tip's normal must point along +z
    vn = _vertex_normals(v, fv)
    nearest = np.argmin(np.linalg.norm(v - lm[NOSE_TIP], axis=1))
    if vn[nearest, 2] < 0:
        fv, ft = fv[:, ::-1], ft[:, ::-1]
        vn = -vn

    # one GPU vertex per (position, uv) pair
    pairs = np.stack([fv.ravel(), ft.ravel()], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    faces = inverse.reshape(-1, 3).astype(np.uint32)
    pi, ti = uniq[:, 0], uniq[:, 1]

    img = Image.open(tex_path).convert("RGB")
    h = round(img.height * texture_width / img.width)
    texture = np.asarray(img.resize((texture_width, h), Image.Resampling.LANCZOS))[::-1].copy()

    return HeadMesh(
        positions=v[pi].astype(np.float32),
        normals=vn[pi].astype(np.float32),
        uvs=vt[ti].astype(np.float32),
        part=np.where(neck[pi], ID_NECK, ID_HEAD).astype(np.uint8),
        faces=faces,
        texture=texture,
        landmarks=lm,
    )


def _first_per_group(groups: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """For each group id 0..G-1 (all present), the index of its member with the smallest key."""
    order = np.lexsort((order_key, groups))
    first = np.ones(len(order), bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    return order[first]


def decimate(mesh: HeadMesh, cell: float) -> HeadMesh:
    """A coarser copy of the head by vertex clustering on a grid of `cell` head radii.

    llvmpipe's cost is per triangle (~0.3 us), and at 128 px the scan's 12k triangles are far
    finer than the pixels, so small images use a coarser mesh (`head_cell`). Vertices in one grid
    cell merge into the one nearest their mean; triangles whose corners merged vanish. Texture
    charts (the scan's texture holds two photographs, left and right) are kept apart so no
    triangle samples across a chart seam, while their positions stay shared, so no crack opens.
    """
    P = mesh.positions.astype(np.float64)
    F = mesh.faces.astype(np.int64)
    n = len(P)

    # texture charts: connected components of the (position, uv) vertex graph
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate([F[:, [0, 1]], F[:, [1, 2]], F[:, [2, 0]]])
    _, chart = connected_components(coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)),
                                    directed=False)

    # cluster: one grid cell; its representative is the member nearest the members' mean
    _, cluster = np.unique(np.floor(P / cell).astype(np.int64), axis=0, return_inverse=True)
    cluster = cluster.ravel()
    n_cl = cluster.max() + 1
    counts = np.bincount(cluster, minlength=n_cl)[:, None]
    mean = np.stack([np.bincount(cluster, P[:, k], n_cl) for k in range(3)], 1) / counts
    rep = _first_per_group(cluster, np.linalg.norm(P - mean[cluster], axis=1))  # (n_cl,)
    rep_pos = P[rep]

    # GPU vertex: one per (cluster, chart); its uv from the member nearest the representative
    _, group = np.unique(np.stack([cluster, chart], 1), axis=0, return_inverse=True)
    group = group.ravel()
    g_first = _first_per_group(group, np.linalg.norm(P - rep_pos[cluster], axis=1))
    g_cluster = cluster[g_first]

    # faces: drop collapsed ones and duplicates (same three clusters)
    cf = cluster[F]
    keep = (cf[:, 0] != cf[:, 1]) & (cf[:, 1] != cf[:, 2]) & (cf[:, 0] != cf[:, 2])
    idx = np.flatnonzero(keep)
    _, first = np.unique(np.sort(cf[idx], axis=1), axis=0, return_index=True)
    idx = idx[np.sort(first)]
    gf = group[F[idx]]
    used, faces = np.unique(gf, return_inverse=True)
    faces = faces.reshape(-1, 3)

    # normals from the coarse surface, per cluster (shared across charts: no shading seam)
    cl_normals = _vertex_normals(rep_pos, cf[idx])
    g = used
    return HeadMesh(
        positions=rep_pos[g_cluster[g]].astype(np.float32),
        normals=cl_normals[g_cluster[g]].astype(np.float32),
        uvs=mesh.uvs[g_first[g]],
        part=mesh.part[rep[g_cluster[g]]],
        faces=faces.astype(np.uint32),
        texture=mesh.texture,
        landmarks=mesh.landmarks,
    )


def head_cell(image_size: int) -> float:
    """Grid cell (head radii) of the head mesh used at `image_size` px; 0 means the full scan.

    A head at most ~0.8 of the image tall makes one radius ~0.4 x image_size px; cells of ~3 px
    keep the silhouette and shading smooth (128 px: 0.059, ~4k of the 12k triangles).
    """
    cell = 7.5 / image_size
    return 0.0 if cell < 0.02 else round(cell, 4)


@functools.lru_cache(maxsize=4)
def get_head_mesh(cell: float = 0.0) -> HeadMesh:
    """The head mesh at a level of detail: the full scan for `cell == 0`, else `decimate`d."""
    mesh = load_head_mesh()
    return mesh if cell <= 0 else decimate(mesh, cell)


# --------------------------------------------------------------------------- primitives
SHAPES = ("cube", "sphere", "cone", "cylinder", "torus")


@functools.lru_cache(maxsize=None)
def primitive_mesh(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """A trimesh primitive as unindexed triangles: positions and normals, each `(3F, 3)` float32.

    The shape is centred, its symmetry axis is +y (a cone points up), and it fits in [-1, 1]^3.
    Smooth normals on curved surfaces; flat ones across sharp edges (cube faces, cylinder caps).
    """
    import trimesh

    makers = {
        "cube": lambda: trimesh.creation.box(extents=(2, 2, 2)),
        "sphere": lambda: trimesh.creation.icosphere(subdivisions=2),
        "cone": lambda: trimesh.creation.cone(radius=1.0, height=2.0, sections=24),
        "cylinder": lambda: trimesh.creation.cylinder(radius=1.0, height=2.0, sections=24),
        "torus": lambda: trimesh.creation.torus(major_radius=1.0, minor_radius=0.38,
                                                major_sections=24, minor_sections=12),
    }
    if shape not in makers:
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")
    mesh = makers[shape]()
    v = np.asarray(mesh.vertices, np.float64)
    v = v - (v.min(0) + v.max(0)) / 2
    v = v[:, [0, 2, 1]] * np.array([1, 1, -1])  # z axis -> y axis (a proper rotation)
    v /= np.abs(v).max()
    faces = np.asarray(mesh.faces)
    vn = _vertex_normals(v, faces)
    p = v[faces]
    fn = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    fn /= np.linalg.norm(fn, axis=1, keepdims=True)
    corner_n = vn[faces]  # (F, 3, 3)
    smooth = (corner_n * fn[:, None, :]).sum(-1) > np.cos(np.radians(40))
    corner_n = np.where(smooth[..., None], corner_n, fn[:, None, :])
    return p.reshape(-1, 3).astype(np.float32), corner_n.reshape(-1, 3).astype(np.float32)


# --------------------------------------------------------------------------- photographs
# Photographs bundled with scikit-image (no download), used as backgrounds. None shows a face:
# `astronaut` and `lfw_subset` would put a second, unlabelled head into the scene.
COLOR_PHOTOS = ("chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "retina", "motorcycle")
GREY_PHOTOS = ("brick", "grass", "gravel", "moon", "coins", "clock", "page", "text", "cell")


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as `(H, W, 3)` uint8 RGB (grey ones repeated)."""
    import skimage.data

    if name not in COLOR_PHOTOS + GREY_PHOTOS:
        raise ValueError(f"photo must be one of {list(COLOR_PHOTOS + GREY_PHOTOS)}, got {name!r}")
    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (img * 255).astype(np.uint8) if img.dtype == bool else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


# --------------------------------------------------------------------------- what to draw
@dataclass
class Light:
    """Lambert plus ambient: `colour * (ambient + diffuse * max(0, n . direction))`."""

    direction: tuple[float, float, float] = (0.0, 0.0, 1.0)  # unit, toward the light, camera frame
    ambient: float = 0.5
    diffuse: float = 0.6
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class Background:
    """`kind`: "solid" (colors[0]), "gradient" (colors[0] -> colors[1] along `angle_deg`),
    "noise" (bilinear upsampling of the small `noise` image: smooth colour blobs) or "photo"
    (the `crop` (u0, v0, u1, v1) of photograph `photo`, relative, tinted by colors[0])."""

    kind: str = "solid"
    colors: tuple = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    angle_deg: float = 0.0
    noise: np.ndarray | None = None  # (k, k, 3) uint8, k <= 16
    photo: str = ""
    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    flip: bool = False


@dataclass
class Instance:
    """One mesh in the scene: `p_camera = rotation @ (scale * p_model) + translation`."""

    mesh: str  # "head" or one of SHAPES
    rotation: np.ndarray  # (3, 3)
    translation: tuple[float, float, float]
    scale: float = 1.0
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)  # objects: albedo; head: per-channel gain
    saturation: float = 1.0  # head only: texture saturation (1 = as scanned)
    back_color: tuple[float, float, float] = (0.09, 0.07, 0.06)  # head only: inside of the shell
    id: int = ID_HEAD


@dataclass
class DrawSpec:
    """Everything `GLRenderer.draw` needs for one image."""

    fov_deg: float
    background: Background
    light: Light
    instances: list[Instance] = field(default_factory=list)
    noise_sigma: float = 0.0  # per-pixel sensor noise, in [0, 1] colour units
    noise_seed: float = 0.0


def projection_matrix(fov_deg: float, near: float = NEAR, far: float = FAR) -> np.ndarray:
    """OpenGL perspective projection `(4, 4)` with vertical field of view `fov_deg`, aspect 1."""
    f = 1.0 / np.tan(np.radians(fov_deg) / 2)
    return np.array([[f, 0, 0, 0],
                     [0, f, 0, 0],
                     [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)],
                     [0, 0, -1, 0]], dtype=np.float64)


def project(points: np.ndarray, fov_deg: float) -> np.ndarray:
    """Camera-frame points `(..., 3)` to relative image coordinates `(..., 2)`.

    (0, 0) is the image's top-left corner and (1, 1) its bottom-right, as in the boxes.
    """
    points = np.asarray(points, np.float64)
    f = 1.0 / np.tan(np.radians(fov_deg) / 2)
    ndc = f * points[..., :2] / -points[..., 2:3]
    return np.stack([(ndc[..., 0] + 1) / 2, (1 - ndc[..., 1]) / 2], axis=-1)


def boxes_from_ids(ids: np.ndarray, wanted: Sequence[int]) -> dict[int, tuple[tuple[float, float, float, float], int]]:
    """Box and pixel count of each wanted instance id in an id image.

    Args:
        ids: `(H, W)` uint8 instance ids, row 0 at the top.
        wanted: the ids to measure.

    Returns:
        `{id: ((x0, y0, x1, y1), n_pixels)}` with relative corners in [0, 1] (x1, y1 exclusive:
        pixel column c spans [c/W, (c+1)/W]); ids with no visible pixel are left out.
    """
    h, w = ids.shape
    out = {}
    for k in wanted:
        mask = ids == k
        n = int(mask.sum())
        if n == 0:
            continue
        cols = np.flatnonzero(mask.any(axis=0))
        rows = np.flatnonzero(mask.any(axis=1))
        out[k] = ((cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h), n)
    return out


# --------------------------------------------------------------------------- OpenGL
_MESH_VS = """
#version 330
uniform mat4 mvp;
uniform mat4 model;  // model -> camera frame
uniform mat3 normal_matrix;
in vec3 in_position;
in vec3 in_normal;
in vec2 in_uv;
in float in_part;
out vec3 v_normal;
out vec3 v_position;
out vec2 v_uv;
flat out float v_part;
void main() {
    gl_Position = mvp * vec4(in_position, 1.0);
    v_position = (model * vec4(in_position, 1.0)).xyz;
    v_normal = normal_matrix * in_normal;
    v_uv = in_uv;
    v_part = in_part;
}
"""

_NOISE_GLSL = """
uniform float noise_sigma;
uniform float noise_seed;
float hash(vec2 p) {  // a cheap per-pixel pseudo-random number in [0, 1)
    vec3 p3 = fract(vec3(p.xyx) * 0.1031 + noise_seed);
    p3 += dot(p3, p3.yzx + 33.33);
    return fract((p3.x + p3.y) * p3.z);
}
vec3 sensor_noise() {
    vec2 p = gl_FragCoord.xy;
    return noise_sigma * 1.7320508 * (2.0 * vec3(hash(p), hash(p + 17.0), hash(p + 41.0)) - 1.0);
}
"""

_MESH_FS = """
#version 330
uniform sampler2D tex;
uniform bool textured;
uniform vec3 color;
uniform float saturation;
uniform vec3 back_color;
uniform vec3 light_dir;
uniform float ambient;
uniform float diffuse;
uniform vec3 light_color;
uniform float id_base;
in vec3 v_normal;
in vec3 v_position;
in vec2 v_uv;
flat in float v_part;
out vec4 frag;
""" + _NOISE_GLSL + """
void main() {
    vec3 n = normalize(v_normal);
    vec3 albedo = color;
    if (textured) {
        vec3 t = texture(tex, v_uv).rgb;
        float grey = dot(t, vec3(0.299, 0.587, 0.114));
        albedo = mix(vec3(grey), t, saturation) * color;
    }
    if (!gl_FrontFacing && dot(n, v_position) > 0.0) {
        // the inside of the open scan (back-facing, outward normal turned away): dark hair.
        // A back-facing triangle whose normal faces the camera is a fold of the decimated mesh
        // and is shaded as the surface it belongs to.
        n = -n;
        if (textured) albedo = back_color;
    }
    float shade = ambient + diffuse * max(dot(n, light_dir), 0.0);
    vec3 c = albedo * shade * light_color + sensor_noise();
    frag = vec4(clamp(c, 0.0, 1.0), (id_base + v_part) / 255.0);
}
"""

_BG_VS = """
#version 330
in vec2 in_position;
out vec2 v_uv;
void main() {
    gl_Position = vec4(in_position, 0.0, 1.0);
    v_uv = (in_position + 1.0) / 2.0;  // (0, 0) bottom-left
}
"""

_BG_FS = """
#version 330
uniform int mode;  // 0 solid, 1 gradient, 2 noise, 3 photo
uniform vec3 c0;
uniform vec3 c1;
uniform vec2 gdir;
uniform sampler2D bgtex;
uniform vec4 uv_transform;  // offset xy, scale zw
in vec2 v_uv;
out vec4 frag;
""" + _NOISE_GLSL + """
void main() {
    vec3 c = c0;
    if (mode == 1) {
        c = mix(c0, c1, clamp(dot(v_uv - 0.5, gdir) + 0.5, 0.0, 1.0));
    } else if (mode >= 2) {
        c = texture(bgtex, uv_transform.xy + v_uv * uv_transform.zw).rgb;
        if (mode == 3) c *= c0;
    }
    frag = vec4(clamp(c + sensor_noise(), 0.0, 1.0), 0.0);
}
"""

_NOISE_TEX = 16  # side of the texture that holds a background's noise image


def get_context():
    """The process's moderngl context (headless EGL), created on first use.

    Raises:
        RenderError: EGL or Mesa is missing, naming the Debian packages that provide them.
    """
    return _context()


@functools.lru_cache(maxsize=1)
def _context():
    return create_context()


def create_context(factory=None):
    """A new headless moderngl context on EGL, or a `RenderError` naming what to install.

    Args:
        factory: the context constructor (`moderngl.create_standalone_context` by default).
    """
    if factory is None:
        try:
            import moderngl
        except ImportError as e:  # pragma: no cover - moderngl is a hard dependency
            raise RenderError(f"moderngl is not installed ({e}); run `pip install -e .`") from e
        factory = moderngl.create_standalone_context
    try:
        ctx = factory(backend="egl", require=330)
    except Exception as e:
        raise RenderError(
            f"cannot create a headless OpenGL context through EGL ({type(e).__name__}: {e}). "
            f"SynthHeads renders with Mesa's software rasteriser: install the system packages "
            f"`{EGL_PACKAGES}` (Debian/Ubuntu: `sudo apt-get install {EGL_PACKAGES}`; conda: "
            f"`conda install -c conda-forge mesalib libglvnd`), then retry.") from e
    return ctx


def check_egl() -> str:
    """Create the context (or raise `RenderError`) and return the GL renderer's name."""
    return get_context().info["GL_RENDERER"]


class GLRenderer:
    """Draws `DrawSpec`s into an `image_size` square framebuffer; meshes uploaded once.

    Use `get_renderer(image_size)` rather than the constructor: it shares one renderer per size.
    """

    def __init__(self, image_size: int):
        import moderngl

        self.image_size = int(image_size)
        self.ctx = ctx = get_context()
        size = (self.image_size, self.image_size)
        self.fbo = ctx.framebuffer(color_attachments=[ctx.renderbuffer(size, 4)],
                                   depth_attachment=ctx.depth_renderbuffer(size))

        self.mesh_prog = ctx.program(vertex_shader=_MESH_VS, fragment_shader=_MESH_FS)
        self.bg_prog = ctx.program(vertex_shader=_BG_VS, fragment_shader=_BG_FS)
        self.mesh_prog["tex"].value = 0
        self.bg_prog["bgtex"].value = 1

        # the head: one interleaved buffer, one index buffer
        head = get_head_mesh(head_cell(self.image_size))
        interleaved = np.hstack([head.positions, head.normals, head.uvs,
                                 head.part[:, None].astype(np.float32)]).astype("f4")
        self.head = head
        self.head_vao = ctx.vertex_array(
            self.mesh_prog, [(ctx.buffer(interleaved.tobytes()), "3f 3f 2f 1f",
                              "in_position", "in_normal", "in_uv", "in_part")],
            index_buffer=ctx.buffer(head.faces.astype("u4").tobytes()), index_element_size=4)
        self.head_tex = ctx.texture((head.texture.shape[1], head.texture.shape[0]), 3,
                                    head.texture.tobytes())
        self.head_tex.build_mipmaps()
        self.head_tex.filter = (moderngl.LINEAR_MIPMAP_LINEAR, moderngl.LINEAR)

        # the primitives: in_uv and in_part unset (constant 0)
        self.shape_vaos = {}
        for shape in SHAPES:
            pos, nrm = primitive_mesh(shape)
            buf = ctx.buffer(np.hstack([pos, nrm]).astype("f4").tobytes())
            self.shape_vaos[shape] = ctx.vertex_array(self.mesh_prog, [(buf, "3f 3f", "in_position", "in_normal")])

        quad = np.array([-1, -1, 1, -1, -1, 1, 1, 1], dtype="f4")
        self.bg_vao = ctx.vertex_array(self.bg_prog, [(ctx.buffer(quad.tobytes()), "2f", "in_position")])
        self.noise_tex = ctx.texture((_NOISE_TEX, _NOISE_TEX), 3)
        self.noise_tex.filter = (moderngl.LINEAR, moderngl.LINEAR)
        self.noise_tex.repeat_x = self.noise_tex.repeat_y = False
        self.photo_tex: dict[str, object] = {}

    # -- resources
    def _photo_texture(self, name: str):
        import moderngl

        if name not in self.photo_tex:
            img = load_photo(name)[::-1].copy()  # rows bottom-up for OpenGL
            tex = self.ctx.texture((img.shape[1], img.shape[0]), 3, img.tobytes(), alignment=1)
            tex.build_mipmaps()
            tex.filter = (moderngl.LINEAR_MIPMAP_LINEAR, moderngl.LINEAR)
            tex.repeat_x = tex.repeat_y = False
            self.photo_tex[name] = tex
        return self.photo_tex[name]

    # -- drawing
    def draw(self, spec: DrawSpec) -> tuple[np.ndarray, np.ndarray]:
        """Render one image.

        Returns:
            `(image, ids)`: `(H, W, 3)` uint8 RGB and `(H, W)` uint8 instance ids, row 0 at the top.
        """
        import moderngl

        ctx = self.ctx
        self.fbo.use()
        ctx.viewport = (0, 0, self.image_size, self.image_size)
        ctx.disable(moderngl.DEPTH_TEST | moderngl.CULL_FACE | moderngl.BLEND)
        self.fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)

        for prog in (self.bg_prog, self.mesh_prog):
            prog["noise_sigma"].value = float(spec.noise_sigma)
            prog["noise_seed"].value = float(spec.noise_seed)

        # background
        bg = spec.background
        p = self.bg_prog
        mode = {"solid": 0, "gradient": 1, "noise": 2, "photo": 3}[bg.kind]
        p["mode"].value = mode
        p["c0"].value = tuple(map(float, bg.colors[0]))
        if mode == 1:
            p["c1"].value = tuple(map(float, bg.colors[1]))
            a = np.radians(bg.angle_deg)
            p["gdir"].value = (float(np.cos(a)), float(np.sin(a)))
        elif mode == 2:
            noise = np.ascontiguousarray(bg.noise, dtype=np.uint8)
            k = noise.shape[0]
            self.noise_tex.write(noise.tobytes(), viewport=(0, 0, k, k))
            # sample texel centres 0.5 .. k-0.5 of the k x k corner
            p["uv_transform"].value = (0.5 / _NOISE_TEX, 0.5 / _NOISE_TEX, (k - 1) / _NOISE_TEX, (k - 1) / _NOISE_TEX)
            self.noise_tex.use(location=1)
        elif mode == 3:
            u0, v0, u1, v1 = bg.crop  # relative, origin top-left
            # OpenGL's v runs bottom-up: the crop's bottom edge is at v = 1 - v1
            if bg.flip:
                p["uv_transform"].value = (float(u1), float(1 - v1), float(u0 - u1), float(v1 - v0))
            else:
                p["uv_transform"].value = (float(u0), float(1 - v1), float(u1 - u0), float(v1 - v0))
            self._photo_texture(bg.photo).use(location=1)
        self.bg_vao.render(moderngl.TRIANGLE_STRIP)

        # meshes
        ctx.enable(moderngl.DEPTH_TEST)
        m = self.mesh_prog
        light = spec.light
        d = np.asarray(light.direction, np.float64)
        m["light_dir"].value = tuple(map(float, d / np.linalg.norm(d)))
        m["ambient"].value = float(light.ambient)
        m["diffuse"].value = float(light.diffuse)
        m["light_color"].value = tuple(map(float, light.color))
        proj = projection_matrix(spec.fov_deg)
        for inst in spec.instances:
            R = np.asarray(inst.rotation, np.float64)
            model = np.eye(4)
            model[:3, :3] = R * inst.scale
            model[:3, 3] = inst.translation
            m["mvp"].write((proj @ model).T.astype("f4").tobytes())
            m["model"].write(model.T.astype("f4").tobytes())
            m["normal_matrix"].write(R.T.astype("f4").tobytes())
            m["color"].value = tuple(map(float, inst.color))
            if inst.mesh == "head":
                m["textured"].value = True
                m["saturation"].value = float(inst.saturation)
                m["back_color"].value = tuple(map(float, inst.back_color))
                m["id_base"].value = float(inst.id - ID_HEAD)  # parts add ID_HEAD / ID_NECK
                self.head_tex.use(location=0)
                self.head_vao.render(moderngl.TRIANGLES)
            else:
                m["textured"].value = False
                m["id_base"].value = float(inst.id)
                self.shape_vaos[inst.mesh].render(moderngl.TRIANGLES)

        raw = np.frombuffer(self.fbo.read(components=4, alignment=1), dtype=np.uint8)
        rgba = raw.reshape(self.image_size, self.image_size, 4)[::-1]
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])


@functools.lru_cache(maxsize=None)
def get_renderer(image_size: int) -> GLRenderer:
    """The process's shared renderer for `image_size` px images (created on first use)."""
    return GLRenderer(image_size)
