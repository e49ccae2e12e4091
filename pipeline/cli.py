"""What every command shares: the launch error (exit 2) and argument parsing with one-line errors.

Kept free of Beam imports, so `python -m pipeline serve` and `--help` start fast.
"""

from __future__ import annotations

import argparse


class LaunchError(RuntimeError):
    """The run cannot start as asked: it stops before anything is fetched or written (exit 2)."""


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
