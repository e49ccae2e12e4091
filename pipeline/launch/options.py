"""The pipeline's options: a PipelineOptions subclass (so Beam and Dataflow know them) and YAML configs.

The API key is never an option: it comes from the file named by --api_key_file or SONIOX_API_KEY_FILE, or
from SONIOX_API_KEY, so it cannot show up in Beam's option dumps or the Dataflow job page.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any

import yaml
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.core.audio import FORMATS
from pipeline.core.errors import LaunchError
from pipeline.dataset.clips import CHANNELS, CLIP_FORMATS, KEEP
from pipeline.dataset.layout import FILES, HF_PARQUET, LAYOUTS, LHOTSE, LHOTSE_SHAR, WEBDATASET
from pipeline.dataset.transcripts import EDGE_WORDS, MOSTLY_INSIDE
from pipeline.graph.beam_internals import BeamArgumentParser, actions, option_classes
from pipeline.launch.cli import Parser
from pipeline.launch.export_command import NO_TEXT, parse_exports

REQUIRED = ("manifest", "output")
# The deadline of one GetAudio attempt is --rpc_timeout_s + 0.1 s per second of audio. An attempt that has not
# ended within a day is hung, not slow (and --max_attempts would wait that long again); gRPC turns the deadline
# into an absolute time in int64 nanoseconds, which nan, inf or 1e300 overflow: every call would fail at once
# with DEADLINE_EXCEEDED, before it reaches the server.
MAX_RPC_TIMEOUT_S = 86_400.0


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# An on/off option that also takes a value: `--skip_existing`, `--skip_existing=false`, and the
# `--skip_existing=true` a Dataflow Flex Template launch passes.
_FLAG = {"nargs": "?", "const": True, "default": False, "type": _boolean}


class ClipOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("clip pipeline")
        g.add_argument("--manifest", help="Parquet manifest: a file or a glob, on any Beam filesystem")
        g.add_argument("--output", help="output prefix: clips/ and metadata/ go under it (local, gs://, s3://)")
        g.add_argument(
            "--api_host",
            default=None,
            help="GetAudio endpoint; default SONIOX_API_HOST, else https://api.soniox.com:443. "
            "TLS unless given as http://host:port",
        )
        g.add_argument(
            "--api_key_file",
            default=None,
            help="file holding the API key, on any Beam filesystem (e.g. a locked-down gs:// object); "
            "default: the file named by SONIOX_API_KEY_FILE, else the SONIOX_API_KEY environment variable",
        )
        g.add_argument(
            "--audio_format",
            choices=FORMATS,
            default="pcm_s16le",
            help="transfer format of GetAudio (it does not change the clip files: see --clip_format)",
        )
        g.add_argument(
            "--clip_format",
            choices=CLIP_FORMATS,
            default="wav",
            help="clip files: wav (16-bit PCM) or flac (lossless, about half the size)",
        )
        g.add_argument(
            "--channels",
            choices=CHANNELS,
            default=KEEP,
            help="keep: a clip has the object's channels; mix: each clip is mono, the mean of the object's channels "
            "(for a mono model: no loader setting, and one transcript per piece of audio)",
        )
        g.add_argument("--max_in_flight", type=int, default=64, help="concurrent GetAudio streams per worker process")
        g.add_argument(
            "--max_attempts",
            type=int,
            default=6,
            help="attempts in a row without new audio before a clip is given up (retryable errors only)",
        )
        g.add_argument(
            "--rpc_timeout_s",
            type=float,
            default=60.0,
            help="deadline of one GetAudio attempt, plus 0.1 s per second of audio requested",
        )
        g.add_argument(
            "--skip_existing",
            **_FLAG,
            help="over an existing dataset: make it match this manifest, fetching only the clips it lacks or holds "
            "stale (decided from its tables and one listing, no request per clip); clip files and shards no row "
            "lists are removed at the end",
        )
        g.add_argument(
            "--append",
            **_FLAG,
            help="over an existing dataset: add this manifest's rows and keep the earlier ones; a row whose clip_id "
            "the dataset holds replaces it (so metadata/errors-*.parquet as the manifest retries the failures)",
        )
        g.add_argument("--overwrite", **_FLAG, help="over an existing dataset: replace it")
        g.add_argument(
            "--verify_existing",
            **_FLAG,
            help="with --skip_existing or --append: also read every existing clip and check its sha256 against "
            "the clips table (reads every byte); a clip that differs is fetched again",
        )
        g.add_argument(
            "--max_error_ratio",
            type=float,
            default=0.05,
            help="exit non-zero when errors / rows exceeds this (the tables are written first)",
        )
        g.add_argument(
            "--layout",
            choices=LAYOUTS,
            default=FILES,
            help="files: one clip file each under clips/; webdataset: tar shards under shards/; hf-parquet: Hugging "
            "Face Parquet shards under data/ (audio in the rows); lhotse-shar: Lhotse Shar shards under shar/ "
            "(1,000 clips each by default); see --shards and --shard_mb",
        )
        g.add_argument(
            "--shard_mb",
            type=float,
            default=0,
            help="a sharded layout's shard size, when --shards is not given: the count is estimated from the "
            "manifest's durations at launch; 0: 1000 for webdataset, 500 for hf-parquet",
        )
        g.add_argument(
            "--shards",
            type=int,
            default=0,
            help="the number of shards of a sharded layout (0: sized by --shard_mb); alone, --shards N is --layout "
            "webdataset: N tar shards ({key}.wav + {key}.json per clip) under shards/",
        )
        g.add_argument(
            "--with_transcripts",
            **_FLAG,
            help="add each clip's transcript text and tokens (from GetObject, one call per object) to the clips table",
        )
        g.add_argument(
            "--edge_words",
            choices=EDGE_WORDS,
            default=MOSTLY_INSIDE,
            help="with --with_transcripts, the words of a time range's transcript: mostly_inside (more than half of "
            "the word's duration inside the clip) or all (every word that overlaps it)",
        )
        g.add_argument(
            "--export",
            default=None,
            help="also write training manifests at the end of the run: a comma-separated list of lhotse, nemo "
            "(python -m pipeline export does it for a built dataset)",
        )
        g.add_argument(
            "--rate_limit_service",
            default=None,
            help="host:port of an Envoy rate limit service (gRPC) that every worker asks before each GetAudio "
            "call: a limit for the whole job, set in that service's config; default: none",
        )
        g.add_argument(
            "--rate_limit_domain",
            default="soniox-clips",
            help="the rate limit service's domain for these calls (their descriptor is method=GetAudio)",
        )
        g.add_argument(
            "--detach",
            **_FLAG,
            help="submit the job and return without waiting (a Dataflow job writes its own card and _RUN.json)",
        )
        g.add_argument("--config", default=None, help="YAML file of options (see configs/); flags override it")


def add_dry_run(parser: argparse.ArgumentParser) -> None:
    """--dry_run is ours, not Beam's (whose takes any string, so `--dry_run=False` was a dry run, and which only
    Dataflow honours): it checks everything a launch checks, builds the graph, and runs nothing."""
    parser.add_argument(
        "--dry_run",
        **_FLAG,
        help="check the options, the manifest's footers, the output and the key (one GetObject call), build the "
        "job graph, and stop: no GetAudio call, nothing written or deleted",
    )


def take_dry_run(flags: list[str]) -> tuple[bool, list[str]]:
    """(--dry_run given, the flags without it), so Beam's own --dry_run never sees it."""
    parser = Parser(prog="python -m pipeline run", add_help=False)
    add_dry_run(parser)
    known, rest = parser.parse_known_args(flags)
    return known.dry_run, rest


_SECRET = re.compile(r"secret|password|passwd|token|credential|key", re.IGNORECASE)
_SAFE = re.compile(r"_file$|_path$|^api_key_file$")


def safe_options(options: PipelineOptions) -> dict[str, Any]:
    """This pipeline's options and every other option that was set, secret-looking values redacted."""
    every = options.get_all_options()
    chosen = {name: every.get(name) for name in option_names()}
    chosen.update(options.get_all_options(drop_default=True, retain_unknown_options=True))
    return {
        name: "<redacted>" if value is not None and _SECRET.search(name) and not _SAFE.search(name) else value
        for name, value in sorted(chosen.items())
    }


def option_names() -> list[str]:
    """The names of this pipeline's own options."""
    parser = argparse.ArgumentParser()
    ClipOptions._add_argparse_args(parser)
    return [a.dest for a in actions(parser) if a.dest != "help"]


class _EveryOptionParser(Parser, BeamArgumentParser):
    """Beam's parser (some Beam options are ValueProvider arguments) with one-line errors."""


def every_option_parser() -> argparse.ArgumentParser:
    """A parser of every option Beam knows: every PipelineOptions subclass's arguments, ours included, as
    Beam gathers them when it lists the options (and discards what none of them parse)."""
    parser = _EveryOptionParser(prog="python -m pipeline run", add_help=False)
    for cls in option_classes():
        cls._add_argparse_args(parser)
    return parser


def known_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every option name the parser knows, without dashes (as config keys are written)."""
    return [s.lstrip("-") for a in actions(parser) for s in a.option_strings]


def unknown(word: str, names: list[str], what: str = "option") -> str:
    """The message for a word no option knows, naming the closest known option when one is close."""
    written = word.split("=", 1)[0]
    close = difflib.get_close_matches(written.lstrip("-"), names, n=1)
    dashes = "--" if written.startswith("-") else ""
    hint = f"did you mean {dashes}{close[0]}?" if close else "python -m pipeline run --help lists the options"
    return f"unknown {what} {written} ({hint})"


def check_flags(flags: list[str]) -> None:
    """Refuse what no option parses: Beam would log "Discarding unparseable args" and run without it, so a
    typo would change a scheduled build instead of stopping it. Bad values (`--shards abc`) stop it too."""
    parser = every_option_parser()
    _, rest = parser.parse_known_args(flags)
    if not rest:
        return
    if not rest[0].startswith("-"):
        raise LaunchError(f"unexpected argument {rest[0]!r}: options are written --name=value or --name value")
    raise LaunchError(unknown(rest[0], known_names(parser)))


def check_values(opts: ClipOptions) -> None:
    """Values that parse but that the run cannot use: each stops the launch (exit 2) before any work."""
    for name in REQUIRED:
        if not getattr(opts, name):
            raise LaunchError(f"--{name} is required")
    problems = [
        (opts.shards < 0, "--shards takes a number of shards (0: clip files)"),
        (opts.shard_mb < 0, "--shard_mb takes a size in MB (0: the layout's default)"),
        (
            sum(map(bool, (opts.skip_existing, opts.append, opts.overwrite))) > 1,
            "--skip_existing, --append and --overwrite are different ways over an existing dataset: give one",
        ),
        (
            opts.verify_existing and not (opts.skip_existing or opts.append),
            "--verify_existing checks the clips that --skip_existing or --append keep: give one of them",
        ),
        (opts.max_in_flight < 1, "--max_in_flight takes a number of streams from 1 up"),
        (opts.max_attempts < 1, "--max_attempts takes a number of attempts from 1 up"),
        (
            not 0 < opts.rpc_timeout_s <= MAX_RPC_TIMEOUT_S,  # written so that nan fails it too
            f"--rpc_timeout_s takes a number of seconds above 0, up to {MAX_RPC_TIMEOUT_S:.0f} (a day), "
            f"not {opts.rpc_timeout_s:g}",
        ),
        (
            not 0 <= opts.max_error_ratio <= 1,
            f"--max_error_ratio takes a fraction from 0 to 1, not {opts.max_error_ratio:g}",
        ),
        (
            bool(opts.rate_limit_service) and not re.fullmatch(r"[^\s/:]+:\d+", opts.rate_limit_service),
            "--rate_limit_service takes host:port (the rate limit service's gRPC address)",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise LaunchError(message)
    if parse_exports(opts.export) and not opts.with_transcripts:
        raise LaunchError(f"--export needs --with_transcripts: without it {NO_TEXT}")
    if LHOTSE in parse_exports(opts.export) and (opts.shards > 0 or opts.layout == WEBDATASET):
        raise LaunchError("--export lhotse needs clip files: Lhotse does not read tar shards (--shards)")
    if parse_exports(opts.export) and opts.layout in (HF_PARQUET, LHOTSE_SHAR):
        raise LaunchError(
            f"--export writes NeMo and Lhotse manifests of clip files or tar shards, not of --layout {opts.layout}"
        )


def read_config(path: str) -> dict:
    """The options of a YAML config file; a file that is missing, not YAML or not a mapping is a LaunchError."""
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    except OSError as e:
        raise LaunchError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise LaunchError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise LaunchError(f"--config {path}: expected a mapping of option names to values")
    names = known_names(every_option_parser())
    for key in config:
        if str(key) not in names:
            raise LaunchError(f"--config {path}: {unknown(str(key), names, 'key')}")
    return config


def expand_config(argv: list[str]) -> list[str]:
    """Put the options of a --config YAML file before the flags, so that the flags win."""
    parser = Parser(prog="python -m pipeline run", add_help=False)
    parser.add_argument("--config")
    known, _ = parser.parse_known_args(argv)
    if not known.config:
        return argv
    config = read_config(known.config)
    flags = []
    for name, value in config.items():
        if value is None or value is False:
            continue
        if value is True:
            flags.append(f"--{name}")
        elif isinstance(value, list):
            flags.extend(f"--{name}={v}" for v in value)
        else:
            flags.append(f"--{name}={value}")
    return flags + argv
