"""Command line: `python -m pipeline run|serve|demo`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import grpc

from pipeline.client import resolve_api_key


def serve(argv: list[str]) -> None:
    """Run the local GetAudio server in the foreground until interrupted."""
    from pipeline.server import Faults, LocalServer, ServerSettings

    p = argparse.ArgumentParser(prog="python -m pipeline serve", description=serve.__doc__)
    p.add_argument("--store", required=True, help="directory of {object_id}.wav|.flac files (+ .json tokens)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one, printed at start)")
    p.add_argument("--api_key", help="require this key (or SONIOX_API_KEY / --api_key_file); default: none")
    p.add_argument("--api_key_file", help="file holding the key to require")
    p.add_argument("--token_padding_ms", type=int, default=100, help="widening of token ranges on each side")
    p.add_argument("--chunk_bytes", type=int, default=64 * 1024, help="audio bytes per data message")
    p.add_argument("--clip_past_end", action="store_true", help="clip time ranges past the end (default: OUT_OF_RANGE)")
    f = p.add_argument_group("fault injection (fractions of GetAudio calls)")
    f.add_argument("--latency_ms", type=float, default=0, help="added to every call")
    f.add_argument("--fail_fraction", type=float, default=0)
    f.add_argument("--fail_code", default="UNAVAILABLE", help="status of --fail_fraction calls")
    f.add_argument("--break_fraction", type=float, default=0, help="streams broken half-way")
    f.add_argument("--throttle_fraction", type=float, default=0, help="calls refused with RESOURCE_EXHAUSTED")
    f.add_argument("--slow_fraction", type=float, default=0, help="calls delayed by --slow_ms")
    f.add_argument("--slow_ms", type=float, default=30_000)
    f.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    key = resolve_api_key(a.api_key, a.api_key_file).reveal() or None
    faults = Faults(
        latency_s=a.latency_ms / 1000,
        fail_fraction=a.fail_fraction,
        fail_code=grpc.StatusCode[a.fail_code],
        break_fraction=a.break_fraction,
        throttle_fraction=a.throttle_fraction,
        slow_fraction=a.slow_fraction,
        slow_s=a.slow_ms / 1000,
        seed=a.seed,
    )
    settings = ServerSettings(key, a.token_padding_ms, a.chunk_bytes, a.clip_past_end, faults)
    with LocalServer(a.store, settings, host=a.host, port=a.port) as server:
        print(f"serving {a.store} on {server.address}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.wait()


def run(argv: list[str]) -> None:
    """Run the clip pipeline (Beam flags are passed through)."""
    from pipeline.run import main as run_main

    run_main(argv)


def demo(argv: list[str]) -> None:
    """Run the pipeline on a sample store through the local server."""
    from pipeline.demo import main as demo_main

    demo_main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # Beam's INFO lines drown the progress
    commands = {"run": run, "serve": serve, "demo": demo}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m pipeline {{{'|'.join(commands)}}} [options]  (--help after a command)")
        sys.exit(2)
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
