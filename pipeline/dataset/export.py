"""Training-toolkit manifests of a dataset, from its clips table: NeMo JSONL and Lhotse recordings,
supervisions and cuts.

Written by a run with `--export lhotse,nemo`, or by `python -m pipeline export DATASET`
(pipeline/launch/export_command.py), which works on any dataset this pipeline built, copied or not: it reads only the
clips table (in one process). In a run, each worker writes its part of every manifest as it writes its bundle of
the clips table (`ManifestWriter`), and the last step joins the parts into each manifest in one publish
(`assemble_exports`: on a bucket, in the bucket; a `.gz` manifest is then one gzip member per part, which gzip
readers take as one stream).
Every path in them is the table's `path`, relative to the dataset's root, and they sit at the root, because
NeMo resolves a relative path against its manifest's folder (`manifest_filepath`, and `cuts_path` too):

- `nemo_manifest.jsonl`: one line per transcribed clip: `audio_filepath`, `duration` (s), `text`, and `lang`
  from the manifest's `language` column. A multi-channel clip is one line with all its channels (the service
  gives one transcript per clip): NeMo's classic dataset averages them with `channel_selector: average`; its
  tarred and Lhotse-based loaders cannot, so for them the dataset is built with `--channels mix`. For tar
  shards the lines are NeMo's tarred form: `audio_filepath` is the member, `shard_id` the shard's number.
- `lhotse_{recordings,supervisions,cuts}.jsonl.gz`: one recording per clip (every channel: a multi-channel
  clip is a multi-channel recording and a MultiCut), and for each transcribed clip a supervision over the
  whole clip (text, `language` from the manifest's column, `speaker` from its column or else the tokens' one
  speaker, every channel) and a cut. Load with `CutSet.from_file(...).with_recording_path_prefix(root)`.
  Lhotse reads files, not tar members, so a sharded dataset has no Lhotse manifests.

Both are supervised manifests: a clip whose object has no transcript (`transcript_text` null) is in neither
(a training target of '' would teach the model that the clip is silent); a clip of silence ('') is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.parquet as pq

from pipeline.dataset.card import note_exports
from pipeline.dataset.layout import (
    EXPORT_PARTS_DIR,
    LHOTSE,
    LHOTSE_FILES,
    NEMO,
    NEMO_MANIFEST,
    export_names,
    export_part_of,
    lhotse_name,
    name_of,
    path_of,
    shard_index,
    table_prefix,
)
from pipeline.dataset.record import read_record, write_record
from pipeline.dataset.storage import Store, StoredObject

log = logging.getLogger(__name__)


def clips_table_files(store: Store, output: str) -> list[str]:
    """The clips table's files (a finished run leaves only its own)."""
    return sorted(o.path for o in store.list(table_prefix(output, "clips")) if o.path.endswith(".parquet"))


def _rows(store: Store, files: list[str]) -> Iterator[dict[str, Any]]:
    """The clips table's rows, one row group at a time (never the whole table in memory)."""
    for path in files:
        table = pq.ParquetFile(io.BytesIO(store.read(path)))
        for i in range(table.num_row_groups):
            yield from table.read_row_group(i).to_pylist()


class ManifestWriter:
    """The manifests of `formats`, written line by line into scratch files as a clips table's rows come: the
    whole table (the export command), or one bundle of it (a run's workers write their part each); it owns the
    scratch files until `publish` has put them."""

    def __init__(self, store: Store, formats: tuple[str, ...], sharded: bool):
        self.store = store
        if LHOTSE in formats and sharded:  # refused at launch (options.check_values); the export command says it
            raise ValueError("Lhotse reads clip files, not tar shards: export it from a dataset built without --shards")
        self.lines: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {}  # manifest name -> a row's lines
        if NEMO in formats:
            self.lines[NEMO_MANIFEST] = lambda row: _present(nemo_line(row, sharded))
        if LHOTSE in formats:
            for part in LHOTSE_FILES:
                self.lines[lhotse_name(part)] = functools.partial(lhotse_lines, name=part)
        self.scratch = {name: store.scratch_file(_suffix(name)) for name in self.lines}
        self._files = contextlib.ExitStack()
        self._out: dict[str, Any] = {}
        for name, scratch in self.scratch.items():
            opener = gzip.open if name.endswith(".gz") else open
            self._out[name] = self._files.enter_context(opener(scratch.path, "wt", encoding="utf-8"))

    def add(self, row: dict[str, Any]) -> None:
        for name, lines_of in self.lines.items():
            for line in lines_of(row):
                self._out[name].write(json.dumps(line, ensure_ascii=False) + "\n")

    def publish(self, path_for: Callable[[str, str], str]) -> list[str]:
        """Put each manifest (a gzip member for `.gz`: members concatenate) at `path_for(its name, its complete
        scratch file)`; the paths written. The scratch files are removed, whatever happens."""
        try:
            self._files.close()
            written = []
            for name, scratch in self.scratch.items():
                written.append(path_for(name, scratch.path))
                self.store.put(written[-1], file=scratch, content_type=content_type(name))
            return written
        finally:
            for scratch in self.scratch.values():
                scratch.close()


def _suffix(name: str) -> str:
    return ".jsonl.gz" if name.endswith(".gz") else ".jsonl"


def content_type(name: str) -> str:
    return "application/gzip" if name.endswith(".gz") else "application/jsonl"


def export_dataset(store: Store, output: str, formats: tuple[str, ...], files: list[str], sharded: bool) -> list[str]:
    """Write the manifests named in `formats` under `output` from its clips table (`files`), in one pass over
    the table; the paths written."""
    writer = ManifestWriter(store, formats, sharded)
    for row in _rows(store, files):
        writer.add(row)
    return writer.publish(lambda name, _: path_of(output, name))


def assemble_exports(store: Store, output: str, formats: tuple[str, ...], parts: list[str]) -> None:
    """A run's last step: each manifest from the parts the workers wrote (`parts`: the committed bundles'),
    larger parts first (S3 copies those in the bucket); then every part under the parts' folder (an abandoned
    bundle's too) is removed. A manifest with no part (a run with no clip) is written empty."""
    committed = set(parts)
    found = list(store.list(path_of(output, EXPORT_PARTS_DIR) + "/"))
    by_name: dict[str, list[StoredObject]] = {name: [] for name in export_names(formats)}
    for part in sorted(found, key=lambda o: (-o.size, o.path)):
        if part.path in committed:
            by_name[export_part_of(name_of(output, part.path))].append(part)
    for name, named in by_name.items():
        if named:
            store.concat(path_of(output, name), named, content_type(name))
        else:
            store.put(
                path_of(output, name),
                gzip.compress(b"") if name.endswith(".gz") else b"",
                content_type=content_type(name),
            )
    left = [o.path for o in found if o.path not in committed]
    if left:
        store.delete(left)


def _present(line: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [] if line is None else [line]


def nemo_line(row: dict[str, Any], sharded: bool = False) -> dict[str, Any] | None:
    """A clip as a NeMo manifest line (see the module's docstring); None for a clip with no transcript."""
    if row.get("transcript_text") is None:
        return None
    line: dict[str, Any] = {"audio_filepath": row["member"] if sharded else row["path"]}
    line["duration"] = _seconds(row)
    line["text"] = row["transcript_text"]
    if isinstance(row.get("language"), str):
        line["lang"] = row["language"]
    if sharded:
        line["shard_id"] = shard_index(row["path"])
    return line


def _seconds(row: dict[str, Any]) -> float:
    """The clip's duration from its samples (what Lhotse checks a recording's duration against)."""
    return row["num_samples"] / row["sample_rate"]


def _channels(row: dict[str, Any]) -> list[int]:
    return list(range(row["num_channels"]))


def _speaker(row: dict[str, Any]) -> str | None:
    """The manifest's `speaker` column when it has one, else the one speaker all the clip's tokens name."""
    if isinstance(row.get("speaker"), str):
        return row["speaker"]
    speakers = {t["speaker"] for t in row.get("transcript_tokens") or () if t["text"].strip()}  # of the words
    return str(speakers.pop()) if len(speakers) == 1 and None not in speakers else None


def lhotse_recording(row: dict[str, Any]) -> dict[str, Any]:
    channels = _channels(row)
    return {
        "id": row["clip_id"],
        "sources": [{"type": "file", "channels": channels, "source": row["path"]}],
        "sampling_rate": row["sample_rate"],
        "num_samples": row["num_samples"],
        "duration": _seconds(row),
        "channel_ids": channels,
    }


def lhotse_supervision(row: dict[str, Any]) -> dict[str, Any] | None:
    """The clip's transcript over the whole clip and all its channels; None for a clip with none."""
    if row.get("transcript_text") is None:
        return None
    channels = _channels(row)
    supervision = {
        "id": row["clip_id"],
        "recording_id": row["clip_id"],
        "start": 0.0,
        "duration": _seconds(row),
        "channel": channels[0] if len(channels) == 1 else channels,
        "text": row["transcript_text"],
    }
    if isinstance(row.get("language"), str):
        supervision["language"] = row["language"]
    speaker = _speaker(row)
    if speaker is not None:
        supervision["speaker"] = speaker
    return supervision


def lhotse_cut(row: dict[str, Any], supervised: bool = True, with_recording: bool = True) -> dict[str, Any] | None:
    """A MonoCut for a mono clip, a MultiCut (every channel) for a multi-channel one; for a clip with no
    transcript None (`supervised`), or a cut with no supervision (a Shar shard built without transcripts).
    A Shar cut has no recording (`with_recording`): its recording is in the shard's tar."""
    channels = _channels(row)
    supervision = lhotse_supervision(row)
    if supervision is None and supervised:
        return None
    cut = {
        "id": row["clip_id"],
        "start": 0.0,
        "duration": _seconds(row),
        "channel": channels[0] if len(channels) == 1 else channels,
        "supervisions": [supervision] if supervision else [],
        "type": "MonoCut" if len(channels) == 1 else "MultiCut",
    }
    if with_recording:
        cut["recording"] = lhotse_recording(row)
    return cut


def lhotse_lines(row: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """A row's lines in the Lhotse manifest `name` (recordings, supervisions or cuts)."""
    if name == "recordings":
        return [lhotse_recording(row)]
    if name == "supervisions":
        return _present(lhotse_supervision(row))
    return _present(lhotse_cut(row))


def note_in_dataset(store: Store, output: str, formats: tuple[str, ...]) -> None:
    """The record lists the new manifests, so that reruns keep them current, and the card names them."""
    record = read_record(store, output)
    if record is None:  # a dataset whose last run did not finish: its next run writes the card and the record
        log.warning("%s has no run record: the card and the record do not list the manifests", output)
        return
    record = dataclasses.replace(record, exports=sorted({*record.exports, *export_names(formats)}))
    note_exports(store, output, record)
    write_record(store, output, record)
