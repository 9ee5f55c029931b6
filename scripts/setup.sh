#!/usr/bin/env bash
# Create .venv with everything fedshop needs. torch is pinned to 2.13.0 and installed first: on this machine that is
# a CPU wheel already on disk; an unpinned torch could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
print(f"fedshop environment ready: torch {torch.__version__}")
PY
