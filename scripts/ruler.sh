#!/usr/bin/env bash
# RULER's synthetic tasks for every method on the same prompts (issue 24), sized for a 2-core CPU shared
# with others: one torch thread, one prefill per haystack and method, every question asked from a copy of
# the KV cache. Resumable: each command skips the questions already in results.jsonl, so this script can
# be stopped and rerun at any time. Blocks in priority order; `bash scripts/ruler.sh a` runs block a only.
#   a  SmolLM2-135M (L = 8192) at 4k and 16k      b  the same at 24k
#   c  Gemma 3 270M (L = 32768) at 16k and 48k    d  passkey baselines at 16k/24k/32k, 10 trials a cell
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
TASKS=niah_single_2,niah_multikey_1,niah_multivalue,niah_multiquery,niah_single_1,niah_single_3,niah_multikey_2,niah_multikey_3,vt,fwe,cwe
SMOL="selfextend eval ruler --out results/eval/ruler/smollm2-135m --tasks $TASKS --questions 10 --haystacks 1"
GEMMA="selfextend eval ruler --model gemma3-270m --out results/eval/ruler/gemma3-270m --tasks $TASKS --questions 5 --haystacks 1"
METHODS=plain,dynamic,yarn,rerope,string,dca,selfextend
run() { echo "+ $*"; .venv/bin/$*; }
block() {
    case "$1" in
        a) run $SMOL --methods $METHODS --lengths 4096,16384 ;;
        b) run $SMOL --methods $METHODS --lengths 24576 ;;
        # dynamic NTK last: it cannot be prefilled in chunks, and one pass of transformers' attention over
        # Gemma 3 at 48k builds dense sliding-window masks (~14 GB, over 30 min a prefill on one core)
        c) run $GEMMA --methods $METHODS --lengths 16384
           run $GEMMA --methods ${METHODS/dynamic,/} --lengths 49152
           run $GEMMA --methods dynamic --lengths 49152 ;;
        d) run selfextend eval passkey --out results/eval/smollm2-135m --methods plain,linear,dynamic,yarn,rerope,leaky,string,dca \
               --lengths 16384,24576,32768 --depths 0.1,0.3,0.5,0.7,0.9 --keys 2 ;;
    esac
}
for b in ${1:-a b c d}; do block "$b"; done
