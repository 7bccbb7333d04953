"""Pins the head-pose rotation convention of `hpelib.geometry` (DESIGN.md, "Conventions").

R = Rz(roll) @ Ry(yaw) @ Rx(pitch), degrees; camera x right, y up, z toward the viewer; a head at
zero pose looks along +z.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from hpelib.geometry import angle_difference, euler_to_matrix, geodesic_distance, matrix_to_euler

NOSE = np.array([0.0, 0.0, 1.0])  # the facing direction at zero pose
X_AXIS = np.array([1.0, 0.0, 0.0])


def rx(deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def ry(deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rz(deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


angle99 = st.floats(-99, 99, allow_nan=False)
angle180 = st.floats(-180, 180, allow_nan=False)


# ---- worked examples of the convention ------------------------------------------------------


def test_zero_pose_is_identity():
    assert_allclose(euler_to_matrix(0, 0, 0), np.eye(3), atol=1e-15)


def test_positive_yaw_turns_nose_to_image_right():
    nose = euler_to_matrix(30, 0, 0) @ NOSE
    assert_allclose(nose, [np.sin(np.radians(30)), 0, np.cos(np.radians(30))], atol=1e-12)
    assert nose[0] == pytest.approx(0.5)


def test_positive_pitch_tips_nose_down():
    nose = euler_to_matrix(0, 20, 0) @ NOSE
    assert_allclose(nose, [0, -np.sin(np.radians(20)), np.cos(np.radians(20))], atol=1e-12)
    assert nose[1] < 0


def test_positive_roll_turns_x_axis_toward_up():
    x = euler_to_matrix(0, 0, 25) @ X_AXIS
    assert_allclose(x, [np.cos(np.radians(25)), np.sin(np.radians(25)), 0], atol=1e-12)
    # roll alone keeps the nose where it is
    assert_allclose(euler_to_matrix(0, 0, 25) @ NOSE, NOSE, atol=1e-12)


@pytest.mark.parametrize(
    "yaw, pitch, roll", [(30, 0, 0), (0, 20, 0), (0, 0, -45), (10, 20, 30), (-75, 40, -120)]
)
def test_matches_hand_written_elementary_matrices(yaw, pitch, roll):
    expected = rz(roll) @ ry(yaw) @ rx(pitch)
    assert_allclose(euler_to_matrix(yaw, pitch, roll), expected, atol=1e-12)


def test_order_matters_pitch_applies_first():
    # Rz @ Ry @ Rx, not Rx @ Ry @ Rz: the two differ for a generic triple
    R = euler_to_matrix(40, 30, 20)
    assert not np.allclose(R, rx(30) @ ry(40) @ rz(20))


# ---- round trips ----------------------------------------------------------------------------


def test_round_trip_on_grid_of_99_degree_cube():
    values = np.linspace(-99, 99, 7)
    yaw, pitch, roll = (np.array(v) for v in zip(*itertools.product(values, repeat=3)))
    R = euler_to_matrix(yaw, pitch, roll)
    y2, p2, r2 = matrix_to_euler(R)
    # |yaw| > 90 has a second triple; matrix_to_euler returns the one with |yaw| <= 90
    inside = np.abs(yaw) <= 90
    assert inside.sum() > 0 and (~inside).sum() > 0
    for got, want in ((y2, yaw), (p2, pitch), (r2, roll)):
        assert_allclose(angle_difference(got[inside], want[inside]), 0, atol=1e-9)
    assert np.all(np.abs(y2) <= 90 + 1e-9)
    assert_allclose(euler_to_matrix(y2, p2, r2), R, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.floats(-89, 89), angle99, angle99)
def test_round_trip_angles(yaw, pitch, roll):
    y2, p2, r2 = matrix_to_euler(euler_to_matrix(yaw, pitch, roll))
    assert_allclose(angle_difference([y2, p2, r2], [yaw, pitch, roll]), 0, atol=1e-8)


@settings(max_examples=200, deadline=None)
@given(angle180, angle180, angle180)
def test_round_trip_matrices_everywhere(yaw, pitch, roll):
    R = euler_to_matrix(yaw, pitch, roll)
    y2, p2, r2 = matrix_to_euler(R)
    assert -90 - 1e-9 <= y2 <= 90 + 1e-9
    assert -180 < p2 <= 180 and -180 < r2 <= 180
    assert_allclose(euler_to_matrix(y2, p2, r2), R, atol=1e-9)


def test_matrices_are_rotations():
    R = euler_to_matrix(np.array([10.0, -170.0]), np.array([95.0, 3.0]), np.array([-60.0, 179.0]))
    assert_allclose(R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)


# ---- shapes ---------------------------------------------------------------------------------


def test_batch_shapes():
    rng = np.random.default_rng(0)
    yaw, pitch, roll = rng.uniform(-80, 80, size=(3, 4, 5))
    R = euler_to_matrix(yaw, pitch, roll)
    assert R.shape == (4, 5, 3, 3)
    y2, p2, r2 = matrix_to_euler(R)
    assert y2.shape == p2.shape == r2.shape == (4, 5)
    assert_allclose(y2, yaw, atol=1e-9)
    assert geodesic_distance(R, R).shape == (4, 5)


def test_scalars_and_broadcasting():
    assert euler_to_matrix(1.0, 2.0, 3.0).shape == (3, 3)
    assert euler_to_matrix(np.zeros(4), 0.0, np.zeros((2, 1))).shape == (2, 4, 3, 3)
    y, p, r = matrix_to_euler(np.eye(3))
    assert y.shape == p.shape == r.shape == ()


def test_matrix_to_euler_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        matrix_to_euler(np.eye(4))


# ---- angle differences and distances --------------------------------------------------------


def test_angle_difference_wraps():
    assert angle_difference(179, -179) == pytest.approx(-2)  # 179 is 2 degrees short of -179
    assert angle_difference(-179, 179) == pytest.approx(2)
    assert angle_difference(10, 350) == pytest.approx(20)
    assert angle_difference(180, 0) == -180  # the half-open range keeps -180, not 180
    assert_allclose(angle_difference([0, 90, -90], [0, -90, 90]), [0, -180, -180])


def test_angle_difference_range_edge():
    # d + 180 a hair below 0 must not round up to 360 (which would give +180)
    just_below = np.nextafter(-180.0, -np.inf)
    assert -180 <= angle_difference(just_below, 0.0) < 180


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6))
def test_angle_difference_in_half_open_range(a, b):
    d = angle_difference(a, b)
    assert -180 <= d < 180
    # it is a - b up to whole turns
    turns = (a - b - d) / 360
    assert turns == pytest.approx(round(turns), abs=1e-6)


def test_geodesic_distance():
    R = euler_to_matrix(10, 20, 30)
    assert geodesic_distance(R, R) == pytest.approx(0, abs=1e-5)
    assert geodesic_distance(np.eye(3), euler_to_matrix(90, 0, 0)) == pytest.approx(90)
    yawed_apart = geodesic_distance(euler_to_matrix(-45, 10, 0), euler_to_matrix(45, 10, 0))
    assert yawed_apart == pytest.approx(90)
    # symmetric, and a rotation about one axis by t is t degrees away, whichever axis
    assert geodesic_distance(euler_to_matrix(0, 35, 0), np.eye(3)) == pytest.approx(35)
    assert geodesic_distance(euler_to_matrix(0, 0, -35), np.eye(3)) == pytest.approx(35)


@settings(max_examples=100, deadline=None)
@given(angle180, angle180, angle180, st.floats(-179, 179))
def test_geodesic_distance_is_invariant_to_a_common_rotation(yaw, pitch, roll, t):
    G = euler_to_matrix(yaw, pitch, roll)
    d = geodesic_distance(G @ euler_to_matrix(t, 0, 0), G)
    assert d == pytest.approx(abs(t), abs=1e-5)
