"""The errors that end a command, shared by every layer: a run that cannot start as asked (exit 2) and a run that
failed after it started (exit 3), and how to find either behind the exception Beam re-raises."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """The run cannot start as asked: it stops before anything is fetched or written (exit 2)."""


class RunError(RuntimeError):
    """The run failed after it started, for a reason one line says (exit 3, no traceback): Beam's logged
    traceback of it is dropped too."""


def caused_by(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The `kind` exception behind `error` (Beam re-raises what a step raised as a RuntimeError naming it)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error
