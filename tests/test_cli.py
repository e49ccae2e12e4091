"""The command line: every line of the README's exit-code table, --help, and a quiet, clean run.

A launch that cannot start must say why in one `error: ...` line with exit 2 and no traceback, and leave nothing
behind: most cases run `pipeline.__main__.main` in this process (they stop before any Beam pipeline exists); the
builds, the crash, the help's program name and the import-time warning run `python -m pipeline` in a child.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from pipeline.__main__ import main
from pipeline.core.errors import LaunchError
from pipeline.dataset.record import RunRecord
from pipeline.launch.cli import configure_logging
from pipeline.launch.options import check_flags, expand_config
from tests.helpers import CHILD_TIMEOUT_S, REPO, child_env, demo_manifest, explain, one_error

KEY = "sk-test-cli-key"


# -- helpers -------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_logging():
    """main() sets up logging for a whole process: put this process's back after each test."""
    root, own = logging.getLogger(), logging.getLogger("pipeline")
    saved = root.level, list(root.filters), own.level
    yield
    root.setLevel(saved[0])
    root.filters[:] = saved[1]
    own.setLevel(saved[2])


@pytest.fixture
def env(monkeypatch):
    """No SONIOX_* setting from the machine running the tests."""
    for name in [n for n in os.environ if n.startswith("SONIOX_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def exits(capsys, *argv: str) -> tuple[int, str]:
    """Run `python -m pipeline *argv` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code, capsys.readouterr().err


def launch_fails(capsys, *argv: str) -> str:
    """A `run` that stops before it starts: exit 2, one line; that line."""
    code, err = exits(capsys, "run", *argv)
    assert code == 2, err
    return one_error(err)


def child(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python *argv` in a child, in `child_env(**env)`."""
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=REPO,
        env=child_env(**(env or {})),
    )  # fmt: skip


# -- exit 2: unknown words -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--with_transcript"], "error: unknown option --with_transcript (did you mean --with_transcripts?)"),
        (["--max_in_flite=4"], "error: unknown option --max_in_flite (did you mean --max_in_flight?)"),
        (["--runnr=DirectRunner"], "error: unknown option --runnr (did you mean --runner?)"),
        (["--bogus_flag", "1"], "error: unknown option --bogus_flag (python -m pipeline run --help lists the options)"),
        (["stray"], "error: unexpected argument 'stray': options are written --name=value or --name value"),
    ],
    ids=["typo", "typo-with-value", "beam-typo", "no-close-match", "positional"],
)
def test_an_unknown_flag_stops_the_run(flags, message, capsys, env, tmp_path):
    out = tmp_path / "out"
    manifest = demo_manifest(tmp_path / "m.parquet")
    assert launch_fails(capsys, f"--manifest={manifest}", f"--output={out}", *flags) == message
    assert not out.exists()


def test_an_unknown_config_key_stops_the_run(capsys, env, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("audio_format: wav\nmax_in_flite: 4\n")
    out = tmp_path / "out"
    error = launch_fails(capsys, f"--config={config}", f"--manifest={tmp_path / 'm.parquet'}", f"--output={out}")
    assert error == f"error: --config {config}: unknown key max_in_flite (did you mean max_in_flight?)"
    assert not out.exists()


def test_beam_options_and_the_shipped_configs_are_known():
    """Beam's own options are options, not unknown words: the strict check lets every one through."""
    check_flags(
        [
            "--runner=DataflowRunner", "--project=p", "--region=us-central1", "--temp_location=gs://b/tmp",
            "--max_num_workers=2", "--machine_type=n2-standard-4", "--no_use_public_ips", "--dry_run=True",
            "--experiments=a", "--experiments", "b", "--direct_running_mode=multi_processing",
            "--direct_num_workers=2", "--s3_endpoint_url=http://127.0.0.1:9000", "--environment_type=LOOPBACK",
            "--setup_file=./setup.py", "--manifest", "m", "--output=o", "--shards", "-1", "--with_transcripts",
        ]
    )  # fmt: skip
    for config in sorted((REPO / "configs").glob("*.yaml")):
        check_flags(expand_config([f"--config={config}", "--manifest=m", "--output=o"]))


# -- exit 2: missing or bad values, unreadable files, the manifest ------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--output=OUT"], "error: --manifest is required"),
        (["--manifest=M"], "error: --output is required"),
        (["--manifest=M", "--output=OUT", "--shards", "-1"], "error: --shards takes a number of shards"),
        (["--manifest=M", "--output=OUT", "--skip_existing", "--overwrite"], "error: --skip_existing, --append and"),
        (["--manifest=M", "--output=OUT", "--shards=x"], "error: argument --shards: invalid int value: 'x'"),
        (["--manifest=M", "--output=OUT", "--audio_format=mp3"], "error: argument --audio_format: invalid choice"),
        (["--manifest=M", "--output=OUT", "--max_in_flight=0"], "error: --max_in_flight takes a number"),
        (["--manifest=M", "--output=OUT", "--max_error_ratio=5"], "error: --max_error_ratio takes a fraction"),
        (
            ["--manifest=M", "--output=OUT", "--rate_limit_service=http://rls"],
            "error: --rate_limit_service takes host:port",
        ),
        (["--manifest=M", "--output=OUT", "--config"], "error: argument --config: expected one argument"),
    ],
    ids=[
        "no-manifest",
        "no-output",
        "shards",
        "skip+shards",
        "not-int",
        "choice",
        "zero",
        "ratio",
        "rate-limit-address",
        "cfg",
    ],
)
def test_a_missing_or_bad_value_stops_the_run(flags, message, capsys, env, tmp_path):
    manifest, out = demo_manifest(tmp_path / "m.parquet"), tmp_path / "out"
    flags = [f.replace("=M", f"={manifest}").replace("=OUT", f"={out}") for f in flags]
    assert launch_fails(capsys, *flags).startswith(message)
    assert not out.exists()


def test_an_unreadable_config_or_key_file_stops_the_run(capsys, env, tmp_path):
    manifest, out = demo_manifest(tmp_path / "m.parquet"), tmp_path / "out"
    common = [f"--manifest={manifest}", f"--output={out}", "--api_host=http://127.0.0.1:1"]
    missing = tmp_path / "nope"
    assert (
        launch_fails(capsys, *common, f"--config={missing}") == f"error: --config {missing}: No such file or directory"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_in_flight: [\n")
    assert launch_fails(capsys, *common, f"--config={broken}").startswith(f"error: --config {broken}: not valid YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- max_in_flight\n")
    assert "expected a mapping" in launch_fails(capsys, *common, f"--config={listed}")
    assert launch_fails(capsys, *common, f"--api_key_file={missing}") == (
        f"error: --api_key_file {missing}: cannot read the API key (No such file or directory)"
    )
    env.setenv("SONIOX_API_KEY_FILE", str(missing))
    assert launch_fails(capsys, *common) == (
        f"error: SONIOX_API_KEY_FILE {missing}: cannot read the API key (No such file or directory)"
    )
    assert not out.exists()


def test_a_manifest_problem_stops_the_run(capsys, env, tmp_path):
    missing = tmp_path / "none-*.parquet"
    error = launch_fails(capsys, f"--manifest={missing}", f"--output={tmp_path / 'out'}")
    assert error == f"error: manifest {missing}: no file matches"
    assert not (tmp_path / "out").exists()


# -- exit 2: the key -----------------------------------------------------------------------------------


def test_a_refused_or_absent_key_stops_the_run(make_server, capsys, env, tmp_path):
    """No key at all is said as such, with where a key comes from; a wrong one is "refused"."""
    server = make_server(api_key=KEY)
    manifest, out = demo_manifest(tmp_path / "m.parquet"), tmp_path / "out"
    flags = [f"--manifest={manifest}", f"--output={out}", f"--api_host={server.address}"]
    error = launch_fails(capsys, *flags)
    assert error.startswith(f"error: no API key was given and {server.address} requires one (UNAUTHENTICATED)")
    assert "SONIOX_API_KEY" in error and "--api_key_file" in error and "refused" not in error
    env.setenv("SONIOX_API_KEY", "wrong")
    assert launch_fails(capsys, *flags) == f"error: the API key was refused by {server.address} (UNAUTHENTICATED)"
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    env.delenv("SONIOX_API_KEY")
    assert launch_fails(capsys, *flags, f"--api_key_file={empty}").startswith("error: no API key was given")
    assert not server.calls and not out.exists()


def test_a_runner_whose_workers_cannot_get_the_key_stops_the_run(capsys, env, tmp_path):
    env.setenv("SONIOX_API_KEY", KEY)
    flags = ["--manifest=gs://b/m.parquet", "--output=gs://b/out", "--runner=DataflowRunner", "--project=p"]
    error = launch_fails(capsys, *flags)
    assert error.startswith("error: this runner's workers do not see this machine's environment")
    assert "--api_key_file" in error and KEY not in error


def test_no_command_or_an_unknown_one(capsys, env):
    code, err = exits(capsys)
    commands = "{run,serve,demo,export}"
    assert (
        code == 2
        and one_error(err) == f"error: no command given: python -m pipeline {commands} ... (--help lists them)"
    )
    code, err = exits(capsys, "rnu", "--manifest=m")
    assert code == 2 and one_error(err).startswith("error: argument COMMAND: invalid choice: 'rnu'")


def test_serve_with_an_unreadable_key_file(capsys, env, tmp_path):
    code, err = exits(capsys, "serve", f"--store={tmp_path}", f"--api_key_file={tmp_path / 'nope'}")
    assert code == 2
    assert (
        one_error(err)
        == f"error: --api_key_file {tmp_path / 'nope'}: cannot read the API key (No such file or directory)"
    )


# -- exit 0 and 1: builds; quiet and clean ----------------------------------------------------------------


def test_builds_exit_0_or_1_quietly_and_leave_no_temporary_folder(make_server, tmp_path):
    """Too many errors: exit 1 after the tables. A skip-only rerun: exit 0, a rate that means something. Both
    print no library warning and leave $TMPDIR as they found it."""
    server = make_server()
    manifest, out = demo_manifest(tmp_path / "m.parquet", rows=3, missing=1), tmp_path / "out"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    flags = ["-m", "pipeline", "run", f"--manifest={manifest}", f"--output={out}", f"--api_host={server.address}"]
    first = child(*flags, env={"TMPDIR": str(tmp)})
    assert first.returncode == 1, explain(first)
    assert one_error(first.stderr) == "error: 25.0% of rows failed, more than --max_error_ratio 0.05"
    assert (out / "_RUN.json").exists() and list((out / "metadata").glob("errors-*.parquet"))
    second = child(*flags, "--skip_existing", "--max_error_ratio=0.25", env={"TMPDIR": str(tmp)})
    assert second.returncode == 0, explain(second)
    wall = next(line for line in second.stdout.splitlines() if line.startswith("wall time"))
    assert "nothing fetched;" in wall and "rows/s checked" in wall and "clips/s" not in wall, wall
    for proc in (first, second):
        assert "clips " in proc.stdout and "Traceback" not in proc.stderr
        assert [line for line in proc.stderr.splitlines() if " WARNING " in line] == [], proc.stderr
        assert "Discarding" not in proc.stderr
    assert sorted(os.listdir(tmp)) == [], "the runs left temporary folders"


def test_summary_rate_of_a_run_that_fetched_nothing():
    lines = list(RunRecord(rows=7, clips_skipped=6, errors_by_code={"NOT_FOUND": 1}, wall_seconds=0.5).lines("out"))
    assert "(nothing fetched; 14.0 rows/s checked)" in next(x for x in lines if x.startswith("wall time"))
    lines = list(RunRecord(rows=7, clips_written=6, wall_seconds=2.0).lines("out"))
    assert "(3.0 clips/s)" in next(x for x in lines if x.startswith("wall time"))


# -- exit 3: a crash after the start ---------------------------------------------------------------------


PLANTED_BUG = """
from pipeline.graph import finish


def write_card(*args, **kwargs):
    raise RuntimeError("a planted bug in the card")


finish.write_card = write_card
"""


def test_a_run_that_fails_after_it_started_exits_3(tmp_path):
    """Not 1: that would read as "ran, too many errors, tables written". A bug planted in the job's last step
    (through a sitecustomize module) fails the run after every launch check passed."""
    manifest = demo_manifest(tmp_path / "m.parquet", rows=0)
    (tmp_path / "bug").mkdir()
    (tmp_path / "bug" / "sitecustomize.py").write_text(PLANTED_BUG)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "bug"), env["PYTHONPATH"]])
    proc = child("-m", "pipeline", "run", f"--manifest={manifest}", f"--output={tmp_path / 'out'}", env=env)
    assert proc.returncode == 3, explain(proc)
    assert "a planted bug in the card" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: the run failed (RuntimeError")
    assert not (tmp_path / "out" / "_RUN.json").exists()


# -- --help ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "shows"),
    [
        (
            "run",
            ["--manifest MANIFEST   Parquet", "(required)", "(default: 64)", "(default: pcm_s16le)", "--log_level"],
        ),
        ("serve", ["--store STORE", "(required)", "(default: 100)", "(default: UNAVAILABLE)", "-v, --verbose"]),
        ("demo", ["--output OUTPUT", "(default: demo-output)", "python -m pipeline run --help"]),
    ],
)
def test_help_shows_defaults_and_required_options(command, shows, capsys):
    try:
        main([command, "--help"])  # run's help returns, argparse's exits 0
    except SystemExit as e:
        assert e.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: python -m pipeline {command} ")
    for text in shows:
        assert " ".join(text.split()) in out, text


def test_help_and_errors_name_the_program(tmp_path):
    """In a real child: `python -m pipeline --help` exits 0 with the commands; no `usage: __main__.py`."""
    proc = child("-m", "pipeline", "--help")
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.startswith("usage: python -m pipeline ")
    for command in ("run", "serve", "demo"):
        assert f"\n    {command} " in proc.stdout, proc.stdout
    proc = child("-m", "pipeline", "run", "--manifest=m", "--output=o", "--shards=x")
    assert proc.returncode == 2, explain(proc)
    assert one_error(proc.stderr) == "error: argument --shards: invalid int value: 'x'"
    assert "__main__.py" not in proc.stdout + proc.stderr


# -- logging ---------------------------------------------------------------------------------------------

NO_APITOOLS = """
import sys

class NoApitools:  # a fresh install without the [gcp] extra
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "apitools":
            raise ImportError(name)

sys.meta_path.insert(0, NoApitools())
if sys.argv[1] == "bare":
    import logging
    logging.basicConfig()
    import pipeline.launch.run
else:
    from pipeline.__main__ import main
    main(sys.argv[1:])
"""


def test_no_apitools_warning_on_a_fresh_install(tmp_path):
    bare = child("-c", NO_APITOOLS, "bare")
    assert "apitools not found" in bare.stderr, "the test no longer reproduces the warning: " + explain(bare)
    proc = child("-c", NO_APITOOLS, "run", "--manifest=m", "--output=o", "--bogus")
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.strip() == "error: unknown option --bogus (python -m pipeline run --help lists the options)"


@pytest.mark.parametrize(
    ("flags", "own", "libraries"),
    [
        ([], logging.INFO, logging.WARNING),
        (["-v"], logging.INFO, logging.INFO),
        (["-vv"], logging.DEBUG, logging.DEBUG),
        (["--log_level", "warning"], logging.WARNING, logging.WARNING),
        (["--log_level=ERROR", "--verbose"], logging.ERROR, logging.INFO),
    ],
)
def test_log_level_and_verbose(flags, own, libraries):
    argv = ["run", "--manifest", "m", "--shards", "-1", "--output=o"]
    assert configure_logging(argv[:1] + flags + argv[1:]) == argv  # the rest, in order
    assert logging.getLogger("pipeline.launch.run").getEffectiveLevel() == own
    assert logging.getLogger("apache_beam.runners").getEffectiveLevel() == libraries


def test_a_bad_log_level_is_a_launch_error():
    with pytest.raises(LaunchError, match="argument --log_level: invalid choice: 'LOUD'"):
        configure_logging(["run", "--log_level=loud"])
