#!/usr/bin/env bash
# The main job: passkey retrieval at ~16k tokens (2x the trained 8k) on the bundled SmolLM2-135M,
# plain model vs SelfExtend side by side. Extra arguments go to `selfextend passkey`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/selfextend passkey "$@"
