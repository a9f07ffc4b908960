#!/usr/bin/env bash
# Tests of SelfExtend inside vLLM (tests_vllm/): set up .venv (the transformers reference) and
# .venv-vllm, then run them there.
#   bash scripts/test-vllm.sh           CPU: every test but the CUDA ones (the command CI runs)
#   bash scripts/test-vllm.sh --gpu     on a CUDA machine: the CUDA tests, then the GPU throughput benchmark
# Extra arguments go to pytest (e.g. -x, -k prefix).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--gpu" ]; then
    shift
    bash scripts/setup-vllm.sh --gpu
    .venv-vllm-gpu/bin/python -m pytest tests_vllm -m cuda "$@"
    exec .venv-vllm-gpu/bin/python -m selfextend.vllm.bench throughput --dtype bfloat16 --out results/vllm/gpu
fi
bash scripts/setup-vllm.sh
exec .venv-vllm/bin/python -m pytest tests_vllm -m "not cuda and not slow" "$@"
