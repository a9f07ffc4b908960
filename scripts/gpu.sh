#!/usr/bin/env bash
# On a machine with a CUDA GPU: the library's invariant tests on the GPU and its benchmark, then the
# vLLM plugin's CUDA tests (its FlashAttention backend against the transformers path) and the vLLM
# benchmark against plain vLLM. Not yet run anywhere (no GPU was available where this was written):
# the first run is the check.
#   bash scripts/gpu.sh [extra pytest arguments]
# Results go to results/bench-cuda/ (float16 and bfloat16 tables, ratios against plain SDPA) and
# results/vllm/gpu/ (ratios against plain vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh   # on a GPU machine, pip's torch==2.13.0 from PyPI is the CUDA build
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
.venv/bin/python -m pytest -m cuda "$@"
for dtype in bfloat16 float16; do
    .venv/bin/selfextend bench --device cuda --dtype "$dtype" --lengths 4096,8192,16384,32768 \
        --methods plain,selfextend,selfextend:4:1024 --decode-tokens 16 --out "results/bench-cuda/$dtype"
done
bash scripts/test-vllm.sh --gpu "$@"
