"""Run a command and write its wall time, CPU and peak RSS as JSON: `python benchmarks/measure.py OUT -- CMD...`.

A trampoline, so that the measured process is spawned by this small process rather than by the
benchmark: on Linux a child's ru_maxrss starts at its parent's peak RSS (the memory map it leaves at
exec), so a large parent would hide the child's own peak.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    out, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        sys.exit("usage: measure.py OUT.json -- CMD ...")
    started = time.monotonic()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - started
    result = {
        "rc": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "max_rss_kib": usage.ru_maxrss,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)
    sys.exit(0 if result["rc"] == 0 else 1)


if __name__ == "__main__":
    main()
