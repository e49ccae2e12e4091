"""What a newcomer does first: clone the repository and run `make demo`, with no venv present. It installs from
the lock (constraints.txt) and must finish with the demo's summary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make")
def test_make_demo_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    assert not (clone / ".venv").exists()
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("SONIOX_")
    }
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(REPO)))
    python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    done = subprocess.run(
        ["make", "demo", f"PYTHON={python}"], cwd=clone, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "rows in                  7" in done.stdout and "clips                    6" in done.stdout
    assert done.stdout.count("local GetAudio server on") == 1
    installed = subprocess.run(
        [clone / ".venv" / "bin" / "python", "-c", "import apache_beam; print(apache_beam.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    locked = next(
        line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("apache-beam==")
    )
    assert locked == f"apache-beam=={installed}"
