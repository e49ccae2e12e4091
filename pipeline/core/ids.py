"""Object IDs and clip IDs: what is valid, and the clip ID a row gets when the manifest names none."""

from __future__ import annotations

import hashlib
import re

# User-chosen IDs: at most 256 characters of A-Z a-z 0-9 - _; the service's own IDs start with "auto:".
_OBJECT_ID = re.compile(r"(?:auto:)?[A-Za-z0-9_-]+")
MAX_OBJECT_ID = 256

# A clip ID becomes a file name: no separators, no leading dot or underscore (hidden and temporary
# names), short enough for any filesystem once ".wav" is added.
_CLIP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")
MAX_CLIP_ID = 200


def object_id_problem(object_id: str) -> str | None:
    """Why `object_id` is not a valid Soniox object ID, or None when it is."""
    if not object_id:
        return "object_id is empty"
    if len(object_id) > MAX_OBJECT_ID:
        return f"object_id has {len(object_id)} characters, more than {MAX_OBJECT_ID}"
    if not _OBJECT_ID.fullmatch(object_id):
        return "object_id may hold only A-Z a-z 0-9 - _ (or start with 'auto:')"
    return None


def clip_id_problem(clip_id: str) -> str | None:
    """Why `clip_id` is not safe as a file name, or None when it is."""
    if len(clip_id) > MAX_CLIP_ID:
        return f"clip_id has {len(clip_id)} characters, more than {MAX_CLIP_ID}"
    if not _CLIP_ID.fullmatch(clip_id):
        return "clip_id must start with A-Z a-z 0-9 and hold only A-Z a-z 0-9 . _ = + -"
    return None


def derive_clip_id(object_id: str, segment: str) -> str:
    """A deterministic clip ID from the object ID and a segment tag such as "t1000-500".

    The separator "." never occurs in object IDs, ":" (in "auto:") becomes "=", and an ID that starts
    with "_" or "-" gets the prefix "o=", so two different (object, range) pairs never share a derived
    ID and every derived ID is a valid clip_id. Very long object IDs are shortened with a hash. Only for a valid
    object ID: any other ("", " ") has no clip ID that keeps those promises, so it raises ValueError.
    """
    problem = object_id_problem(object_id)
    if problem:
        raise ValueError(f"no clip ID is derived from an invalid object_id {object_id!r}: {problem}")
    name = object_id.replace(":", "=")
    if not name[0].isalnum():  # "_x" would be a hidden name: "o=" cannot come from any object ID
        name = f"o={name}"
    if len(name) + len(segment) + 1 > MAX_CLIP_ID:
        digest = hashlib.sha256(object_id.encode()).hexdigest()[:16]
        name = f"{name[: MAX_CLIP_ID - len(segment) - 18]}+{digest}"
    return f"{name}.{segment}"
