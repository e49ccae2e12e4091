#!/usr/bin/env bash
# Create the loader-test virtualenv from scratch: bash tests/loaders/install.sh [VENV]
# VENV defaults to .venv-loaders (relative to the repo root). An existing VENV is removed first.
# Pins and the reasons for them: tests/loaders/requirements.txt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REQS="$ROOT/tests/loaders/requirements.txt"
VENV="${1:-.venv-loaders}"
PYTHON="${PYTHON:-python3}"
PIP_VERSION=26.3
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
cd "$ROOT"

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { echo "install.sh: needs Python 3.11 (set PYTHON=...)" >&2; exit 1; }

# torchcodec loads the system's FFmpeg libraries (major versions 4 to 7).
if ! ldconfig -p | grep -q 'libavcodec\.so\.'; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg
    else
        echo "install.sh: FFmpeg libraries missing; run as root or: sudo apt-get install -y ffmpeg" >&2
        exit 1
    fi
fi

# Where torch==2.13.0+cpu comes from: the wheel on this machine's disk, or PyTorch's CPU index if reachable.
SOURCES=()
if [ -d /opt/wheels ]; then SOURCES+=(--find-links /opt/wheels); fi
if curl -fsS --max-time 5 -o /dev/null "$TORCH_CPU_INDEX/torch/" 2>/dev/null; then
    SOURCES+=(--extra-index-url "$TORCH_CPU_INDEX")
fi

# The project lock, less the three pins that NeMo's lightning/hydra need older (see requirements.txt).
LOCK="$(mktemp)"
trap 'rm -f "$LOCK"' EXIT
grep -vE '^(antlr4-python3-runtime|fsspec|packaging)==' constraints.txt > "$LOCK"

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "pip==$PIP_VERSION"
"$VENV/bin/pip" install --disable-pip-version-check --progress-bar off "${SOURCES[@]}" \
    -r "$REQS" -c "$LOCK" -e .
"$VENV/bin/pip" check

"$VENV/bin/python" - <<'EOF'
import torch, torchcodec, lhotse, datasets, webdataset, pipeline
from torchcodec.decoders import AudioDecoder  # noqa: F401
from nemo.collections.asr.data.audio_to_text import AudioToCharDataset, TarredAudioToCharDataset  # noqa: F401
from nemo.collections.common.data.lhotse import get_lhotse_dataloader_from_config  # noqa: F401
assert not torch.version.cuda, torch.version.cuda
print("loader venv ok: torch", torch.__version__, "torchcodec", torchcodec.__version__, "lhotse", lhotse.__version__)
EOF
