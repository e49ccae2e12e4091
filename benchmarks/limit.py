"""The limit: a bare gRPC client (generated stubs, one channel, N threads, each stream read on its calling
thread) that reads every range and throws the bytes away.
Run as a child process: `python -m benchmarks.limit --host H --manifest M -c N`.

Prints one JSON line: clips, bytes, errors, seconds (inside the process, after imports).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import grpc
import grpc.experimental

from benchmarks.ranges import read_ranges
from pipeline.service.wire import speech_service_pb2 as pb
from pipeline.service.wire import speech_service_pb2_grpc as pb_grpc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True, help="host:port (plaintext)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("-c", "--concurrency", type=int, default=32)
    a = p.parse_args()
    started = time.monotonic()
    ranges = read_ranges(a.manifest, a.rows)
    options = [
        ("grpc.max_send_message_length", 6 << 20),
        ("grpc.max_receive_message_length", 6 << 20),
        # Each stream read on its calling thread, as the pipeline's client reads it: the cheaper way.
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    ]
    channel = grpc.insecure_channel(a.host, options=options)
    stub = pb_grpc.SpeechServiceStub(channel)
    lock = threading.Lock()
    state = {"next": 0, "clips": 0, "bytes": 0, "errors": 0}

    def worker() -> None:
        clips = nbytes = errors = 0
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(ranges):
                break
            _, object_id, start_ms, duration_ms = ranges[i]
            request = pb.GetAudioRequest(object_id=object_id)
            request.time_segment.start_ms, request.time_segment.duration_ms = start_ms, duration_ms
            try:
                for msg in stub.GetAudio(request, timeout=120):
                    nbytes += len(msg.data)
                clips += 1
            except grpc.RpcError:
                errors += 1
        with lock:
            state["clips"] += clips
            state["bytes"] += nbytes
            state["errors"] += errors

    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    out = {k: state[k] for k in ("clips", "bytes", "errors")}
    print(json.dumps({**out, "seconds": round(time.monotonic() - started, 3)}), flush=True)


if __name__ == "__main__":
    main()
