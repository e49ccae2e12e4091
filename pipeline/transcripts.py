"""Transcripts for clips: an object's tokens cut to one clip and timed from the clip's start."""

from __future__ import annotations

from typing import Any

from pipeline.client import ObjectToken, Segment, TokenRange


def clip_tokens(
    tokens: tuple[ObjectToken, ...], segment: Segment, clip_start_ms: int, clip_duration_ms: int
) -> tuple[str, list[dict[str, Any]]]:
    """(text, tokens) of a served clip, token times relative to the clip's start.

    A token range gets exactly its tokens (the audio around them is wider); a time range gets every token
    that overlaps it, so a word cut by the clip's edge is listed, with a start before 0 or an end past the
    clip's duration.
    """
    if isinstance(segment, TokenRange):
        chosen = tokens[segment.token_start : segment.token_end]
    else:
        end = clip_start_ms + clip_duration_ms
        chosen = [
            t for t in tokens if t.start_ms < end and max(t.start_ms + t.duration_ms, t.start_ms + 1) > clip_start_ms
        ]
    text = "".join(t.text for t in chosen).strip()
    rows = [{"text": t.text, "start_ms": t.start_ms - clip_start_ms, "duration_ms": t.duration_ms} for t in chosen]
    return text, rows
