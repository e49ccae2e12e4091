"""Transcripts for clips: an object's tokens cut to one clip and timed from the clip's start.

The rule for a time range's edges (`--edge_words`): by default (`mostly_inside`) a word is kept when more than
half of its duration lies inside the served clip, so that `transcript_text` names only words the audio holds
(a word cut at 84 ms of 558 ms is label noise for ASR training); `all` keeps every word that overlaps the clip.
A token range keeps exactly its tokens (the service widens its audio to hold them). Either way the token
list neither starts nor ends with a space token.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.messages import ObjectToken, Segment, TokenRange

MOSTLY_INSIDE = "mostly_inside"
ALL = "all"
EDGE_WORDS = (MOSTLY_INSIDE, ALL)


def _overlapping(tokens: tuple[ObjectToken, ...], start_ms: int, duration_ms: int) -> tuple[ObjectToken, ...]:
    """Tokens that overlap [start, start + duration); a zero-length token (a space) counts as 1 ms long."""
    end = start_ms + duration_ms
    return tuple(t for t in tokens if t.start_ms < end and t.start_ms + max(t.duration_ms, 1) > start_ms)


def _mostly_inside(token: ObjectToken, start_ms: int, end_ms: int) -> bool:
    """More than half of the token's duration lies in [start, end); a zero-length token when it is inside."""
    if token.duration_ms <= 0:
        return start_ms <= token.start_ms < end_ms
    inside = min(token.start_ms + token.duration_ms, end_ms) - max(token.start_ms, start_ms)
    return 2 * inside > token.duration_ms


def _trimmed(tokens: tuple[ObjectToken, ...]) -> tuple[ObjectToken, ...]:
    """Without the space tokens at either end (a token list for training starts and ends with a word)."""
    first, last = 0, len(tokens)
    while first < last and not tokens[first].text.strip():
        first += 1
    while last > first and not tokens[last - 1].text.strip():
        last -= 1
    return tokens[first:last]


def tokens_for(tokens: tuple[ObjectToken, ...] | None, segment: Segment) -> tuple[ObjectToken, ...] | None:
    """The tokens a clip can hold, chosen before the fetch so that each request carries only its own
    (an object's whole transcript on every one of its requests would grow the shuffle with clips x tokens).

    A token range gets exactly its tokens; a time range the tokens that overlap what was asked for, a
    superset of those that overlap what is served (the service may clip a range at the object's end).
    None (the object has no transcript) stays None.
    """
    if tokens is None:
        return None
    if isinstance(segment, TokenRange):
        return tokens[segment.token_start : segment.token_end]
    return _overlapping(tokens, segment.start_ms, segment.duration_ms)


def clip_tokens(
    tokens: tuple[ObjectToken, ...],
    segment: Segment,
    clip_start_ms: int,
    clip_duration_ms: int,
    edge_words: str = MOSTLY_INSIDE,
) -> tuple[str, list[dict[str, Any]]]:
    """(text, tokens) of a served clip from its `tokens_for` tokens, times relative to the clip's start.

    A token range keeps all of them; a time range those the `edge_words` rule keeps (see the module's
    docstring), so with `all` a word cut by the clip's edge may start before 0 or end past the clip.
    """
    if isinstance(segment, TokenRange):
        chosen = tokens
    elif edge_words == ALL:
        chosen = _overlapping(tokens, clip_start_ms, clip_duration_ms)
    else:
        end = clip_start_ms + clip_duration_ms
        chosen = tuple(t for t in tokens if _mostly_inside(t, clip_start_ms, end))
    chosen = _trimmed(chosen)
    text = "".join(t.text for t in chosen).strip()
    return text, [_row(t, clip_start_ms) for t in chosen]


def _row(token: ObjectToken, clip_start_ms: int) -> dict[str, Any]:
    return {
        "text": token.text,
        "start_ms": token.start_ms - clip_start_ms,
        "duration_ms": token.duration_ms,
        "speaker": token.speaker,
        "confidence": token.confidence,
    }
