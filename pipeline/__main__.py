"""Command line: `python -m pipeline run|serve|demo|export`."""

from __future__ import annotations

import contextlib
import sys

import grpc

from pipeline.core.errors import LaunchError
from pipeline.launch.cli import Parser, add_logging_options, configure_logging


def serve(argv: list[str]) -> None:
    """Run the local GetAudio server in the foreground until interrupted."""
    from pipeline.local.server import Faults, LocalServer, ServerSettings
    from pipeline.service.api_key import key_source, read_api_key  # imports Beam: after logging is configured

    p = Parser(prog="python -m pipeline serve", description=serve.__doc__)
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
    f.add_argument("--fail_fraction", type=float, default=0, help="calls failed with --fail_code")
    f.add_argument(
        "--fail_code",
        default="UNAVAILABLE",
        choices=grpc.StatusCode.__members__,
        metavar="CODE",
        help="status of --fail_fraction calls",
    )
    f.add_argument("--break_fraction", type=float, default=0, help="streams broken half-way")
    f.add_argument("--throttle_fraction", type=float, default=0, help="calls refused with RESOURCE_EXHAUSTED")
    f.add_argument("--slow_fraction", type=float, default=0, help="calls delayed by --slow_ms")
    f.add_argument("--slow_ms", type=float, default=30_000, help="delay of a --slow_fraction call")
    f.add_argument("--seed", type=int, default=0, help="seed of the random choice of faulty calls")
    add_logging_options(p)
    a = p.parse_args(argv)
    try:
        key = a.api_key or read_api_key(a.api_key_file).reveal() or None
    except OSError as e:
        raise LaunchError(f"{key_source(a.api_key_file)}: cannot read the API key ({e.strerror})") from None
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
    """Run the clip pipeline over a manifest (Beam's options are passed through)."""
    from pipeline.launch.run import main as run_main

    run_main(argv)


def demo(argv: list[str]) -> None:
    """Run the pipeline on a sample store through the local server."""
    from pipeline.local.demo import main as demo_main

    demo_main(argv)


def export(argv: list[str]) -> None:
    """Write Lhotse and NeMo manifests of a built dataset, from its clips table."""
    from pipeline.launch.export_command import main as export_main

    export_main(argv)


COMMANDS = {"run": run, "serve": serve, "demo": demo, "export": export}


def command_parser() -> Parser:
    """The bare `python -m pipeline`: its --help lists the commands."""
    p = Parser(
        prog="python -m pipeline",
        description="Build speech datasets from the Soniox Storage API.",
        epilog="`python -m pipeline COMMAND --help` lists a command's options.",
    )
    commands = p.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.__doc__.splitlines()[0], add_help=False)
    add_logging_options(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline COMMAND ...`; a launch that cannot start is one `error: ...` line and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        argv = configure_logging(argv)
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
        elif not argv:
            raise LaunchError(f"no command given: python -m pipeline {{{','.join(COMMANDS)}}} ... (--help lists them)")
        else:
            command_parser().parse_args(argv[:1])  # --help (exit 0), or no or an unknown command: a LaunchError
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
