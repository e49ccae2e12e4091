"""A small sample store for the demo and the tests: mono and stereo objects with transcript tokens."""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from pipeline.core.audio import SAMPLE_RATE

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "seven",
    "speakers",
    "read",
    "aloud",
]


def sample_audio(seconds: float, channels: int, seed: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Deterministic int16 audio (a tone per channel plus noise): every sample differs from its neighbours."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tones = [np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)]
    audio = 0.3 * np.stack(tones, axis=1) + 0.05 * rng.standard_normal((len(t), channels))
    return np.round(audio * 32767).astype(np.int16)


def sample_tokens(duration_ms: int, seed: int, speakers: int = 0) -> list[dict]:
    """Word and space tokens covering most of the audio, as a sidecar lists them: each word with a confidence,
    and with `speakers` > 0 a speaker (1..speakers, changing every three words) as a diarized transcript has."""
    rng = np.random.default_rng(seed)
    tokens, t = [], 300
    while t + 800 < duration_ms:
        word_ms = int(rng.integers(200, 500))
        word = len(tokens) // 2
        token = {"text": _WORDS[word % len(_WORDS)], "start_ms": t, "duration_ms": word_ms}
        token["confidence"] = round(0.6 + 0.4 * ((word * 7) % 10) / 10, 2)
        if speakers:
            token["speaker"] = 1 + word // 3 % speakers
        tokens.append(token)
        t += word_ms
        tokens.append({"text": " ", "start_ms": t, "duration_ms": 0})
        t += int(rng.integers(50, 200))
    return tokens[:-1]  # no trailing space


# object_id -> (seconds, channels, file rate, file suffix, with tokens, speakers in the transcript)
SAMPLES = {
    "demo-mono": (12.0, 1, SAMPLE_RATE, ".wav", True, 0),
    "demo-stereo": (9.0, 2, SAMPLE_RATE, ".wav", True, 2),
    "demo-flac-3ch": (5.0, 3, SAMPLE_RATE, ".flac", True, 1),
    "demo-44k-notokens": (4.0, 1, 44_100, ".wav", False, 0),
}


def write_sample_store(root: str) -> dict[str, str]:
    """Write the sample objects under `root`; returns object_id -> audio file path."""
    os.makedirs(root, exist_ok=True)
    paths = {}
    for seed, (object_id, (seconds, channels, rate, suffix, with_tokens, speakers)) in enumerate(
        sorted(SAMPLES.items())
    ):
        path = os.path.join(root, object_id + suffix)
        sf.write(path, sample_audio(seconds, channels, seed, rate), rate, subtype="PCM_16")
        if with_tokens:
            with open(os.path.join(root, object_id + ".json"), "w", encoding="utf-8") as f:
                json.dump({"tokens": sample_tokens(int(seconds * 1000), seed, speakers)}, f, indent=1)
        paths[object_id] = path
    return paths
