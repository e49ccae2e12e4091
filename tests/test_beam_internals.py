"""Each Beam (and argparse) internal that `pipeline/graph/beam_internals.py` relies on, used as the pipeline uses it:
after an upgrade, a failure here names the use that broke and what it was for."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.options.value_provider import RuntimeValueProvider, ValueProvider
from apache_beam.testing.util import assert_that, equal_to

from pipeline.graph import beam_internals
from pipeline.launch.options import ClipOptions, every_option_parser, known_names, option_names
from pipeline.local.server import LocalServer
from tests.helpers import demo_manifest, expect_exit, run_build


def test_beams_parser_still_takes_value_provider_arguments() -> None:
    parser = beam_internals.BeamArgumentParser()
    assert hasattr(parser, "add_value_provider_argument"), (
        "apache_beam.options.pipeline_options._BeamArgumentParser changed: every_option_parser() cannot parse "
        "the options that Beam declares as ValueProvider arguments"
    )
    parser.add_value_provider_argument("--vp")
    assert isinstance(parser.parse_args(["--vp=x"]).vp, ValueProvider)


def test_every_options_class_is_found_as_beam_finds_them() -> None:
    classes = beam_internals.option_classes()
    assert ClipOptions in classes and StandardOptions in classes, (
        "PipelineOptions.__subclasses__() no longer lists the options classes: unknown options cannot be refused"
    )
    names = known_names(every_option_parser())
    assert {"manifest", "output", "runner", "direct_num_workers"} <= set(names)


def test_a_parsers_arguments_are_listed() -> None:
    assert {"manifest", "output", "max_in_flight"} <= set(option_names()), (
        "argparse.ArgumentParser._actions is gone: option_names(), known_names() and run --help need another way"
    )


def test_the_in_process_runner_runs_a_pipeline_with_the_options() -> None:
    options = PipelineOptions(["--manifest=m.parquet", "--output=o"])
    try:
        runner = beam_internals.in_process_runner(options)
    except (AttributeError, ImportError, TypeError) as e:
        pytest.fail(
            f"Beam's FnApiRunner set-up changed ({type(e).__name__}: {e}): beam_internals.in_process_runner, the "
            "runner of every local run, must be set up another way"
        )
    with beam.Pipeline(runner=runner, options=options) as p:
        assert_that(p | beam.Create([1, 2, 3]) | beam.Map(lambda x: 2 * x), equal_to([2, 4, 6]))


def test_beams_process_wide_options_are_read_and_put_back() -> None:
    options = PipelineOptions(["--s3_endpoint_url=http://localhost:1"])
    with beam_internals.process_options_kept():
        FileSystems.set_options(options)
        assert beam_internals.filesystem_options() is options, (
            "FileSystems._pipeline_options is gone: beam_internals.filesystem_options() must read Beam's filesystem "
            "options another way"
        )
        RuntimeValueProvider.set_runtime_options({"x": 1})
    assert beam_internals.filesystem_options() is not options, "the filesystem options were not put back"
    assert RuntimeValueProvider.runtime_options != {"x": 1}, (
        "RuntimeValueProvider.runtime_options is not where Beam keeps the runtime options: process_options_kept() "
        "cannot put them back"
    )


def test_a_run_in_a_callers_process_leaves_beams_options_as_it_found_them(server: LocalServer, tmp_path) -> None:
    """`python -m pipeline run`, called in a scheduler's (here the test's) process, sets Beam's filesystem and
    runtime options for the run (beam.Pipeline does) and puts back what was there."""
    mine = PipelineOptions(["--s3_endpoint_url=http://localhost:1"])
    with beam_internals.process_options_kept():
        FileSystems.set_options(mine)
        runtime = RuntimeValueProvider.runtime_options
        expect_exit(run_build(server, demo_manifest(tmp_path / "m.parquet"), tmp_path / "out"), 0)
        assert beam_internals.filesystem_options() is mine
        assert RuntimeValueProvider.runtime_options is runtime
