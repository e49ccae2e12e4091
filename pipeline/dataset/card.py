"""The dataset card: `{output}/README.md` and `{output}/duration_histogram.png`, the job's last step but one.

The numbers are counted in the job from the rows the tables get (not from the run's metrics), so they
describe the whole dataset, clips that `--skip_existing` kept included. Each file is published in one
write, so a reader never sees half a card, on a local disk or an object store alike.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.dataset.clips import KEEP, MIX
from pipeline.dataset.layout import (
    CARD_NAME,
    CLIPS_DIR,
    EXPORTS,
    FILES,
    HF_DATA_DIR,
    HF_PARQUET,
    HISTOGRAM_NAME,
    LHOTSE,
    LHOTSE_SHAR,
    METADATA_DIR,
    NEMO,
    NEMO_MANIFEST,
    RECORD_NAME,
    SHAR_DIR,
    SHARDS_DIR,
    WEBDATASET,
    export_names,
    lhotse_name,
    name_of,
    path_of,
    resolve_layout,
    root_of,
    table_prefix,
)
from pipeline.dataset.record import RunRecord
from pipeline.dataset.storage import Store, is_local
from pipeline.dataset.transcripts import ALL, MOSTLY_INSIDE

BINS = 20
SIZE = (640, 360)  # the PNG, in pixels
MARGINS = (64, 40, 20, 48)  # left, top, right, bottom: room for the title and tick labels
BACKGROUND, INK, BAR = (255, 255, 255), (40, 40, 40), (70, 130, 180)


@dataclass(frozen=True)
class ClipStats:
    """What the card says about the clips, counted in the job (no table is read back)."""

    clips: int
    objects: int
    num_bytes: int
    channels: dict[int, int]  # channel count -> clips
    durations_ms: dict[int, int]  # clip duration -> clips: as many entries as distinct durations, not clips

    @property
    def seconds(self) -> float:
        return sum(ms * n for ms, n in self.durations_ms.items()) / 1000

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    def duration_values(self) -> tuple[np.ndarray, np.ndarray]:
        """(durations in seconds, sorted; clips of each)."""
        pairs = sorted(self.durations_ms.items())
        return np.array([ms / 1000 for ms, _ in pairs], np.float64), np.array([n for _, n in pairs], np.int64)


def write_card(
    store: Store,
    output: str,
    record: RunRecord,
    stats: ClipStats,
    errors: dict[str, int],
    layout: Layout | None = None,
) -> str:
    """Write the card and its histogram under `output`; return the card's path.

    `record` is the run's record (rows in, written vs already there); `errors` the rows
    per error code, most common first. The histogram PNG is always written, an empty-state image ("no
    clips") when there are none, so a previous run's histogram never outlives its data; the card embeds
    it only when there are clips.
    """
    store.put(path_of(output, HISTOGRAM_NAME), histogram_png(stats), content_type="image/png")
    clips_glob, errors_glob = table_prefix(output, "clips") + "*.parquet", table_prefix(output, "errors") + "*.parquet"
    text = card_text(output, record, stats, errors, clips_glob, errors_glob, layout or Layout())
    path = path_of(output, CARD_NAME)
    store.put(path, text.encode(), content_type="text/markdown")
    return path


def note_exports(store: Store, output: str, record: RunRecord) -> str:
    """After `python -m pipeline export`: the card's file list and loading notes are written again for the
    exports the record now lists (the rest of the card, counted by the run, is kept as it was)."""
    path = path_of(output, CARD_NAME)
    text = store.read(path).decode()
    layout = layout_of(record)
    clips_glob, errors_glob = table_prefix(output, "clips") + "*.parquet", table_prefix(output, "errors") + "*.parquet"
    for section in (_layout(output, clips_glob, errors_glob, layout), _loading(output, layout)):
        text = _replace_section(text, section)
    store.put(path, text.encode(), content_type="text/markdown")
    return path


def layout_of(record: RunRecord) -> Layout:
    """What a dataset holds, from the options and exports its record lists."""
    options = record.options
    exports = tuple(f for f in EXPORTS if set(export_names((f,))) & set(record.exports))
    return Layout(
        options.get("clip_format") or "wav",
        bool(options.get("with_transcripts")),
        options.get("edge_words") or MOSTLY_INSIDE,
        exports,
        options.get("channels") or KEEP,
        resolve_layout(options.get("layout") or FILES, int(options.get("shards") or 0)),
    )


def _replace_section(text: str, section: str) -> str:
    """`text` with the section of the same heading (its first line) replaced by `section`."""
    heading = section.split("\n", 1)[0]
    start = text.find(f"\n{heading}\n")
    if start < 0:
        return text
    end = text.find("\n## ", start + 1)
    end = len(text) - 1 if end < 0 else end  # the card ends with one newline
    return text[: start + 1] + section + ("\n" if end < len(text) - 1 else "") + text[end:]


# The card's text.


@dataclass(frozen=True)
class Layout:
    """What the dataset holds: the clips' format, transcripts, exported manifests, channels, layout."""

    clip_format: str = "wav"
    with_transcripts: bool = False
    edge_words: str = MOSTLY_INSIDE
    exports: tuple[str, ...] = ()
    channels: str = KEEP
    layout: str = FILES

    @property
    def sharded(self) -> bool:
        return self.layout != FILES


# What a clip file is, for the card (every clip is 16 kHz, 16-bit, with the channels the service served).
FORMATS = {"wav": "WAV, 16 kHz, 16-bit PCM", "flac": "FLAC, 16 kHz, 16-bit, lossless"}

# Hugging Face's dataset card metadata: `datasets.load_dataset(root)` reads the clips table (every column),
# never the errors table beside it, nor the clips as an audio folder without their columns.
FRONT_MATTER = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: {data}
---"""


def _front_matter(layout: Layout) -> str:
    """`load_dataset(root)` reads the clips table, or (hf-parquet) the shards, whose rows hold the audio."""
    data = f"{HF_DATA_DIR}/train-*.parquet" if layout.layout == HF_PARQUET else f"{METADATA_DIR}/clips-*.parquet"
    return FRONT_MATTER.format(data=data)


def card_text(
    output: str,
    record: RunRecord,
    stats: ClipStats,
    errors: dict[str, int],
    clips_table: str,
    errors_table: str,
    layout: Layout = Layout(),
) -> str:
    """The whole card, as Markdown."""
    sections = [
        _front_matter(layout),
        _header(output, layout),
        _contents(record, stats, errors),
        _durations(stats),
        _errors(errors),
        _layout(output, clips_table, errors_table, layout),
        _columns(layout),
        _loading(output, layout),
    ]
    return "\n\n".join(sections) + "\n"


def _header(output: str, layout: Layout) -> str:
    name = root_of(output).rsplit("/", 1)[-1] or output
    stored = {
        WEBDATASET: " in WebDataset tar shards",
        HF_PARQUET: " in Hugging Face Parquet shards",
        LHOTSE_SHAR: " in Lhotse Shar shards",
    }.get(layout.layout, "")
    mixed = " Every clip is mono: a multi-channel object's channels are averaged into one (`--channels mix`)."
    return (
        f"# Audio clips: {name}\n\n"
        f"Audio clips ({FORMATS[layout.clip_format]}){stored} cut from Soniox Storage API audio, with Parquet "
        "tables describing every clip and every manifest row that gave none. Every path in the dataset is "
        "relative to its root (this card's folder), so a copy or an upload loads unchanged."
        + (mixed if layout.channels == MIX else "")
    )


def _contents(record: RunRecord, stats: ClipStats, errors: dict[str, int]) -> str:
    last_run = f"{record.clips_written:,} written by the last run, {record.clips_skipped:,} already there"
    if record.clips_kept:
        last_run += f", {record.clips_kept:,} kept from earlier runs (--append)"
    lines = [
        "## Contents",
        "",
        f"- Manifest rows in the last run: {record.rows:,}",
        f"- Clips: {stats.clips:,} ({last_run})",
        f"- Errors: {sum(errors.values()):,}",
        f"- Distinct objects: {stats.objects:,}",
        f"- Audio: {stats.hours:,.3f} h ({stats.seconds:,.3f} s)",
        f"- Size of the clips: {_size(stats.num_bytes)} ({stats.num_bytes:,} bytes)",
        f"- Channels: {_channels(stats.channels)}",
    ]
    if record.clips_untranscribed:
        lines.append(
            f"- Without a transcript: {record.clips_untranscribed:,} clips (their object has none; the NeMo and "
            "Lhotse manifests leave them out)"
        )
    if record.clips_removed:
        lines.append(f"- Removed by the last run: {record.clips_removed:,} clip files or shards that no row lists")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _channels(channels: dict[int, int]) -> str:
    if not channels:
        return "none"
    return ", ".join(f"{c} channel{'s' * (c != 1)}: {n:,} clip{'s' * (n != 1)}" for c, n in channels.items())


def _durations(stats: ClipStats) -> str:
    if not stats.clips:
        return "## Clip durations\n\nThere are no clips."
    seconds, counts = stats.duration_values()
    middle = np.searchsorted(np.cumsum(counts), [(stats.clips - 1) // 2 + 1, stats.clips // 2 + 1])
    median = seconds[middle].mean()  # of the one or two middle clips, as np.median of every clip
    values = [seconds[0], median, stats.seconds / stats.clips, seconds[-1]]
    return "\n".join(
        [
            "## Clip durations",
            "",
            "| min | median | mean | max |",
            "|---:|---:|---:|---:|",
            "| " + " | ".join(f"{v:,.3f} s" for v in values) + " |",
            "",
            f"![clip durations]({HISTOGRAM_NAME})",
        ]
    )


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "## Errors by code\n\nnone"
    rows = [f"| {code} | {n:,} |" for code, n in errors.items()]
    return "\n".join(["## Errors by code", "", "| code | rows |", "|---|---:|", *rows])


def _relative(output: str, path: str) -> str:
    """`path` under `output` as a relative name, else as given."""
    try:
        return name_of(output, path)
    except ValueError:
        return path


def _layout(output: str, clips_table: str, errors_table: str, layout: Layout) -> str:
    fmt = layout.clip_format
    clips = {
        FILES: (f"{CLIPS_DIR}/{{clip_id}}.{fmt}", f"one clip per file: {FORMATS[fmt]}"),
        WEBDATASET: (
            f"{SHARDS_DIR}/audio_NNNNN.tar",
            f"tar shards: {{key}}.{fmt} and {{key}}.json per clip (key: clip_id, . as ~)",
        ),
        HF_PARQUET: (
            f"{HF_DATA_DIR}/train-NNNNN.parquet",
            "Parquet shards: a row per clip, every clips-table column, `duration` (s), `audio` {bytes, path}",
        ),
        LHOTSE_SHAR: (
            f"{SHAR_DIR}/{{recording,cuts}}.NNNNNN.*",
            f"Lhotse Shar: {{clip_id}}.{fmt} and its recording's JSON per clip in the tar, the cuts beside it",
        ),
    }[layout.layout]
    entries = [
        (CARD_NAME, "this card"),
        (HISTOGRAM_NAME, "the clip duration histogram"),
        (RECORD_NAME, "the run record: counts, timings, options (written last)"),
        clips,
        (_relative(output, clips_table), "one row per clip: path, times, channels, samples, sha256, manifest columns"),
        (_relative(output, errors_table), "one row per manifest row that gave no clip: error_code, error_message"),
    ]
    if NEMO in layout.exports:
        entries.append((NEMO_MANIFEST, "NeMo manifest: audio_filepath (relative to this folder), duration, text"))
    if LHOTSE in layout.exports:
        entries.append(
            ("lhotse_*.jsonl.gz", "Lhotse recordings, supervisions and cuts (sources relative to this folder)")
        )
    width = max(len(name) for name, _ in entries) + 2
    lines = ["./", *(f"  {name:<{width}}{what}" for name, what in entries)]  # relative: the card moves with it
    return "## Files\n\n```text\n" + "\n".join(lines) + "\n```"


def _columns(layout: Layout) -> str:
    """The clips table's columns that need saying: paths, and the transcript columns and their rule."""
    where = {
        FILES: "the clip file",
        WEBDATASET: "the tar shard holding the clip (its name in the tar: `member`)",
        HF_PARQUET: "the Parquet shard holding the clip (its row's `member`, and its audio's `path`)",
        LHOTSE_SHAR: "the Shar recordings' tar holding the clip (its name in the tar: `member`)",
    }[layout.layout]
    lines = [
        "## Clips table",
        "",
        f'- `path`: {where}, relative to the dataset\'s root: a full path or URI is `f"{{root}}/{{path}}"`.',
        "- `clip_start_ms`, `clip_duration_ms`: the range served (a token range is widened by the service); "
        "`num_channels`, `sample_rate`, `num_samples` (per channel), `num_bytes`, `sha256` of the file.",
        "- Then every column of the manifest, unchanged.",
    ]
    if layout.with_transcripts:
        rule = (
            "every word that overlaps the clip (a word cut by an edge may start before 0 or end past the clip)"
            if layout.edge_words == ALL
            else "the words with more than half of their duration inside the clip (a word cut by an edge is left out)"
        )
        lines += [
            "- `transcript_text`: the clip's words joined; null when the object has no transcript, `''` when the "
            f"clip holds no word. A time range keeps {rule}; a token range exactly its tokens.",
            "- `transcript_tokens`: those tokens (`text`, `start_ms` from the clip's start, `duration_ms`, "
            "`speaker` and `confidence` when the service gave them), never starting or ending with a space.",
        ]
    return "\n".join(lines)


def _loading(output: str, layout: Layout) -> str:
    """Snippets that load every clip from every table file, with the dataset's root as the one path to set;
    object-store paths go through Beam's FileSystems, which soundfile cannot open itself, and a shard's member
    is read out of its tar."""
    local = is_local(output)
    root = "." if local else root_of(output)
    where = "this dataset's folder (run from it), or its path" if local else "the dataset's URI, or a local copy"
    head = ["import glob"] if local else ["import io"]
    head += ["import tarfile"] if layout.layout in (WEBDATASET, LHOTSE_SHAR) else []
    head += ["", *([] if local else ["import pyarrow as pa"]), "import pyarrow.parquet as pq", "import soundfile"]
    if not local:
        head.append("from apache_beam.io.filesystems import FileSystems")
    lines = [*head, *_s3_options(output), "", f"root = {root!r}  # {where}"]
    if local:
        lines.append('clips = pq.read_table(sorted(glob.glob(f"{root}/metadata/clips-*.parquet")))')
    else:
        lines += [
            'files = sorted(m.path for m in FileSystems.match([f"{root}/metadata/clips-*.parquet"])[0].metadata_list)',
            "clips = pa.concat_tables(pq.read_table(FileSystems.open(path)) for path in files)",
        ]
    lines.append("for row in clips.to_pylist():")
    source = "f\"{root}/{row['path']}\""
    if not local:
        lines += ["    with FileSystems.open(f\"{root}/{row['path']}\") as f:", "        data = io.BytesIO(f.read())"]
        source = "data"
    if layout.sharded and local:
        lines.insert(0, "import io")
    if layout.layout in (WEBDATASET, LHOTSE_SHAR):
        lines += [
            f"    with tarfile.open({'fileobj=data' if not local else source}) as tar:",
            '        member = io.BytesIO(tar.extractfile(row["member"]).read())',
        ]
        source = "member"
    elif layout.layout == HF_PARQUET:
        lines += [
            f'    shard = pq.read_table({source}, columns=["audio"], filters=[("member", "=", row["member"])])',
            '    member = io.BytesIO(shard.column("audio")[0].as_py()["bytes"])',
        ]
        source = "member"
    lines += [
        f'    audio, sample_rate = soundfile.read({source}, dtype="int16")',
        '    assert len(audio) == row["num_samples"]  # frames; stereo is (frames, 2)',
        '    print(row["clip_id"], len(audio), sample_rate)',
    ]
    code = "\n".join(lines).lstrip("\n") + "\n"
    parts = ["## Loading", "", "```python\n" + code + "```", "", _hugging_face(output, layout), *_manifests(layout)]
    return "\n".join(parts)


def _s3_options(output: str) -> list[str]:
    """Beam's S3 filesystem refuses to work without pipeline options (GCS's works without). Empty ones leave
    every setting to boto3 (Beam passes None for each), which reads the AWS_* variables and ~/.aws, the
    endpoint included (AWS_ENDPOINT_URL). `PipelineOptions([])`, not `PipelineOptions()`, which would parse
    sys.argv (a notebook kernel's flags, say)."""
    if not output.startswith("s3://"):
        return []
    return [
        "from apache_beam.options.pipeline_options import PipelineOptions",
        "",
        "# Credentials and region from the AWS_* variables or ~/.aws; an S3-compatible store's endpoint from",
        '# AWS_ENDPOINT_URL, or set it here: PipelineOptions(["--s3_endpoint_url=https://..."]).',
        "FileSystems.set_options(PipelineOptions([]))",
    ]


def _hugging_face(output: str, layout: Layout) -> str:
    """`load_dataset` gives the clips table; the audio is the file at `path` (no audio is decoded here:
    decoding needs torchcodec), or a tar shard's sample."""
    intro, head, root, load = _hf_load(output)
    lines = [f"With Hugging Face `datasets` ({intro}):", "", "```python", *head, "import datasets", "", root]
    if layout.layout == HF_PARQUET:
        return "\n".join([*lines, *_hf_shards(output), "```"])
    lines.append(f"clips = {load}  # every column of the clips table")
    if layout.layout == WEBDATASET:  # HF's webdataset builder encodes Audio with torchcodec even for bytes: no torch
        fmt = layout.clip_format
        lines += [
            "# The samples (audio and JSON row), with torchcodec installed: Hugging Face's webdataset builder,",
            f'# datasets.load_dataset("webdataset", data_files=f"{{root}}/shards/*.tar")  # the {fmt} column is Audio',
            'print(len(clips), *(clips[0]["path"], clips[0]["member"]) if len(clips) else ())',
        ]
    elif layout.layout == LHOTSE_SHAR:
        lines.append('print(len(clips), *(clips[0]["path"], clips[0]["member"]) if len(clips) else ())')
    else:
        lines += [
            'clips = clips.add_column("audio", [f"{root}/{path}" for path in clips["path"]])',
            'clips = clips.cast_column("audio", datasets.Audio(decode=False))  # decode=True needs torchcodec',
            'print(len(clips), clips[0]["audio"]["path"] if len(clips) else None)',
        ]
    return "\n".join([*lines, "```"])


def _hf_shards(output: str) -> list[str]:
    """The hf-parquet layout: the shards are the dataset, each row with its audio."""
    load = (
        'datasets.load_dataset(root, split="train")'
        if is_local(output)
        else f'datasets.load_dataset("parquet", data_files=f"{{root}}/{HF_DATA_DIR}/train-*.parquet", split="train")'
    )
    return [
        f"clips = {load}  # every column, and `audio` decoded at 16 kHz (with torchcodec)",
        'raw = clips.cast_column("audio", datasets.Audio(decode=False))  # or its bytes, without torchcodec',
        'print(len(raw), raw[0]["audio"]["path"] if len(raw) else None)',
    ]


def _hf_load(output: str) -> tuple[str, list[str], str, str]:
    """(what the snippet reads, its imports before `datasets`, its root line, its load call). A local
    dataset is `load_dataset(root)` (this card's `configs`); `load_dataset` takes no bucket URI as a folder,
    so a bucket's snippet names the clips table's files, which fsspec (s3fs, gcsfs) reads."""
    if is_local(output):
        root = 'root = os.path.abspath(".")  # this dataset\'s folder (load_dataset(".") cannot name it), or its path'
        intro = "`load_dataset(root)` reads the clips table named in this card's `configs`"
        return intro, ["import os", ""], root, 'datasets.load_dataset(root, split="train")'
    fs = "s3fs" if output.startswith("s3://") else "gcsfs"
    intro = f"`load_dataset` reads the clips table's files on the bucket with fsspec: `pip install {fs}`"
    root = f"root = {root_of(output)!r}  # the dataset's URI, or a local copy's path"
    files = 'data_files=f"{root}/metadata/clips-*.parquet"'
    return intro, [], root, f'datasets.load_dataset("parquet", {files}, split="train")'


def _manifests(layout: Layout) -> list[str]:
    """The settings each trainer's loader needs, and no more (a clip without a transcript is in no manifest)."""
    cuts = lhotse_name("cuts")
    mono = layout.channels == MIX
    lines = []
    if NEMO in layout.exports:
        shards = "{root}/shards/audio_{00000..NNNNN}.tar"  # NNNNN: the last shard's number
        lines += ["", f"NeMo: `manifest_filepath: {{root}}/{NEMO_MANIFEST}` (paths relative to its folder)"]
        if layout.sharded:
            lines[-1] += (
                f"; tarred: `is_tarred: true`, `tarred_audio_filepaths: {shards}`; with `use_lhotse: true` also "
                "`skip_missing_manifest_entries: true` (each shard's `.json` members are not audio)"
            )
        lines[-1] += (
            ". Every clip is mono."
            if mono
            else ". Clips with several channels: `channel_selector: average` in the "
            "classic dataset; NeMo's tarred and Lhotse-based loaders have no average: build with `--channels mix`."
        )
    if layout.layout == LHOTSE_SHAR:
        lines += [
            "",
            f'Lhotse: `CutSet.from_shar(in_dir=f"{{root}}/{SHAR_DIR}")`; NeMo\'s Lhotse-based loader: '
            f"`use_lhotse: true`, `shar_path: {{root}}/{SHAR_DIR}`."
            + (
                " Every cut is supervised: a row whose object has no transcript is a `NO_TRANSCRIPT` error."
                if layout.with_transcripts
                else ""
            )
            + ("" if mono else " Several channels: build with `--channels mix` for a mono model."),
        ]
    if LHOTSE in layout.exports:
        lines += ["", f'Lhotse: `CutSet.from_file(f"{{root}}/{cuts}").with_recording_path_prefix(root)`']
        lines[-1] += f"; NeMo's Lhotse-based loader: `use_lhotse: true`, `cuts_path: {{root}}/{cuts}`."
    return lines


# The histogram.


@functools.cache
def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, align: str = "left") -> None:
    """Text whose left edge, centre or right edge (align) is at x, its top at y (no anchors: the
    bitmap fallback font has none)."""
    font = _font()
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    shift = {"left": 0, "center": (right - left) / 2, "right": right - left}[align]
    draw.text((xy[0] - shift, xy[1]), text, fill=INK, font=font)


def _seconds(v: float) -> str:
    return f"{round(float(v), 3):g} s"


def histogram_png(stats: ClipStats) -> bytes:
    """A BINS-bar histogram of the durations as PNG bytes, or an empty-state image for no clips.

    np.histogram widens an all-equal set of durations to a one-second range, so one clip or clips of
    one length give one bar, not a division by zero.
    """
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    n = stats.clips
    _text(draw, (SIZE[0] / 2, 12), f"Clip durations ({n:,} clip{'s' * (n != 1)})", "center")
    if n:
        seconds, counts = stats.duration_values()
        _bars(draw, *np.histogram(seconds, bins=BINS, weights=counts))
    else:
        _text(draw, (SIZE[0] / 2, SIZE[1] / 2 - 8), "no clips", "center")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bars(draw: ImageDraw.ImageDraw, counts: np.ndarray, edges: np.ndarray) -> None:
    """Bars, axes and tick labels: seconds at the range's ends and middle, clips at 0 and the peak."""
    left, top, right, bottom = MARGINS[0], MARGINS[1], SIZE[0] - MARGINS[2], SIZE[1] - MARGINS[3]
    width, height, peak = (right - left) / len(counts), bottom - top, int(counts.max())
    for i, count in enumerate(counts):
        if count:
            x0 = left + i * width
            draw.rectangle([x0 + 1, bottom - count / peak * height, x0 + width - 1, bottom], fill=BAR)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=INK, width=1)
    ticks = (
        (left, edges[0], "left"),
        ((left + right) / 2, (edges[0] + edges[-1]) / 2, "center"),
        (right, edges[-1], "right"),
    )
    for x, value, align in ticks:
        draw.line([(x, bottom), (x, bottom + 4)], fill=INK)
        _text(draw, (x, bottom + 6), _seconds(value), align)
    _text(draw, ((left + right) / 2, bottom + 24), "clip duration", "center")
    for y, label in ((bottom, "0"), (top, f"{peak:,}")):
        draw.line([(left - 4, y), (left, y)], fill=INK)
        _text(draw, (left - 6, y - 7), label, "right")
    _text(draw, (left - 6, top - 22), "clips", "right")
