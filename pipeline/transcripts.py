"""Transcripts for clips: an object's tokens cut to one clip and timed from the clip's start."""

from __future__ import annotations

from typing import Any

from pipeline.messages import ObjectToken, Segment, TokenRange


def _overlapping(tokens: tuple[ObjectToken, ...], start_ms: int, duration_ms: int) -> tuple[ObjectToken, ...]:
    """Tokens that overlap [start, start + duration); a zero-length token (a space) counts as 1 ms long."""
    end = start_ms + duration_ms
    return tuple(t for t in tokens if t.start_ms < end and t.start_ms + max(t.duration_ms, 1) > start_ms)


def tokens_for(tokens: tuple[ObjectToken, ...], segment: Segment) -> tuple[ObjectToken, ...]:
    """The tokens a clip can hold, chosen before the fetch so that each request carries only its own
    (an object's whole transcript on every one of its requests would grow the shuffle with clips x tokens).

    A token range gets exactly its tokens; a time range the tokens that overlap what was asked for, a
    superset of those that overlap what is served (the service may clip a range at the object's end).
    """
    if isinstance(segment, TokenRange):
        return tokens[segment.token_start : segment.token_end]
    return _overlapping(tokens, segment.start_ms, segment.duration_ms)


def clip_tokens(
    tokens: tuple[ObjectToken, ...], segment: Segment, clip_start_ms: int, clip_duration_ms: int
) -> tuple[str, list[dict[str, Any]]]:
    """(text, tokens) of a served clip from its `tokens_for` tokens, times relative to the clip's start.

    A token range keeps all of them (the audio around them is wider); a time range keeps those that overlap
    the served audio, so a word cut by the clip's edge is listed, with a start before 0 or an end past the
    clip's duration.
    """
    chosen = tokens if isinstance(segment, TokenRange) else _overlapping(tokens, clip_start_ms, clip_duration_ms)
    text = "".join(t.text for t in chosen).strip()
    rows = [{"text": t.text, "start_ms": t.start_ms - clip_start_ms, "duration_ms": t.duration_ms} for t in chosen]
    return text, rows
