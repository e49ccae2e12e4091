"""The essentials: what every clip needs and nothing more, the floor under the pipeline's CPU per clip.

N threads on one channel, each GetAudio stream read on the thread that made the call (as the pipeline's client
reads it), the WAV bytes hashed (sha256) and written atomically (a scratch file renamed into place); no retries,
no checks, no tables. Run as a child process:
`python -m benchmarks.essentials --host H --manifest M --output DIR -c N`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time

import grpc
import grpc.experimental

from benchmarks.ranges import read_ranges
from pipeline.service.wire import speech_service_pb2 as pb
from pipeline.service.wire import speech_service_pb2_grpc as pb_grpc


def save(stub: pb_grpc.SpeechServiceStub, output: str, i: int, row: tuple[str, str, int, int]) -> int:
    clip_id, object_id, start_ms, duration_ms = row
    request = pb.GetAudioRequest(object_id=object_id, audio_bytes_format="wav")
    request.time_segment.start_ms, request.time_segment.duration_ms = start_ms, duration_ms
    data = bytearray()
    for msg in stub.GetAudio(request, timeout=120):
        data += msg.data
    hashlib.sha256(data).hexdigest()  # computed as the pipeline computes it; the benchmark keeps no table
    scratch = os.path.join(output, "_tmp", f"{i}.wav")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(f"{scratch}: short write")
    finally:
        os.close(fd)
    os.replace(scratch, os.path.join(output, "clips", f"{clip_id}.wav"))
    return len(data)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True, help="host:port (plaintext)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    a = p.parse_args()
    started = time.monotonic()
    ranges = read_ranges(a.manifest, a.rows)
    rows = enumerate(ranges)
    for folder in ("_tmp", "clips"):
        os.makedirs(os.path.join(a.output, folder), exist_ok=True)
    options = [
        ("grpc.max_receive_message_length", 6 << 20),
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    ]
    channel = grpc.insecure_channel(a.host, options=options)
    stub = pb_grpc.SpeechServiceStub(channel)
    lock = threading.Lock()
    state = {"clips": 0, "bytes": 0, "errors": 0}

    def worker() -> None:
        while True:
            with lock:
                item = next(rows, None)
            if item is None:
                return
            try:
                size = save(stub, a.output, *item)
            except Exception as e:  # a failed call or write is an error row, never a silently dead thread
                print(f"row {item[0]}: {type(e).__name__}: {e}", file=sys.stderr)
                size = None
            with lock:
                state["clips" if size is not None else "errors"] += 1
                state["bytes"] += size or 0

    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    print(json.dumps({**state, "seconds": round(time.monotonic() - started, 3)}), flush=True)
    if state["clips"] != len(ranges):
        sys.exit(1)


if __name__ == "__main__":
    main()
