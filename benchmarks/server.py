"""The GetAudio server the benchmarks measure against: `python -m pipeline serve` in a process of its own (so its
CPU is not in the measured processes), on a free loopback port, optionally pinned."""

from __future__ import annotations

import os
import signal
import subprocess

from benchmarks.harness import LOGS, PY, ROOT, process_cpu_s


class Server:
    """`python -m pipeline serve` as a child process on a free loopback port."""

    def __init__(self, store: str, latency_ms: float, prefix: tuple[str, ...] = (), name: str = "server"):
        self.latency_ms = latency_ms
        self._err = open(os.path.join(LOGS, f"{name}-{latency_ms:g}ms.err"), "wb")  # noqa: SIM115
        cmd = [*prefix, PY, "-m", "pipeline", "serve", "--store", store, "--port", "0", f"--latency_ms={latency_ms:g}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT, text=True)
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            self.stop()
            raise RuntimeError(f"the server did not start (see {self._err.name}): {line!r}")
        self.address = line.strip().rsplit(" on ", 1)[1]  # http://127.0.0.1:PORT
        self.target = self.address.removeprefix("http://")

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def warm_up(self, object_ids: list[str]) -> None:
        """One short call per object: the server's file index and descriptions, and the page cache."""
        import grpc

        from pipeline.service.wire import speech_service_pb2 as pb
        from pipeline.service.wire import speech_service_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.SpeechServiceStub(channel)
            for object_id in object_ids:
                request = pb.GetAudioRequest(object_id=object_id)
                request.time_segment.start_ms, request.time_segment.duration_ms = 0, 10
                for _ in stub.GetAudio(request, timeout=30):
                    pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM, not SIGINT: a process started in the background by a shell ignores SIGINT, and so
            # would the server it starts.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._err.close()
