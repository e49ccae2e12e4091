"""The framework internals this pipeline relies on, in one place: Beam's (and argparse's) private names, each
used here only. An upgrade that removes one breaks this module, and `tests/test_beam_internals.py` says which
use broke and what it was for, instead of a run failing somewhere in the launch.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser
from apache_beam.options.value_provider import RuntimeValueProvider


class BeamArgumentParser(_BeamArgumentParser):
    """Beam's parser: it knows Beam's ValueProvider arguments (`add_value_provider_argument`), which some
    PipelineOptions subclasses declare; a plain ArgumentParser refuses them."""


def option_classes() -> list[type[PipelineOptions]]:
    """Every PipelineOptions subclass imported so far, once each: how Beam itself gathers the options it lists
    (`PipelineOptions.get_all_options`)."""
    return list({str(c): c for c in PipelineOptions.__subclasses__()}.values())


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's arguments (argparse has no public list of them)."""
    return list(parser._actions)


def in_process_runner(options: PipelineOptions):
    """Beam's in-process FnApiRunner set up as Beam's DirectRunner sets it up (the workers of
    --direct_running_mode multi_processing get the options), without the DirectRunner's first attempt to
    download and run Prism when the machine is online."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


def filesystem_options() -> PipelineOptions | None:
    """The options Beam's FileSystems use in this process (set by `FileSystems.set_options` and by
    `beam.Pipeline`); Beam has no public getter."""
    return FileSystems._pipeline_options


@contextlib.contextmanager
def process_options_kept() -> Iterator[None]:
    """Beam's process-wide options as they were, put back after the block: `beam.Pipeline` sets the
    filesystems' options and its runner the runtime options for the whole process, and Beam has no way to unset
    them. A run in a caller's process (a scheduler's, a test's) then leaves no options behind for the next."""
    saved = FileSystems._pipeline_options, RuntimeValueProvider.runtime_options
    try:
        yield
    finally:
        FileSystems._pipeline_options, RuntimeValueProvider.runtime_options = saved
