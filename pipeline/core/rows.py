"""The manifest's row rules: a row's range, object ID and clip ID checked, the row turned into a request or an error
row with a code. No Beam, no I/O: the job's read (pipeline/graph/read.py) and a rerun's join apply them."""

from __future__ import annotations

from typing import Any

from pipeline.core import elements as el
from pipeline.core.ids import clip_id_problem, derive_clip_id, object_id_problem
from pipeline.core.tables import CLIP_ID, OBJECT_ID, RANGE_COLUMNS, TIME_COLUMNS, TOKEN_COLUMNS

INT32_MAX = 2**31 - 1
ID_COLUMNS = (OBJECT_ID, CLIP_ID, *RANGE_COLUMNS)  # all that validating a row and deriving its clip ID read


def validate_row(item: tuple[str, dict[str, Any]]) -> el.ClipRequest | el.ClipError:
    """A ClipRequest for a good row, a ClipError (with a code and the row's place) for a bad one."""
    where, row = item
    object_id = row.get(OBJECT_ID)
    clip_id = row.get(CLIP_ID)
    segment, problem = _segment(row)
    problem = _object_id_problem(object_id) or problem
    if problem is None and clip_id is None:  # derived only from a valid object ID and range
        clip_id = derive_clip_id(object_id, el.segment_tag(segment))
    elif problem is None and clip_id_problem(clip_id):
        problem = (el.INVALID_CLIP_ID, clip_id_problem(clip_id))
    if problem:
        code, message = problem
        return el.ClipError(clip_id, object_id, code, f"{where}: {message}", 0, row)
    return el.ClipRequest(clip_id, object_id, segment, row, where)


def _object_id_problem(object_id: str | None) -> tuple[str, str] | None:
    if object_id is None:
        return el.MISSING_VALUE, "object_id is null"
    problem = object_id_problem(object_id)
    return (el.INVALID_OBJECT_ID, problem) if problem else None


def _segment(row: dict[str, Any]) -> tuple[el.Segment | None, tuple[str, str] | None]:
    """The row's range, or the problem with it."""
    time = [row.get(c) for c in TIME_COLUMNS]
    token = [row.get(c) for c in TOKEN_COLUMNS]
    has_time, has_token = any(v is not None for v in time), any(v is not None for v in token)
    if has_time and has_token:
        return None, (el.INVALID_RANGE, "row has both a time range and a token range; give one")
    if not has_time and not has_token:
        return None, (el.INVALID_RANGE, "row has neither a time range nor a token range")
    names, values = (TIME_COLUMNS, time) if has_time else (TOKEN_COLUMNS, token)
    for name, value in zip(names, values, strict=True):
        if value is None:
            return None, (el.MISSING_VALUE, f"{name} is null")
    a, b = values
    if has_time:
        if a < 0 or b <= 0 or a + b > INT32_MAX:
            return None, (el.INVALID_RANGE, f"time range start_ms={a} duration_ms={b} needs start >= 0, duration > 0")
        return el.TimeRange(a, b), None
    if a < 0 or b <= a or b > INT32_MAX:
        return None, (el.INVALID_RANGE, f"token range [{a}, {b}) needs 0 <= token_start < token_end")
    return el.TokenRange(a, b), None
