"""A small sample store for the demo and the tests: mono and stereo objects with transcript tokens."""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from pipeline.audio import SAMPLE_RATE

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


def sample_tokens(duration_ms: int, seed: int) -> list[dict]:
    """Word and space tokens covering most of the audio, as a sidecar lists them."""
    rng = np.random.default_rng(seed)
    tokens, t = [], 300
    while t + 800 < duration_ms:
        word_ms = int(rng.integers(200, 500))
        tokens.append({"text": _WORDS[len(tokens) // 2 % len(_WORDS)], "start_ms": t, "duration_ms": word_ms})
        t += word_ms
        tokens.append({"text": " ", "start_ms": t, "duration_ms": 0})
        t += int(rng.integers(50, 200))
    return tokens[:-1]  # no trailing space


# object_id -> (seconds, channels, file rate, file suffix, with tokens)
SAMPLES = {
    "demo-mono": (12.0, 1, SAMPLE_RATE, ".wav", True),
    "demo-stereo": (9.0, 2, SAMPLE_RATE, ".wav", True),
    "demo-flac-3ch": (5.0, 3, SAMPLE_RATE, ".flac", True),
    "demo-44k-notokens": (4.0, 1, 44_100, ".wav", False),
}


def write_sample_store(root: str) -> dict[str, str]:
    """Write the sample objects under `root`; returns object_id -> audio file path."""
    os.makedirs(root, exist_ok=True)
    paths = {}
    for seed, (object_id, (seconds, channels, rate, suffix, with_tokens)) in enumerate(sorted(SAMPLES.items())):
        path = os.path.join(root, object_id + suffix)
        sf.write(path, sample_audio(seconds, channels, seed, rate), rate, subtype="PCM_16")
        if with_tokens:
            with open(os.path.join(root, object_id + ".json"), "w", encoding="utf-8") as f:
                json.dump({"tokens": sample_tokens(int(seconds * 1000), seed)}, f, indent=1)
        paths[object_id] = path
    return paths
