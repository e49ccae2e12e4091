"""The pipeline's options: a PipelineOptions subclass (so Beam and Dataflow know them) and YAML configs.

The API key is never an option: it comes from SONIOX_API_KEY or the file named by --api_key_file, so
it cannot show up in Beam's option dumps or the Dataflow job page.
"""

from __future__ import annotations

import argparse

import yaml
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.audio import FORMATS
from pipeline.clips import CLIP_FORMATS


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
            "default: the SONIOX_API_KEY environment variable",
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
            help="make no call for a clip already complete at its path for the same request",
        )
        g.add_argument(
            "--max_error_ratio",
            type=float,
            default=0.05,
            help="exit non-zero when errors / rows exceeds this (the tables are written first)",
        )
        g.add_argument(
            "--shards",
            type=int,
            default=0,
            help="write the clips as N WebDataset-style tar shards ({clip_id}.wav + {clip_id}.json) under "
            "shards/ instead of one file each under clips/; 0: clip files",
        )
        g.add_argument(
            "--with_transcripts",
            **_FLAG,
            help="add each clip's transcript text and tokens (from GetObject, one call per object) to the clips table",
        )
        g.add_argument(
            "--detach",
            **_FLAG,
            help="submit the job and return without waiting (a Dataflow job writes its own card and _RUN.json)",
        )
        g.add_argument("--config", default=None, help="YAML file of options (see configs/); flags override it")


def option_names() -> list[str]:
    """The names of this pipeline's own options."""
    parser = argparse.ArgumentParser()
    ClipOptions._add_argparse_args(parser)
    return [a.dest for a in parser._actions if a.dest != "help"]


def expand_config(argv: list[str]) -> list[str]:
    """Put the options of a --config YAML file before the flags, so that the flags win."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    known, _ = parser.parse_known_args(argv)
    if not known.config:
        return argv
    with open(known.config, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"config {known.config}: expected a mapping of option names to values")
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
