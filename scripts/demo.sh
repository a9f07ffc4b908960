#!/usr/bin/env bash
# The main job: passkey retrieval at 16000 tokens (about 2x the trained 8192) on the bundled
# SmolLM2-135M, plain model vs SelfExtend side by side (about 4 minutes on 2 CPU cores).
# SelfExtend runs with the library's defaults (the paper's rule with G chosen once for the input, kept
# by the study in results/eval/smollm2-135m: w = 2048, G = 3 for 16000 tokens). Extra arguments go to
# `selfextend passkey`, e.g. --depth 0.2, --length 12000, or -G 4 -w 1024.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/selfextend passkey "$@"
