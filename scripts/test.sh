#!/usr/bin/env bash
# The default test suite (fast, tiny random models). Real-model checks: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
