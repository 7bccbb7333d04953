"""Head-pose geometry: Euler angles <-> rotation matrices, and angle differences.

Convention (DESIGN.md, the 300W-LP / 6DRepNet one): angles in degrees and

    R = Rz(roll) @ Ry(yaw) @ Rx(pitch)

with right-handed elementary rotations. The camera frame is x to image right, y to image up and
z toward the viewer, and a head at zero pose looks along +z (into the camera). So a positive yaw
turns the nose toward image right, a positive pitch tips it down, and a positive roll turns the
face counter-clockwise in the image.

`scipy.spatial.transform.Rotation` does the trigonometry: its intrinsic "ZYX" sequence is exactly
Rz(a) @ Ry(b) @ Rx(c).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

# intrinsic z-y-x: Rz(roll) @ Ry(yaw) @ Rx(pitch), angles given as (roll, yaw, pitch)
_SEQUENCE = "ZYX"


def euler_to_matrix(yaw, pitch, roll) -> np.ndarray:
    """Rotation matrices from head-pose angles.

    Args:
        yaw, pitch, roll: degrees; scalars or arrays of one broadcastable shape `(...)`.

    Returns:
        `(..., 3, 3)` float64 rotation matrices, `Rz(roll) @ Ry(yaw) @ Rx(pitch)`.
    """
    yaw, pitch, roll = np.broadcast_arrays(
        np.asarray(yaw, dtype=np.float64),
        np.asarray(pitch, dtype=np.float64),
        np.asarray(roll, dtype=np.float64),
    )
    shape = yaw.shape
    angles = np.stack([roll.ravel(), yaw.ravel(), pitch.ravel()], axis=-1)
    matrices = Rotation.from_euler(_SEQUENCE, angles, degrees=True).as_matrix()
    return matrices.reshape(*shape, 3, 3)


def matrix_to_euler(R) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head-pose angles from rotation matrices; the inverse of `euler_to_matrix`.

    Args:
        R: `(..., 3, 3)` rotation matrices.

    Returns:
        `(yaw, pitch, roll)` in degrees, each of shape `(...)`; yaw in [-90, 90], pitch and roll
        in (-180, 180]. Beyond |yaw| = 90 the same rotation has a second angle triple, and the
        one with |yaw| <= 90 is returned (the one every head-pose dataset uses).
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3), got {R.shape}")
    shape = R.shape[:-2]
    roll, yaw, pitch = Rotation.from_matrix(R.reshape(-1, 3, 3)).as_euler(_SEQUENCE, degrees=True).T
    # scipy returns -180 or 180 for the same angle; keep the documented (-180, 180]
    pitch = np.where(pitch <= -180.0, pitch + 360.0, pitch)
    roll = np.where(roll <= -180.0, roll + 360.0, roll)
    return yaw.reshape(shape), pitch.reshape(shape), roll.reshape(shape)


def angle_difference(a, b) -> np.ndarray:
    """Signed wrap-aware difference `a - b` in degrees, in [-180, 180).

    So 179 and -179 are 2 degrees apart, not 358.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    wrapped = (d + 180.0) % 360.0 - 180.0
    # a tiny negative `d + 180` rounds to 360 in `%`, which would give 180 (e.g. d just below -180)
    return np.where(wrapped >= 180.0, wrapped - 360.0, wrapped)


def geodesic_distance(R1, R2) -> np.ndarray:
    """Angle in degrees of the rotation taking `R1` to `R2`; shapes `(..., 3, 3)` -> `(...)`."""
    R1 = np.asarray(R1, dtype=np.float64)
    R2 = np.asarray(R2, dtype=np.float64)
    trace = np.einsum("...ij,...ij->...", R1, R2)  # trace(R1^T R2)
    return np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))
