"""The transcript rules: words cut by a time range's edges, spaces at the ends, speaker and confidence, and
an object with no transcript (read from the service's real GetObject message)."""

from __future__ import annotations

from pipeline.core.messages import ObjectToken, TimeRange, TokenRange
from pipeline.dataset.transcripts import ALL, clip_tokens, tokens_for
from pipeline.service.client import _tokens
from pipeline.service.wire import speech_service_pb2 as pb


def words(*spec: tuple[str, int, int]) -> tuple[ObjectToken, ...]:
    """(text, start_ms, duration_ms) tokens, indexed in order, each word with speaker 1 and a confidence."""
    return tuple(
        ObjectToken(i, text, start, ms, None if text == " " else 1, None if text == " " else 0.9)
        for i, (text, start, ms) in enumerate(spec)
    )


# A clip from 1000 to 2000 ms. "left" straddles the start (100 of its 500 ms inside), "edge" is half in
# (250 of 500 ms: not more than half, so out), "mostly" is 400 of 500 ms inside, "right" 84 of 558 ms.
TOKENS = words(
    ("left", 600, 500),
    (" ", 1100, 0),
    ("mostly", 1100, 500),
    (" ", 1600, 0),
    ("inner", 1650, 100),
    (" ", 1750, 0),
    ("edge", 1750, 500),
    (" ", 1916, 0),
    ("right", 1916, 558),
)
CLIP = TimeRange(1000, 1000)


def texts(rows: list[dict]) -> list[str]:
    return [r["text"] for r in rows]


def test_a_time_range_keeps_the_words_mostly_inside_it_and_no_edge_spaces() -> None:
    text, rows = clip_tokens(tokens_for(TOKENS, CLIP), CLIP, 1000, 1000)
    assert text == "mostly inner"
    assert texts(rows) == ["mostly", " ", "inner"]  # the spaces next to the dropped words are trimmed
    assert rows[0] == {"text": "mostly", "start_ms": 100, "duration_ms": 500, "speaker": 1, "confidence": 0.9}
    assert rows[1]["speaker"] is None and rows[1]["confidence"] is None


def test_edge_words_all_keeps_every_overlapping_word() -> None:
    text, rows = clip_tokens(tokens_for(TOKENS, CLIP), CLIP, 1000, 1000, ALL)
    assert text == "left mostly inner edge right"
    assert rows[0]["start_ms"] == -400 and rows[-1]["start_ms"] + rows[-1]["duration_ms"] > 1000
    assert texts(rows)[0] != " " and texts(rows)[-1] != " "


def test_the_rule_applies_to_the_served_range() -> None:
    """A range clipped at the object's end by the service: the words are judged against what was served."""
    asked = TimeRange(1000, 2000)
    text, _ = clip_tokens(tokens_for(TOKENS, asked), asked, 1000, 1000)
    assert text == "mostly inner"


def test_a_token_range_keeps_its_tokens_without_edge_spaces() -> None:
    segment = TokenRange(1, 6)  # " mostly _ inner _"
    text, rows = clip_tokens(tokens_for(TOKENS, segment), segment, 1000, 1000)
    assert texts(rows) == ["mostly", " ", "inner"] and text == "mostly inner"


def test_a_range_with_no_words_is_empty_and_an_object_without_a_transcript_is_none() -> None:
    text, rows = clip_tokens(tokens_for(TOKENS, TimeRange(0, 500)), TimeRange(0, 500), 0, 500)
    assert (text, rows) == ("", [])
    assert tokens_for(None, CLIP) is None


def test_get_object_without_a_transcript_has_no_tokens() -> None:
    assert _tokens(pb.StoredObject(object_id="a")) is None
    assert _tokens(pb.StoredObject(object_id="a", transcript=pb.Transcript())) == ()


def test_get_object_speaker_and_confidence_zero_mean_not_given() -> None:
    transcript = pb.Transcript(
        tokens=[
            pb.Token(idx=0, text="hi", start_ms=0, duration_ms=100, speaker_id=2, confidence=0.75),
            pb.Token(idx=1, text=" ", start_ms=100, duration_ms=0),
        ]
    )
    first, space = _tokens(pb.StoredObject(object_id="a", transcript=transcript))
    assert (first.speaker, first.confidence) == (2, 0.75)
    assert (space.speaker, space.confidence) == (None, None)
