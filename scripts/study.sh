#!/usr/bin/env bash
# The study of the rule that chooses G and w, run with `selfextend eval` into the committed results;
# the report gains a "Study: choosing G and w" section (table, plot study.png, and the notes written
# in results/eval/<model>/study.md). Resumable: every command appends finished trials to
# results.jsonl and skips those already there, so stop it at any time and run it again.
#
#   bash scripts/study.sh              the bundled SmolLM2-135M (L = 8192), every rule below
#   bash scripts/study.sh gemma3 RULE  Gemma 3 270M (L = 32768) past its trained length: the paper's
#                                      rule and RULE, another rule to compare (e.g. selfextend@f=0.5)
#   bash scripts/study.sh cut          what the committed study ran (a cut of the grid; see study_cut)
#
# Rules (methods of `selfextend eval`; each chooses G once from the input length, as `selfextend.enable` does,
# so past L a rule computes exactly the fixed G it picks and shares that G's trials):
#   selfextend@cover    the paper's rule, the library's default before the study: w = L // 4, G the
#                       smallest that covers the position
#   selfextend:4:1024   G = 4, w = 1024, the hand-tuned setting README and demo.sh used to pass
#   selfextend@f=F      w = L // 8, G the smallest with (F * L - w) * G + w >= p + 1: every grouped
#                       distance below F * L (f=1 is the paper's rule with the smaller window L // 8;
#                       a bare `selfextend` is recorded under the default rule's name)
#
# Grid (bundled model): 12288, 16384, 24576, 32768 tokens; passkey 5 depths x 2 keys = 10 trials per
# cell, needle 5 depths, perplexity 1 essay sequence per length. Lengths run in order, so a stopped run
# leaves complete short lengths.
#
# CPU estimate, from the per-trial "seconds" of results/eval/smollm2-135m/results.jsonl (2 cores,
# float32, idle machine; a SelfExtend trial takes ~45 s at 12288 tokens, ~65 s at 16384, ~125 s at
# 24576, ~220 s at 32768, i.e. ~455 s for one trial at each of the four lengths):
#   one rule      (10 passkey + 5 needle + 1 perplexity) x 455 s            = 2.0 h
#   five rules    @cover, 4:1024, @f=1, @f=0.75, @f=0.5                     = 10 h
#                 minus what results.jsonl already holds (see the report's Compute line)
#   gemma3 part   ~130 s a SelfExtend trial at 49152 tokens (its sliding-window layers run blocked)
# With other jobs on the 2 cores a trial takes up to 2-3x as long.
# Memory on Gemma 3: the plain model (and SelfExtend on inputs that fit, which keeps the model's own
# attention) builds dense L x L masks in its sliding-window layers: ~4 GB at 16k, growing as L^2, so
# ~16 GB expected at 32768 and too much at 49152, where only SelfExtend runs (its sliding-window
# layers are blocked, linear in memory).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

study_smollm2() {
    local se=".venv/bin/selfextend eval --out results/eval/smollm2-135m"
    local rules=selfextend@cover,selfextend:4:1024,selfextend@f=1,selfextend@f=0.75,selfextend@f=0.5
    local depths=0.1,0.3,0.5,0.7,0.9
    for n in 12288 16384 24576 32768; do
        $se passkey --methods $rules --lengths $n --depths $depths --keys 2
        $se needle --methods $rules --lengths $n --depths $depths
        $se perplexity --methods $rules --lengths $n
    done
}

study_gemma3() {
    local rule=$1
    local se=".venv/bin/selfextend eval --model gemma3-270m --out results/eval/gemma3-270m"
    $se passkey --methods selfextend@cover,"$rule" --lengths 49152 --depths 0.5,0.2,0.8 --keys 1
    $se perplexity --methods plain,selfextend@cover,"$rule" --lengths 32768
    $se perplexity --methods selfextend@cover,"$rule" --lengths 49152
}

study_cut() {
    # The committed study's cut of the grid: each rule as the fixed G and w it picks (cover: 2:2048 at
    # 12288, 3:2048 at 16384, 4:2048 at 24576, 5:2048 at 32768; f=1: 2:1024, 3:1024, 4:1024, 5:1024;
    # f=0.75: 3:1024, 3:1024, 5:1024, 7:1024; f=0.5: 4:1024, 5:1024, 8:1024, 11:1024; Gemma 3 at 49152:
    # 2:8192, 3:4096, 4:4096), then the rules themselves, which copy those trials (same_as) and the plain
    # model's within L. At 32768 the ten passkey trials are two commands of 5 depths x 1 key (seeds 0
    # and 1), so a stopped run leaves every depth covered. Lines of the default's cells come first
    # where time ran short (f=1 at 32768 and the needle for the other rules were not run).
    local se=".venv/bin/selfextend eval --out results/eval/smollm2-135m"
    local g=".venv/bin/selfextend eval --model gemma3-270m --out results/eval/gemma3-270m"
    local d10="--depths 0.1,0.3,0.5,0.7,0.9 --keys 2" d3="--depths 0.2,0.5,0.8 --keys 1"
    local d5="--depths 0.1,0.3,0.5,0.7,0.9"
    $se passkey --methods selfextend:2:1024,selfextend:3:1024,selfextend:4:1024 --lengths 12288 $d10
    $se passkey --methods selfextend:2:2048 --lengths 12288 $d10
    $se passkey --methods selfextend:4:1024,selfextend:5:1024,selfextend:3:2048 --lengths 16384 $d10
    $se passkey --methods selfextend:3:1024 --lengths 16384 $d10
    $se passkey --methods selfextend:8:1024,selfextend:4:2048,selfextend:5:1024 --lengths 24576 $d3
    $se passkey --methods selfextend:4:1024,selfextend:4:2048 --lengths 24576 $d10
    $se passkey --methods selfextend:4:1024 --lengths 24576 $d3
    $se passkey --methods selfextend:5:2048 --lengths 32768 $d5 --keys 1
    $se passkey --methods selfextend:5:2048 --lengths 32768 $d5 --keys 1 --seed 1
    $se needle --methods selfextend:2:2048 --lengths 12288 $d5
    $se needle --methods selfextend:3:2048 --lengths 16384 $d5
    $se needle --methods selfextend:4:2048 --lengths 24576 $d5  # not yet run
    $se perplexity --methods selfextend:2:1024,selfextend:2:2048 --lengths 12288
    $se perplexity --methods selfextend:5:1024,selfextend:3:2048,selfextend:3:1024 --lengths 16384
    $se perplexity --methods selfextend:8:1024,selfextend:4:2048,selfextend:5:1024 --lengths 24576
    $se perplexity --methods selfextend:11:1024,selfextend:5:2048,selfextend:7:1024,selfextend:5:1024 --lengths 32768
    $g passkey --methods selfextend:4:4096,selfextend:3:4096,selfextend:2:8192 --lengths 49152 $d3
    $g perplexity --methods selfextend:2:8192 --lengths 49152
    $g perplexity --methods selfextend:3:8192 --lengths 65536
    $g passkey --methods selfextend:3:8192 --lengths 65536 $d3
    bash "$0" copies
}

study_copies() {
    local se=".venv/bin/selfextend eval --out results/eval/smollm2-135m"
    local g=".venv/bin/selfextend eval --model gemma3-270m --out results/eval/gemma3-270m"
    local rules=selfextend@cover,selfextend@f=1,selfextend@f=0.75,selfextend@f=0.5
    local d10="--depths 0.1,0.3,0.5,0.7,0.9 --keys 2" d5="--depths 0.1,0.3,0.5,0.7,0.9"
    $se passkey --methods $rules --lengths 4096 --depths 0.2,0.5,0.8 --keys 1
    # one length per command: the keys are drawn per command, so these match the fixed settings' trials
    $se passkey --methods $rules --lengths 12288 $d10
    $se passkey --methods $rules --lengths 16384 $d10
    $se passkey --methods $rules --lengths 24576 --depths 0.2,0.5,0.8 --keys 1
    $se passkey --methods selfextend@cover,selfextend@f=1 --lengths 24576 $d10
    # not the rule at 32768: its answer tokens pass the limit of G = 5, (8192 - 2048) * 5 + 2048 = 32768,
    # and go on with G = 6 (a different computation from the fixed 5:2048 trials; about 35 min to run)
    $se needle --methods selfextend@cover --lengths 12288 $d5
    $se needle --methods selfextend@cover --lengths 16384 $d5
    $se needle --methods selfextend@cover --lengths 24576 $d5  # not yet run
    $se perplexity --methods selfextend@cover,selfextend@f=1 --lengths 2048,4096,8192,12288,16384,24576,32768
    $se perplexity --methods selfextend@f=0.75,selfextend@f=0.5 --lengths 2048,4096,8192,16384,24576,32768
    $se needle --methods $rules --lengths 4096 --depths 0.2,0.8
    $g passkey --methods selfextend@cover,selfextend@f=0.75,selfextend@f=0.5 --lengths 49152 --depths 0.2,0.5,0.8 --keys 1
    $g passkey --methods selfextend@cover --lengths 65536 --depths 0.2,0.5,0.8 --keys 1
    $g perplexity --methods selfextend@cover --lengths 49152,65536
}

case "${1:-smollm2}" in
    smollm2) study_smollm2 ;;
    cut) study_cut ;;
    copies) study_copies ;;
    gemma3)
        [ $# -eq 2 ] || { echo "usage: bash scripts/study.sh gemma3 RULE  (e.g. selfextend@f=0.5)" >&2; exit 2; }
        study_gemma3 "$2" ;;
    *) echo "usage: bash scripts/study.sh [smollm2 | gemma3 RULE | cut | copies]" >&2; exit 2 ;;
esac
