"""The peers: the Soniox SDK's documented pattern, `get_audio` per clip, each response's data joined and
saved as a WAV file. One call after another (`--threads 1`, peer 1) or on a ThreadPoolExecutor (peer 2).

Run as a child process with SONIOX_API_HOST and SONIOX_API_KEY set:
`python -m benchmarks.peer --manifest M --output DIR --threads N [--rows K]`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from soniox.speech_service import SpeechClient
from soniox.storage import get_audio

from benchmarks.ranges import read_ranges


def save_clip(client: SpeechClient, output: str, row: tuple[str, str, int, int]) -> int:
    clip_id, object_id, start_ms, duration_ms = row
    responses = get_audio(object_id, client, start_ms=start_ms, duration_ms=duration_ms, audio_bytes_format="wav")
    data = b"".join(r.data for r in responses)
    with open(os.path.join(output, f"{clip_id}.wav"), "wb") as f:
        f.write(data)
    return len(data)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--manifest", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    started = time.monotonic()
    rows = read_ranges(a.manifest, a.rows)
    os.makedirs(a.output, exist_ok=True)
    with SpeechClient() as client:
        if a.threads == 1:
            sizes = [save_clip(client, a.output, row) for row in rows]
        else:
            with ThreadPoolExecutor(a.threads) as pool:
                sizes = list(pool.map(lambda row: save_clip(client, a.output, row), rows))
    out = {"clips": len(sizes), "bytes": sum(sizes), "errors": 0}
    print(json.dumps({**out, "seconds": round(time.monotonic() - started, 3)}), flush=True)


if __name__ == "__main__":
    main()
