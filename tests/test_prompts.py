"""The answer grammar of `hpelib.prompts`: formatting, parsing, and a parser that never raises."""

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpelib.prompts import (
    HEAD,
    HPE_PROMPT,
    MAX_ANSWER_CHARS,
    ParsedResponse,
    format_box,
    format_hpe,
    grounding_prompt,
    parse_response,
)

BOX_TEXT = "[[086,540,400,760]]"
BOX = (0.086, 0.54, 0.4, 0.76)
HPE_TEXT = "[[086,540,400,760]] yaw:-12 pitch:5 roll:0"
KINDS = {"hpe", "box", "blended", "malformed"}

FAST = settings(max_examples=200, deadline=None)


def assert_box(got, want, tol=1e-9):
    assert got is not None
    assert all(abs(g - w) <= tol for g, w in zip(got, want, strict=True)), (got, want)


# ---- prompts --------------------------------------------------------------------------------


def test_prompts():
    assert grounding_prompt(HEAD) == "Where is the head?"
    assert grounding_prompt("red cube") == "Where is the red cube?"
    assert isinstance(HPE_PROMPT, str) and 0 < len(HPE_PROMPT.split()) <= 10
    with pytest.raises(ValueError, match="non-empty"):
        grounding_prompt("  ")


# ---- formatting -----------------------------------------------------------------------------


def test_format_box():
    assert format_box((0.086, 0.54, 0.4, 0.76)) == BOX_TEXT
    assert format_box((0.0, 0.0, 1.0, 1.0)) == "[[000,000,999,999]]"  # 1000 clips to 999
    assert format_box((-0.2, 0.0004, 0.0006, 1.7)) == "[[000,000,001,999]]"
    assert format_box([0.5, 0.5, 0.5, 0.5]) == "[[500,500,500,500]]"  # a point is allowed


@pytest.mark.parametrize(
    "box, match",
    [
        ((0.1, 0.1, math.nan, 0.2), "x1=nan is not finite"),
        ((math.inf, 0.1, 0.2, 0.2), "x0=inf is not finite"),
        ((0.5, 0.1, 0.4, 0.2), "x1=0.4 < x0=0.5"),
        ((0.1, 0.3, 0.4, 0.2), "y1=0.2 < y0=0.3"),
        ((0.1, 0.2, 0.3), "4 values"),
    ],
)
def test_format_box_rejects(box, match):
    with pytest.raises(ValueError, match=match):
        format_box(box)


def test_format_hpe():
    assert format_hpe(BOX, -12, 5, 0) == HPE_TEXT
    assert format_hpe(BOX, -12.3, 4.6, -0.2) == HPE_TEXT  # integer degrees, no "-0"
    assert format_hpe(BOX, -12.34, 5, 0, decimals=1) == BOX_TEXT + " yaw:-12.3 pitch:5.0 roll:0.0"
    assert format_hpe(BOX, 180, -180, 0).endswith("yaw:180 pitch:-180 roll:0")


@pytest.mark.parametrize(
    "angles, decimals, match",
    [
        ((180.5, 0, 0), 0, "yaw must be finite and within"),
        ((0, math.nan, 0), 0, "pitch must be finite"),
        ((0, 0, -math.inf), 0, "roll must be finite"),
        ((0, 0, 0), -1, "decimals must be an int"),
    ],
)
def test_format_hpe_rejects(angles, decimals, match):
    with pytest.raises(ValueError, match=match):
        format_hpe(BOX, *angles, decimals=decimals)


# ---- worked examples of every kind and reason -----------------------------------------------


def test_clean_answers():
    hpe = parse_response(HPE_TEXT)
    assert hpe == ParsedResponse("hpe", BOX, -12.0, 5.0, 0.0, "")
    assert hpe.valid
    box = parse_response(BOX_TEXT)
    assert box == ParsedResponse("box", BOX)
    assert box.valid and box.yaw is None


@pytest.mark.parametrize(
    "text, kind",
    [
        ("  " + HPE_TEXT + "\n", "hpe"),  # surrounding whitespace is fine
        ("[[086, 540, 400, 760]]", "box"),  # spaces inside the box
        ("[[086,540,400,760]]  yaw: -12.5\tpitch:+5 roll:0.25", "hpe"),
        ("[[000,000,999,999]] yaw:180 pitch:-180 roll:0", "hpe"),
        ("[[500,500,500,500]]", "box"),
    ],
)
def test_tolerated_variants(text, kind):
    parsed = parse_response(text)
    assert parsed.kind == kind, parsed.reason
    assert parsed.reason == ""


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[[086,yaw:5,540,400,760]]", "pose fields inside the box"),
        ("[[086,540,400,760]][[100,100,200,200]]", "2 boxes in one answer"),
        (BOX_TEXT + " " + HPE_TEXT, "2 boxes in one answer"),
        ("[[086,540,400,760;100,100,200,200]]", "2 boxes in one answer"),
        ("yaw:-12 pitch:5 roll:0", "pose fields without a box"),
        ("roll:3", "pose fields without a box"),
        ("yaw:-12 " + BOX_TEXT + " pitch:5 roll:0", "pose fields before the box"),
        (BOX_TEXT + " yaw:-12 yaw:-12 pitch:5 roll:0", "duplicate field yaw"),
        (BOX_TEXT + " yaw:-12 pitch:5", "box followed by only some pose fields (missing roll)"),
        (BOX_TEXT + " pitch:5", "only some pose fields (missing yaw, roll)"),
    ],
)
def test_blended(text, reason):
    parsed = parse_response(text)
    assert parsed.kind == "blended"
    assert reason in parsed.reason
    assert not parsed.valid


def test_blended_keeps_unambiguous_values():
    partial = parse_response(BOX_TEXT + " yaw:-12 pitch:5")
    assert partial.box == BOX and (partial.yaw, partial.pitch, partial.roll) == (-12, 5, None)
    duplicated = parse_response(BOX_TEXT + " yaw:1 yaw:2 pitch:5 roll:0")
    assert duplicated.yaw is None and duplicated.pitch == 5
    two_boxes = parse_response(BOX_TEXT * 2)
    assert two_boxes.box is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty answer"),
        (" \n\t ", "empty answer"),
        ("I don't know", "no answer found: \"I don't know\""),
        ("The head is at [[086,540,400,760]]", "no answer found"),
        (HPE_TEXT + " thanks", "unexpected text 'thanks' at char 43"),
        (BOX_TEXT + ".", "unexpected text '.' at char 19"),
        ("[[086,540,400,760", "broken box '[[086,540,400,760' at char 0"),
        (BOX_TEXT + " [[1", "broken box '[[1' at char 20"),
        ("[[086,540,400,1200]]", "box value 1200 out of range 000-999"),
        ("[[086,540,-40,760]]", "box value -40 out of range 000-999"),
        ("[[086,540,400,76]]", "box value 76 is not three digits"),
        ("[[0860,540,900,760]]", "box value 0860 is not three digits"),
        ("[[086,540,4a0,760]]", "box value '4a0' is not a number"),
        ("[[086,540,400]]", "box needs 4 values, got 3"),
        ("[[]]", "box needs 4 values, got 0"),
        ("[[400,540,086,760]]", "box corners out of order (x0 400 > x1 086)"),
        ("[[086,760,400,540]]", "box corners out of order (y0 760 > y1 540)"),
        (BOX_TEXT + " yaw:200 pitch:5 roll:0", "yaw 200 out of range -180..180"),
        (BOX_TEXT + " yaw:1 pitch:-180.5 roll:0", "pitch -180.5 out of range -180..180"),
        (BOX_TEXT + " yaw: pitch:5 roll:0", "yaw has no number"),
        (BOX_TEXT + " yaw:1 pitch:5 roll:x", "roll has no number (got 'x')"),
        (BOX_TEXT + " yaw=1 pitch:5 roll:0", "unexpected text 'yaw=1"),
        (BOX_TEXT + " pitch:5 yaw:-12 roll:0", "pose fields out of order (pitch yaw roll)"),
        ("x" * (MAX_ANSWER_CHARS + 1), f"answer too long ({MAX_ANSWER_CHARS + 1} chars)"),
        # a bad number outranks the blended shape around it
        ("[[086,540,400,1200]] [[yaw:1]]", "box value 1200 out of range"),
        ("yaw:1 pitch:500", "pitch 500 out of range"),
    ],
)
def test_malformed(text, reason):
    parsed = parse_response(text)
    assert parsed == ParsedResponse("malformed", reason=parsed.reason)  # no values kept
    assert reason in parsed.reason


@pytest.mark.parametrize(
    "text",
    [
        "[[" + "9" * 4000 + ",000,001,001]]",
        BOX_TEXT + " yaw:" + "9" * 4000,
        BOX_TEXT + " " + "garbage " * 400,
        "[[" + "x" * 4000,
    ],
)
def test_reasons_stay_short(text):
    parsed = parse_response(text)
    assert parsed.kind == "malformed"
    assert len(parsed.reason) < 80, parsed.reason


@pytest.mark.parametrize("value, name", [(None, "NoneType"), (b"[[1]]", "bytes"), (12, "int")])
def test_non_strings_are_malformed(value, name):
    assert parse_response(value) == ParsedResponse("malformed", reason=f"not a string ({name})")


def test_parsed_response_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_response(HPE_TEXT).kind = "box"


# ---- the task that was asked ----------------------------------------------------------------


def test_task_matching_answers_stay_clean():
    assert parse_response(HPE_TEXT, task="hpe").kind == "hpe"
    assert parse_response(BOX_TEXT, task="box").kind == "box"


def test_other_tasks_format_is_blended():
    box_for_hpe = parse_response(BOX_TEXT, task="hpe")
    assert box_for_hpe.kind == "blended"
    assert box_for_hpe.reason == "box answer to a head-pose prompt"
    assert box_for_hpe.box == BOX
    hpe_for_box = parse_response(HPE_TEXT, task="box")
    assert hpe_for_box.kind == "blended"
    assert hpe_for_box.reason == "head-pose answer to a grounding prompt"
    assert hpe_for_box.yaw == -12


def test_task_does_not_change_blended_or_malformed():
    for task in (None, "hpe", "box"):
        fields_only = parse_response("yaw:1 pitch:2 roll:3", task=task)
        assert fields_only.reason == "pose fields without a box"
        assert parse_response("", task=task).kind == "malformed"


def test_unknown_task_is_a_programming_error():
    with pytest.raises(ValueError, match="task must be one of"):
        parse_response(HPE_TEXT, task="grounding")


# ---- round trips ----------------------------------------------------------------------------

unit = st.floats(0, 1, allow_nan=False)
degrees = st.floats(-180, 180, allow_nan=False)


@st.composite
def boxes(draw):
    x0, x1 = sorted((draw(unit), draw(unit)))
    y0, y1 = sorted((draw(unit), draw(unit)))
    return (x0, y0, x1, y1)


def expected_box(box):
    # rounding to 1/1000 moves a corner by at most 0.0005; 1.0 also clips to 0.999
    return tuple(min(v, 0.999) for v in box)


@FAST
@given(boxes())
def test_box_round_trip(box):
    parsed = parse_response(format_box(box), task="box")
    assert parsed.kind == "box"
    assert_box(parsed.box, expected_box(box), tol=0.0005 + 1e-9)


@FAST
@given(boxes(), degrees, degrees, degrees, st.integers(0, 3))
def test_hpe_round_trip(box, yaw, pitch, roll, decimals):
    parsed = parse_response(format_hpe(box, yaw, pitch, roll, decimals=decimals), task="hpe")
    assert parsed.kind == "hpe", parsed.reason
    assert_box(parsed.box, expected_box(box), tol=0.0005 + 1e-9)
    tol = 0.5 / 10**decimals + 1e-9
    for got, want in zip((parsed.yaw, parsed.pitch, parsed.roll), (yaw, pitch, roll)):
        assert abs(got - want) <= tol


# ---- the parser never raises ----------------------------------------------------------------


def check_total(text, task=None):
    parsed = parse_response(text, task=task)
    assert parsed.kind in KINDS
    assert isinstance(parsed.reason, str)
    assert (parsed.reason == "") == parsed.valid
    return parsed


@FAST
@given(st.text(), st.sampled_from([None, "hpe", "box"]))
def test_never_raises_on_any_text(text, task):
    check_total(text, task)


@FAST
@given(st.text(alphabet="[],;:.+- 0123456789yawpitchrol\n", max_size=80))
def test_never_raises_on_answer_like_text(text):
    check_total(text)


# pieces of valid answers: boxes (some out of range), fields (some out of range), garbage
box_tokens = st.builds(
    lambda v: "[[" + ",".join(v) + "]]",
    st.lists(st.sampled_from(["000", "086", "540", "999", "1200", "-05", "7", "yaw:1"]),
             min_size=0, max_size=5),
)
field_tokens = st.builds(
    "{}:{}".format,
    st.sampled_from(["yaw", "pitch", "roll"]),
    st.sampled_from(["0", "-12", "5.5", "+180", "181", "-999", "", "x"]),
)
garbage_tokens = st.sampled_from(["thanks", ".", "[[", "]]", ";", "\n", "\x00", "é", "Yaw:1"])


@st.composite
def mutated_answers(draw):
    """A valid answer with tokens dropped, swapped, duplicated, replaced or inserted."""
    tokens = draw(st.sampled_from([HPE_TEXT, BOX_TEXT])).split(" ")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "swap", "duplicate", "replace", "insert"]))
        i = draw(st.integers(0, max(len(tokens) - 1, 0)))
        new = draw(st.one_of(box_tokens, field_tokens, garbage_tokens))
        if op == "drop" and tokens:
            del tokens[i]
        elif op == "swap" and len(tokens) > 1:
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif op == "duplicate" and tokens:
            tokens.insert(i, tokens[i])
        elif op == "replace" and tokens:
            tokens[i] = new
        else:
            tokens.insert(i, new)
    return draw(st.sampled_from([" ", "", "  "])).join(tokens)


@FAST
@given(mutated_answers(), st.sampled_from([None, "hpe", "box"]))
def test_never_raises_on_mutated_answers(text, task):
    parsed = check_total(text, task)
    if parsed.kind == "hpe":
        assert parsed.box is not None and None not in (parsed.yaw, parsed.pitch, parsed.roll)
    if parsed.kind == "malformed":
        assert parsed.box is None and parsed.yaw is None


@pytest.mark.parametrize(
    "text",
    [
        "x" * 1_000_000,
        "[[" * 500_000,
        HPE_TEXT + " " * 1_000_000,  # long, but only whitespace around a clean answer
        (HPE_TEXT + " ") * 25_000,
        "yaw:1 " * 170_000,
    ],
    ids=["x", "brackets", "trailing-space", "repeated-answers", "repeated-fields"],
)
def test_megabyte_strings(text):
    parsed = check_total(text)
    assert parsed.kind == ("hpe" if text.strip() == HPE_TEXT else "malformed")


def test_longest_allowed_answer_is_scanned():
    text = ("yaw:1 " * (MAX_ANSWER_CHARS // 6)).strip()
    assert len(text) <= MAX_ANSWER_CHARS
    assert check_total(text).reason == "pose fields without a box"
