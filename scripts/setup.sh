#!/usr/bin/env bash
# Create .venv (once) and install selfextend with everything the demo, tests and server need.
# torch 2.13.0 is pinned because its CPU build is what the target machines carry locally.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,serve]"
