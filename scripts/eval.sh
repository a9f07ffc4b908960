#!/usr/bin/env bash
# The committed evaluation of the bundled SmolLM2-135M (trained length 8192), sized for a 2-core CPU
# (a 16k-token forward pass takes ~100 s there). Every command appends to the same results folder
# and skips trials already done, so this script can be stopped and rerun at any time.
# The full paper grid is the default of `selfextend eval` (4k..32k, 10 depths, 2 keys per cell).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SE=".venv/bin/selfextend eval --out results/eval/smollm2-135m"
ALL=plain,linear,dynamic,yarn,selfextend,rerope,leaky
$SE passkey --methods $ALL,selfextend:4:1024 --lengths 4096,12288 --depths 0.2,0.5,0.8 --keys 1
$SE passkey --methods $ALL,selfextend:4:1024 --lengths 16384 --depths 0.5 --keys 1
$SE passkey --methods $ALL,selfextend:4:1024 --lengths 24576,32768 --depths 0.5 --keys 1
$SE perplexity --methods $ALL --lengths 2048,4096,8192,12288,16384
$SE perplexity --methods $ALL --lengths 24576,32768
$SE needle --methods $ALL --lengths 4096,12288 --depths 0.2,0.8
$SE needle --methods $ALL --lengths 16384 --depths 0.2,0.8
$SE ablation --ablation-length 12288 --ablation-groups 2,4,8 --ablation-windows 512,2048
$SE keylength --methods $ALL --keylength-length 12288 --key-digits 100
$SE keylength --methods $ALL --keylength-length 12288 --key-digits 20,50
$SE keylength --methods $ALL --keylength-length 12288 --key-digits 5
