"""Prompts and the answer grammar: writing and reading the model's text answers.

Two tasks share one text format (DESIGN.md, "Conventions"):

- grounding (`"box"`): `grounding_prompt("head")` -> `[[086,540,400,760]]`
- head pose (`"hpe"`): `HPE_PROMPT` -> `[[086,540,400,760]] yaw:-12 pitch:5 roll:0`

Box values are corners relative to the image size times 1000, three digits (`000`-`999`), origin
top-left, CogVLM style. `parse_response` reads every answer, never raises, and sorts it into one
of four kinds, with a short human-readable reason for everything that is not clean.

Grammar (after stripping leading and trailing whitespace; `ws` is optional whitespace)::

    answer := ws token (ws token)* ws
    token  := box | field
    box    := "[[" coords (";" coords)* "]]"      more than one coords is blended
    coords := ws num3 ws "," ws num3 ws "," ws num3 ws "," ws num3 ws
    field  := ("yaw" | "pitch" | "roll") ws ":" ws angle
    num3   := [0-9]{3}                      value 000-999, with x0 <= x1 and y0 <= y1
    angle  := [+-]? [0-9]+ ("." [0-9]+)?   within [-180, 180]

Kinds, checked in this order (the first rule that applies decides):

1. `malformed` -- the text is not a sequence of well-formed tokens: not a string, empty, longer
   than `MAX_ANSWER_CHARS` (rejected before any scanning, so a 1 MB string costs nothing), text
   that is no token ("no answer found", "broken box", "unexpected text ... at char N", which
   covers garbage after the answer), a box without 4 values, a box value not three digits or
   out of 000-999, box corners out of order, a field without a number, an angle beyond +-180.
   Malformed answers carry no values.
2. `blended` -- well-formed tokens of both formats in a shape neither task answers with:
   pose fields inside the box, more than one box (`[[a]][[b]]` or CogVLM's `[[a;b]]`), pose
   fields without a box, pose fields before the box, a duplicate field, a box followed by only
   some of yaw/pitch/roll. Blended answers keep the values that are unambiguous (the box when
   there is exactly one; each angle given exactly once), for diagnosis only.
3. `malformed` -- one box followed by yaw, pitch and roll once each, but in another order
   ("pose fields out of order").
4. `box` -- exactly one box; `hpe` -- one box followed by `yaw pitch roll` in that order.
5. With `task` given (the prompt that was asked, `"hpe"` or `"box"`), a clean answer in the other
   task's format is `blended` ("box answer to a head-pose prompt", "head-pose answer to a
   grounding prompt"): the format of one task answering the other task's prompt.

Only `hpe` and `box` are valid answers (`ParsedResponse.valid`); evaluation counts the rest as
misses.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

HEAD = "head"
# short on purpose: the embedded tiny VLM reads it with a tokenizer trained in code
HPE_PROMPT = "Locate the head and give its pose."
TASKS = ("hpe", "box")
KINDS = ("hpe", "box", "blended", "malformed")
POSE_FIELDS = ("yaw", "pitch", "roll")

# a real answer is about 40 characters; anything far longer is a runaway generation, and
# rejecting it before scanning keeps the parser O(1) on huge inputs
MAX_ANSWER_CHARS = 4096
_SNIPPET_CHARS = 20

# Every pattern is anchored at the scan position (`pattern.match(text, pos)`) and has no nested
# quantifiers, so each token is read in time linear in its length and the scan never backtracks.
_BOX_RE = re.compile(r"\[\[([^\[\]]*)\]\]")
_FIELD_RE = re.compile(r"(yaw|pitch|roll)\s*:\s*")
_ANGLE_RE = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_WS_RE = re.compile(r"\s+")
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FIELD_NAME_RE = re.compile(r"yaw|pitch|roll")


def grounding_prompt(target: str) -> str:
    """The grounding question, e.g. `grounding_prompt("head") == "Where is the head?"`."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    return f"Where is the {target.strip()}?"


def pose_prompt(target: str) -> str:
    """The question that asks for a box and a pose in one answer; `pose_prompt(HEAD) == HPE_PROMPT`.
    Any other target is the base curriculum's rigid-object pose (`tasks.task_pose_object`)."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    return f"Locate the {target.strip()} and give its pose."


def format_box(box: Sequence[float]) -> str:
    """A box as CogVLM grounding text.

    Args:
        box: `(x0, y0, x1, y1)` relative to the image size (in [0, 1], origin top-left).

    Returns:
        `"[[x0,y0,x1,y1]]"`, each value `round(v * 1000)` clipped to 0..999 and zero-padded to
        three digits (a box touching the right or bottom edge ends at 999).
    """
    values = [float(v) for v in box]
    if len(values) != 4:
        raise ValueError(f"box must have 4 values (x0, y0, x1, y1), got {len(values)}")
    for name, v in zip(("x0", "y0", "x1", "y1"), values):
        if not math.isfinite(v):
            raise ValueError(f"box value {name}={v} is not finite")
    x0, y0, x1, y1 = values
    if x1 < x0:
        raise ValueError(f"box corners out of order: x1={x1} < x0={x0}")
    if y1 < y0:
        raise ValueError(f"box corners out of order: y1={y1} < y0={y0}")
    # rounding and clipping are monotone, so the text keeps x0 <= x1 and y0 <= y1
    digits = ",".join(f"{min(round(min(max(v, 0.0), 1.0) * 1000), 999):03d}" for v in values)
    return f"[[{digits}]]"


def format_hpe(
    box: Sequence[float], yaw: float, pitch: float, roll: float, decimals: int = 0
) -> str:
    """The head-pose answer: the box, then yaw, pitch and roll in degrees.

    Args:
        box: `(x0, y0, x1, y1)` relative to the image size, as for `format_box`.
        yaw, pitch, roll: degrees, finite and within [-180, 180].
        decimals: digits after the point (0 gives integer degrees, the default answer format).

    Returns:
        e.g. `"[[086,540,400,760]] yaw:-12 pitch:5 roll:0"`.
    """
    if not isinstance(decimals, int) or isinstance(decimals, bool) or decimals < 0:
        raise ValueError(f"decimals must be an int >= 0, got {decimals!r}")
    parts = [format_box(box)]
    for name, value in zip(POSE_FIELDS, (yaw, pitch, roll)):
        value = float(value)
        if not math.isfinite(value) or abs(value) > 180.0:
            raise ValueError(f"{name} must be finite and within [-180, 180], got {value}")
        # `+ 0.0` turns -0.0 into 0.0, so a small negative angle prints as "0", not "-0"
        parts.append(f"{name}:{round(value, decimals) + 0.0:.{decimals}f}")
    return " ".join(parts)


@dataclass(frozen=True)
class ParsedResponse:
    """What `parse_response` read from one answer.

    kind: `"hpe"`, `"box"`, `"blended"` or `"malformed"` (see the module docstring).
    box: `(x0, y0, x1, y1)` relative to the image size (text value / 1000), or None.
    yaw, pitch, roll: degrees, or None.
    reason: why the answer is not clean; empty for `hpe` and `box`.
    """

    kind: str
    box: tuple[float, float, float, float] | None = None
    yaw: float | None = None
    pitch: float | None = None
    roll: float | None = None
    reason: str = ""

    @property
    def valid(self) -> bool:
        """True for a clean answer (`hpe` or `box`)."""
        return self.kind in ("hpe", "box")


class _Malformed(Exception):
    """Internal: carries the reason of a malformed answer out of the scanner."""


def _short(text: str) -> str:
    """`text` cut to a few characters, so every reason stays one short line."""
    return text[:_SNIPPET_CHARS] + "..." if len(text) > _SNIPPET_CHARS else text


def _snippet(text: str) -> str:
    return repr(_short(text))


def _read_box_values(content: str) -> tuple[float, float, float, float]:
    """The 4 relative corners of one box's inner text (`"086,540,400,760"`)."""
    parts = [p.strip() for p in content.split(",")] if content.strip() else []
    if len(parts) != 4:
        raise _Malformed(f"box needs 4 values, got {len(parts)}")
    numbers = []
    for p in parts:
        if not _INT_RE.fullmatch(p):
            raise _Malformed(f"box value {_snippet(p)} is not a number")
        if p[0] in "+-" or len(p.lstrip("0")) > 3:  # no int() on a 4000-digit string
            raise _Malformed(f"box value {_short(p)} out of range 000-999")
        if len(p) != 3:
            raise _Malformed(f"box value {_short(p)} is not three digits")
        numbers.append(int(p))
    x0, y0, x1, y1 = numbers
    if x0 > x1:
        raise _Malformed(f"box corners out of order (x0 {parts[0]} > x1 {parts[2]})")
    if y0 > y1:
        raise _Malformed(f"box corners out of order (y0 {parts[1]} > y1 {parts[3]})")
    return (x0 / 1000, y0 / 1000, x1 / 1000, y1 / 1000)


def _tokenize(text: str) -> list[tuple[str, object]]:
    """Split a stripped answer into `("box", content)` and `("field", (name, value))` tokens.

    Raises `_Malformed` at the first text that is no token or a token with a bad number.
    """
    tokens: list[tuple[str, object]] = []
    pos, n = 0, len(text)
    while pos < n:
        m = _WS_RE.match(text, pos)
        if m:
            pos = m.end()
            continue
        m = _BOX_RE.match(text, pos)
        if m:
            tokens.append(("box", m.group(1)))
            pos = m.end()
            continue
        m = _FIELD_RE.match(text, pos)
        if m:
            name = m.group(1)
            a = _ANGLE_RE.match(text, m.end())
            if not a:
                raise _Malformed(f"{name} has no number (got {_snippet(text[m.end():])})")
            value = float(a.group())
            if abs(value) > 180.0:
                raise _Malformed(f"{name} {_short(a.group())} out of range -180..180")
            tokens.append(("field", (name, value)))
            pos = a.end()
            continue
        if text[pos] == "[":
            raise _Malformed(f"broken box {_snippet(text[pos:])} at char {pos}")
        if pos == 0:
            raise _Malformed(f"no answer found: {_snippet(text)}")
        raise _Malformed(f"unexpected text {_snippet(text[pos:])} at char {pos}")
    return tokens


def _classify(tokens: list[tuple[str, object]]) -> ParsedResponse:
    """Kind of a well-tokenized answer, before the task is considered."""
    # boxes: each box token may hold several `;`-separated boxes (CogVLM's multi-object form)
    box_contents = [c for kind, c in tokens if kind == "box"]
    mixed = [c for c in box_contents if _FIELD_NAME_RE.search(c)]
    # bad numbers in the other boxes make the answer malformed, which outranks blended
    boxes = [_read_box_values(p) for c in box_contents if c not in mixed for p in c.split(";")]
    if mixed:
        return ParsedResponse("blended", reason="pose fields inside the box")

    fields = [v for kind, v in tokens if kind == "field"]
    names = [name for name, _ in fields]
    counts = Counter(names)
    once = {name: value for name, value in fields if counts[name] == 1}
    box = boxes[0] if len(boxes) == 1 else None

    def blended(reason: str) -> ParsedResponse:
        return ParsedResponse(
            "blended", box, once.get("yaw"), once.get("pitch"), once.get("roll"), reason
        )

    if len(boxes) > 1:
        return blended(f"{len(boxes)} boxes in one answer")
    if not boxes:
        return blended("pose fields without a box")
    if tokens[0][0] != "box":
        return blended("pose fields before the box")
    duplicates = [name for name in POSE_FIELDS if counts[name] > 1]
    if duplicates:
        return blended(f"duplicate field {duplicates[0]}")
    if not fields:
        return ParsedResponse("box", box)
    missing = [name for name in POSE_FIELDS if name not in names]
    if missing:
        return blended(f"box followed by only some pose fields (missing {', '.join(missing)})")
    if names != list(POSE_FIELDS):
        return ParsedResponse("malformed", reason=f"pose fields out of order ({' '.join(names)})")
    return ParsedResponse("hpe", box, once["yaw"], once["pitch"], once["roll"])


def parse_response(text: object, task: str | None = None) -> ParsedResponse:
    """Read one model answer; never raises on any input text.

    Args:
        text: the generated answer (anything that is not a `str` is `malformed`).
        task: the task whose prompt was asked, `"hpe"` or `"box"`; None to judge the text alone.
            With a task, a clean answer in the other task's format is `blended`.

    Returns:
        A `ParsedResponse`; the grammar and the kinds are in the module docstring.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    if not isinstance(text, str):
        return ParsedResponse("malformed", reason=f"not a string ({type(text).__name__})")
    text = text.strip()
    if not text:
        return ParsedResponse("malformed", reason="empty answer")
    if len(text) > MAX_ANSWER_CHARS:
        return ParsedResponse("malformed", reason=f"answer too long ({len(text)} chars)")
    try:
        parsed = _classify(_tokenize(text))
    except _Malformed as err:
        return ParsedResponse("malformed", reason=str(err))

    # one task's format answering the other task's prompt
    if task == "hpe" and parsed.kind == "box":
        return ParsedResponse("blended", parsed.box, reason="box answer to a head-pose prompt")
    if task == "box" and parsed.kind == "hpe":
        return ParsedResponse(
            "blended", parsed.box, parsed.yaw, parsed.pitch, parsed.roll,
            reason="head-pose answer to a grounding prompt",
        )
    return parsed
