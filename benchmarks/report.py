"""The throughput benchmark's report: the table (one row per client, regime and pass, then the pipeline against
each baseline and the targets of benchmarks/targets.py), and the per-process breakdown. Text only: it measures
nothing."""

from __future__ import annotations

from benchmarks import targets
from benchmarks.harness import MIB
from benchmarks.results import ClientRun, Memory, PassResult, Regime
from benchmarks.targets import Target
from benchmarks.throughput import ESSENTIAL_THREADS, PEER_THREADS

HEADER = ["pass", "measurement", "value", "CPU ms/clip", "baseline", "ratio", "target", "ok"]
NAMES = {
    "limit": "limit",
    "essentials": f"essentials (fetch, hash, write; {ESSENTIAL_THREADS} threads)",
    "peer1": "peer 1 (SDK sequential)",
    "peer2": f"peer 2 ({PEER_THREADS}-thread pool)",
    "pipeline": "pipeline",
}

Row = list[str]


def _fmt_rate(run: ClientRun | None) -> str:
    return f"{run.clips_per_s:.1f} clips/s" if run else "-"


def _fmt_cpu(run: ClientRun | None) -> str:
    return f"{run.cpu_ms_per_clip:.2f}" if run and run.cpu_ms_per_clip is not None else "-"


def _ok(value: float | None, target: Target, *runs: ClientRun) -> str:
    """yes or NO against `target`; FAIL when a run behind the value did not write every clip whole."""
    if not all(run.checked for run in runs):
        return "FAIL"
    if value is None:
        return "-"
    return "yes" if target.met(value) else "NO"


def _client_rows(r: Regime, tag: str) -> list[Row]:
    """One row per client of a latency regime: its clips/s and its CPU ms per clip."""
    rows: list[Row] = []
    for key, name in NAMES.items():
        run = r.client(key)
        if not run:
            continue
        label = f"{name}, {tag}"
        if r.limit and key == "limit":
            levels = "/".join(str(c) for c in r.limit.levels)
            label += f" (best of c={levels}: c={r.limit.best_concurrency})"
        elif key == "pipeline":
            label += " (wall incl. start-up)"
        if run.rows != r.rows:
            label += f" [{run.rows} of {r.rows} rows; rates comparable]"
        problems = ([f"{run.errors} errors"] if run.errors else []) + ([] if run.checked else ["clips check failed"])
        rows.append([label, _fmt_rate(run), _fmt_cpu(run), "", "", "", "; ".join(problems)])
    return rows


def _ratio_rows(r: Regime, p: ClientRun, tag: str, with_targets: bool) -> list[Row]:
    """The pipeline against each baseline: clips/s, then CPU per clip against peer 2's (with the issue's
    targets if `with_targets`) and the essentials'."""
    rows: list[Row] = []
    for key in ("limit", "peer2", "peer1"):
        b = r.client(key)
        if not b:
            continue
        ratio = p.clips_per_s / b.clips_per_s if b.clips_per_s else None
        target = targets.CLIPS_PER_S.get(r.latency_ms, {}).get(key) if with_targets else None
        ok = _ok(ratio, target, p, b) if target else ""
        ratio_s = f"{ratio:.2f}" if ratio is not None else "-"
        rows.append([f"pipeline / {NAMES[key]}, {tag}", _fmt_rate(p), "", _fmt_rate(b), ratio_s, str(target or ""), ok])
    rows += _cpu_rows(p, r.peer2, "peer2", tag, with_targets)
    rows += _cpu_rows(p, r.essentials, "essentials", tag, False)
    return rows


def _cpu_rows(p: ClientRun, b: ClientRun | None, key: str, tag: str, with_target: bool) -> list[Row]:
    """The pipeline's CPU per clip against a baseline's, with start-up and after it."""
    if not b:
        return []
    mine, theirs = p.cpu_ms_per_clip, b.cpu_ms_per_clip
    ratio = mine / theirs if mine is not None and theirs else None
    label = f"CPU per clip, pipeline / {NAMES[key]}, {tag}"
    ratio_s = f"{ratio:.2f}" if ratio is not None else "-"
    target = targets.CPU_PER_CLIP_VS_PEER2
    shown, ok = (str(target), _ok(ratio, target, p, b)) if with_target else ("", "")
    rows = [[label, f"{_fmt_cpu(p)} ms", "", f"{_fmt_cpu(b)} ms", ratio_s, shown, ok]]
    mine, theirs = p.marginal_cpu_ms_per_clip, b.marginal_cpu_ms_per_clip
    if mine is not None and theirs:
        label = f"CPU per clip after start-up (less a one-row run), pipeline / {NAMES[key]}, {tag}"
        rows.append([label, f"{mine:.2f} ms", "", f"{theirs:.2f} ms", f"{mine / theirs:.2f}", "", ""])
    return rows


def _regime_rows(r: Regime, with_targets: bool) -> list[Row]:
    """The rows of one latency regime: each client, then the pipeline against each baseline."""
    tag = f"{r.latency_ms:g} ms latency"
    rows = _client_rows(r, tag)
    if r.pipeline:
        rows += _ratio_rows(r, r.pipeline, tag, with_targets)
    return rows


def _memory_rows(memory: Memory) -> list[Row]:
    base, long = memory.one_5s_clip, memory.one_long_stereo_clip
    delta = long.child.max_rss_mib - base.child.max_rss_mib
    hours = long.duration_ms / 3_600_000
    target = targets.LONG_CLIP_RSS_MIB
    ok = _ok(delta, target) if long.complete and base.complete else "FAIL"
    return [
        [
            f"peak RSS, pipeline, one {hours:g} h stereo clip ({long.file_bytes / MIB:.0f} MiB)",
            f"{long.child.max_rss_mib:.1f} MiB",
            "",
            f"{base.child.max_rss_mib:.1f} MiB (one 5 s clip)",
            f"{delta:+.1f} MiB",
            f"{target.op} +{target.bound} MiB",
            ok,
        ],
        [
            "pipeline wall time, one 5 s clip (~ start-up + teardown)",
            f"{base.child.wall_s:.2f} s",
            f"{base.child.cpu_s * 1000:.0f}",
            "",
            "",
            "",
            "",
        ],
    ]


def _scale_rows(scale: dict[int, ClientRun], memory: Memory | None) -> list[Row]:
    runs = list(scale.items())
    (n_small, small), (n_big, big) = runs[0], runs[-1]
    base = memory.one_5s_clip.child if memory else None
    ratio = big.child.wall_s / small.child.wall_s
    target = targets.SCALE_WALL_RATIO
    ok = _ok(ratio, target) if big.errors == 0 and small.errors == 0 else "FAIL"
    return [
        [
            f"peak RSS, pipeline, {n_big:,}-row run",
            f"{big.child.max_rss_mib:.1f} MiB",
            "",
            f"{base.max_rss_mib:.1f} MiB (one 5 s clip)" if base else "-",
            f"{big.child.max_rss_mib - base.max_rss_mib:+.1f} MiB" if base else "-",
            "",
            "",
        ],
        [
            f"wall time, pipeline, {n_big:,} rows",
            f"{big.child.wall_s:.1f} s ({_fmt_rate(big)})",
            _fmt_cpu(big),
            f"{small.child.wall_s:.1f} s ({n_small:,} rows)",
            f"{ratio:.2f}",
            str(target),
            ok,
        ],
    ]


def _pass_rows(result: PassResult, with_targets: bool) -> list[Row]:
    rows: list[Row] = []
    for r in result.regimes:
        rows += _regime_rows(r, with_targets)
    if result.memory:
        rows += _memory_rows(result.memory)
    if result.scale:
        rows += _scale_rows(result.scale, result.memory)
    return rows


def table_rows(results: list[PassResult]) -> list[Row]:
    """Each pass's rows, the pass first; the issue's throughput and CPU targets on the pinned pass (on the
    unpinned one when it ran alone)."""
    names = [r.name for r in results]
    checked = "pinned" if "pinned" in names else next(iter(names), None)
    rows: list[Row] = []
    for result in results:
        rows += [[result.name, *row] for row in _pass_rows(result, with_targets=result.name == checked)]
    return rows


def format_table(rows: list[Row]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def detail_lines(results: list[PassResult]) -> list[str]:
    """Where the time goes: each child's wall time (and the part after its imports, as it reports it), its CPU
    (user, system, per clip, share of one core), the server's CPU share and the child's peak RSS."""
    items = [(f"{result.name} {name}", child, run) for result in results for name, child, run in result.processes()]
    width = max([len("child process"), *(len(name) for name, _, _ in items)])
    head = f"{'child process':<{width}} {'wall s':>7} {'in-proc s':>9} {'clips/s':>8} {'user s':>7} {'sys s':>6}"
    lines = [f"{head} {'CPU ms/clip':>11} {'cpu%':>5} {'server cpu%':>11} {'peak RSS MiB':>12}"]
    for name, child, run in items:
        rate = f"{run.clips_per_s:8.1f}" if run else f"{'-':>8}"
        seconds = child.report.seconds if child.report else None
        inproc = f"{seconds:9.2f}" if seconds is not None else f"{'-':>9}"
        lines.append(
            f"{name:<{width}} {child.wall_s:7.2f} {inproc} {rate} {child.user_s:7.2f} {child.sys_s:6.2f} "
            f"{_fmt_cpu(run):>11} {child.cpu_pct:5.0f} {child.server_cpu_pct:11.0f} {child.max_rss_mib:12.1f}"
        )
    return lines
