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

from pipeline.storage import Store, is_local
from pipeline.table_files import table_prefix

CARD_NAME = "README.md"
HISTOGRAM_NAME = "duration_histogram.png"
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
    summary: dict,
    stats: ClipStats,
    errors: dict[str, int],
    clip_format: str = "wav",
    sharded: bool = False,
) -> str:
    """Write the card and its histogram under `output`; return the card's path.

    `summary` is the run record's numbers (for rows in, and written vs already there); `errors` the rows
    per error code, most common first. The histogram PNG is always written, an empty-state image ("no
    clips") when there are none, so a previous run's histogram never outlives its data; the card embeds
    it only when there are clips.
    """
    root = output.rstrip("/")
    store.put(f"{root}/{HISTOGRAM_NAME}", histogram_png(stats), content_type="image/png")
    clips_glob, errors_glob = table_prefix(output, "clips") + "*.parquet", table_prefix(output, "errors") + "*.parquet"
    text = card_text(output, summary, stats, errors, clips_glob, errors_glob, Layout(clip_format, sharded))
    path = f"{root}/{CARD_NAME}"
    store.put(path, text.encode(), content_type="text/markdown")
    return path


# The card's text.


@dataclass(frozen=True)
class Layout:
    """How the clips are stored: the format, and files or tar shards."""

    clip_format: str = "wav"
    sharded: bool = False


def card_text(
    output: str,
    summary: dict,
    stats: ClipStats,
    errors: dict[str, int],
    clips_table: str,
    errors_table: str,
    layout: Layout = Layout(),
) -> str:
    """The whole card, as Markdown."""
    sections = [
        _header(output, layout),
        _contents(summary, stats, errors),
        _durations(stats),
        _errors(errors),
        _layout(output, clips_table, errors_table, layout),
        _loading(output, clips_table, layout),
    ]
    return "\n\n".join(sections) + "\n"


def _header(output: str, layout: Layout) -> str:
    name = output.rstrip("/").rsplit("/", 1)[-1] or output
    stored = " in WebDataset tar shards" if layout.sharded else ""
    return (
        f"# Audio clips: {name}\n\n"
        f"{layout.clip_format.upper()} clips{stored} cut from Soniox Storage API audio, with Parquet tables "
        "describing every clip and every manifest row that gave none."
    )


def _contents(summary: dict, stats: ClipStats, errors: dict[str, int]) -> str:
    written, skipped = summary.get("clips_written", 0), summary.get("clips_skipped", 0)
    lines = [
        "## Contents",
        "",
        f"- Manifest rows in: {summary.get('rows', 0):,}",
        f"- Clips: {stats.clips:,} ({written:,} written by the last run, {skipped:,} already there)",
        f"- Errors: {sum(errors.values()):,}",
        f"- Distinct objects: {stats.objects:,}",
        f"- Audio: {stats.hours:,.3f} h ({stats.seconds:,.3f} s)",
        f"- Size of the clips: {_size(stats.num_bytes)} ({stats.num_bytes:,} bytes)",
        f"- Channels: {_channels(stats.channels)}",
    ]
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
    root = output.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else path


def _layout(output: str, clips_table: str, errors_table: str, layout: Layout) -> str:
    fmt = layout.clip_format
    clips = (
        ("shards/shard-NNNNN.tar", f"tar shards: {{key}}.{fmt} and {{key}}.json per clip (key: clip_id, . as ~)")
        if layout.sharded
        else (f"clips/{{clip_id}}.{fmt}", "one clip per file, 16 kHz 16-bit PCM")
    )
    entries = [
        (CARD_NAME, "this card"),
        (HISTOGRAM_NAME, "the clip duration histogram"),
        ("_RUN.json", "the run record: counts, timings, options (written last)"),
        clips,
        (_relative(output, clips_table), "one row per clip: path, times, channels, samples, sha256, manifest columns"),
        (_relative(output, errors_table), "one row per manifest row that gave no clip: error_code, error_message"),
    ]
    width = max(len(name) for name, _ in entries) + 2
    lines = [f"{output.rstrip('/')}/", *(f"  {name:<{width}}{what}" for name, what in entries)]
    return "## Files\n\n```text\n" + "\n".join(lines) + "\n```"


def _loading(output: str, clips_table: str, layout: Layout) -> str:
    """A snippet that loads every clip from every table file; object-store paths go through Beam's
    FileSystems, which soundfile cannot open itself, and a shard's member is read out of its tar."""
    local = is_local(output)
    head = ["import glob"] if local else ["import io"]
    head += ["import tarfile"] if layout.sharded else []
    head += ["", *([] if local else ["import pyarrow as pa"]), "import pyarrow.parquet as pq", "import soundfile"]
    if not local:
        head.append("from apache_beam.io.filesystems import FileSystems")
    lines = [*head, ""]
    if local:
        lines.append(f"clips = pq.read_table(sorted(glob.glob({clips_table!r})))")
    else:
        lines += [
            f"files = sorted(m.path for m in FileSystems.match([{clips_table!r}])[0].metadata_list)",
            "clips = pa.concat_tables(pq.read_table(FileSystems.open(path)) for path in files)",
        ]
    lines.append("for row in clips.to_pylist():")
    source = 'row["path"]'
    if not local:
        lines += ['    with FileSystems.open(row["path"]) as f:', "        data = io.BytesIO(f.read())"]
        source = "data"
    if layout.sharded:
        if local:
            lines.insert(0, "import io")
        lines += [
            f"    with tarfile.open({'fileobj=data' if not local else source}) as tar:",
            '        member = io.BytesIO(tar.extractfile(row["member"]).read())',
        ]
        source = "member"
    lines += [
        f'    audio, sample_rate = soundfile.read({source}, dtype="int16")',
        '    assert len(audio) == row["num_samples"]  # frames; stereo is (frames, 2)',
        '    print(row["clip_id"], len(audio), sample_rate)',
    ]
    code = "\n".join(lines).lstrip("\n") + "\n"
    return "## Loading\n\n```python\n" + code + "```"


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
