#!/usr/bin/env bash
# The study of the rule that chooses G and w, run with `selfextend eval` into the committed results;
# the report gains a "Study: choosing G and w" section (table, plot study.png, and the notes written
# in results/eval/<model>/study.md). Resumable: every command appends finished trials to
# results.jsonl and skips those already there, so stop it at any time and run it again.
#
#   bash scripts/study.sh              the bundled SmolLM2-135M (L = 8192), every rule below
#   bash scripts/study.sh gemma3 RULE  Gemma 3 270M (L = 32768) past its trained length: today's
#                                      default and RULE, the rule the first part chose (e.g. selfextend@f=0.5)
#
# Rules (methods of `selfextend eval`; positions.choose_settings):
#   selfextend          today's default: w = L // 4, G per query position, the smallest that covers it
#   selfextend:4:1024   G = 4, w = 1024, the hand-tuned setting README and demo.sh use
#   selfextend@f=F      w = L // 8, G the smallest with (F * L - w) * G + w >= n: every grouped
#                       distance below F * L (F = 1 is "w = L / 8, the smallest G that covers the input")
#   selfextend@cover    today's rule with one G for the whole input, as every @ rule is applied here
#                       (the library chooses G per query position): tells whether that difference
#                       matters; perplexity with the others, passkey last (the first thing to cut)
#
# Grid (bundled model): 12288, 16384, 24576, 32768 tokens; passkey 5 depths x 2 keys = 10 trials per
# cell, needle 5 depths, perplexity 1 essay sequence per length. Lengths run in order, so a stopped run
# leaves complete short lengths.
#
# CPU estimate, from the per-trial "seconds" of results/eval/smollm2-135m/results.jsonl (2 cores,
# float32; one trial takes ~49 s at 12288 tokens, ~81 s at 16384, ~161 s at 24576, ~267 s at 32768,
# i.e. ~558 s for one trial at each of the four lengths):
#   one rule      (10 passkey + 5 needle + 1 perplexity) x 558 s            = 2.5 h
#   five rules    selfextend, selfextend:4:1024, @f=1, @f=0.75, @f=0.5      = 12.4 h
#                 minus cells where two rules resolve to the same G and w (run once, copied:
#                 12288 f=0.5 = 4:1024, 16384 f=0.75 = f=1, 24576 f=1 = 4:1024; ~1.3 h) and the
#                 perplexity of `selfextend` already in results.jsonl (~0.2 h)   -> ~10.9 h
#   @cover        perplexity at the four lengths                             = 0.2 h
#                 passkey at the four lengths, last                          = 1.6 h
#   total, bundled model                                                     ~ 12.7 CPU hours
#   gemma3 part   passkey at 49152, 3 depths x 2 methods (~1000 s a trial, from ~740 s measured at
#                 40960), perplexity at 32768 (3 methods, ~450 s) and 49152 (2 methods)
#                                                                            ~ 2.6 CPU hours
# These are times on an otherwise idle machine; with other jobs on the 2 cores a trial took 2-3x as
# long (a 12288-token perplexity trial: 143 s instead of ~50 s).
# Memory on Gemma 3: the plain model (and SelfExtend on inputs that fit, which keeps the model's own
# attention) builds dense L x L masks in its sliding-window layers: ~4 GB at 16k, growing as L^2, so
# ~16 GB expected at 32768 (run the gemma3 part alone) and too much at 49152. The plain model's
# perplexity at 49152 and everything at 65536 are therefore left out; add them once those layers run
# in linear memory on the plain path too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

study_smollm2() {
    local se=".venv/bin/selfextend eval --out results/eval/smollm2-135m"
    local rules=selfextend,selfextend:4:1024,selfextend@f=1,selfextend@f=0.75,selfextend@f=0.5
    local depths=0.1,0.3,0.5,0.7,0.9
    for n in 12288 16384 24576 32768; do
        $se passkey --methods $rules --lengths $n --depths $depths --keys 2
        $se needle --methods $rules --lengths $n --depths $depths
        $se perplexity --methods $rules,selfextend@cover --lengths $n
    done
    for n in 12288 16384 24576 32768; do  # one length per command: the same keys as the rules above
        $se passkey --methods selfextend@cover --lengths $n --depths $depths --keys 2
    done
}

study_gemma3() {
    local rule=$1
    local se=".venv/bin/selfextend eval --model gemma3-270m --out results/eval/gemma3-270m"
    $se perplexity --methods plain,selfextend,"$rule" --lengths 32768
    $se passkey --methods selfextend,"$rule" --lengths 49152 --depths 0.2,0.5,0.8 --keys 1
    $se perplexity --methods selfextend,"$rule" --lengths 49152
}

case "${1:-smollm2}" in
    smollm2) study_smollm2 ;;
    gemma3)
        [ $# -eq 2 ] || { echo "usage: bash scripts/study.sh gemma3 RULE  (e.g. selfextend@f=0.5)" >&2; exit 2; }
        study_gemma3 "$2" ;;
    *) echo "usage: bash scripts/study.sh [smollm2 | gemma3 RULE]" >&2; exit 2 ;;
esac
