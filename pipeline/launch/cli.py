"""What every command shares: argument parsing with one-line errors (the launch error, exit 2, is
pipeline/core/errors.py's), logging flags.

Kept free of Beam imports, so `python -m pipeline serve` and `--help` start fast.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.core.errors import LaunchError, RunError, caused_by

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Library warnings that say nothing about this run: Beam imports its BigQuery client at start-up and warns on
# the root logger when apitools (a GCP-only dependency) is not installed.
NOISE = ("apitools not found",)


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default (where it has a value and the help does not already say it) and
    marks the required ones, so a user need not read the code to know what a run will do."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings:
            return f"{text} (required)"
        no_value = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if no_value or action.nargs == 0 or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises LaunchError on a bad argument, so a launch fails with one `error: ...`
    line and exit 2 (from the command's main), never with argparse's usage dump or a SystemExit in a library."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # `--with_transcript` must not silently mean `--with_transcripts`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        raise LaunchError(message)


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="also show the libraries' log lines (Apache Beam, gRPC): -v their INFO, -vv DEBUG (default: warnings)",
    )
    g.add_argument(
        "--log_level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="this pipeline's log lines: INFO shows launch and progress lines, WARNING only problems",
    )


class _DropNoise(logging.Filter):
    """Library lines that say nothing about this run, and tracebacks of a RunError, which says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        reported = record.exc_info is not None and caused_by(record.exc_info[1], RunError) is not None
        return not (reported or str(record.msg).startswith(NOISE))


def configure_logging(argv: list[str]) -> list[str]:
    """Take -v/--log_level out of argv and set up logging from them; the rest of argv, in order.

    Libraries log at WARNING unless -v asks for more, so the default output is this pipeline's own lines."""
    parser = Parser(add_help=False)
    add_logging_options(parser)
    args, rest = parser.parse_known_args(argv)
    libraries = max(logging.WARNING - 10 * args.verbose, logging.DEBUG)
    own = logging.DEBUG if args.verbose > 1 else logging.getLevelName(args.log_level)
    logging.basicConfig(format=LOG_FORMAT)
    root = logging.getLogger()
    root.setLevel(libraries)
    logging.getLogger("pipeline").setLevel(own)
    for where in (root, *root.handlers):  # a logger's filter sees only its own records; a handler's, all
        if not any(isinstance(f, _DropNoise) for f in where.filters):
            where.addFilter(_DropNoise())
    return rest
