"""SelfExtend in a vLLM engine against this project's transformers path (see conftest for tolerances):
prefill in one step or in chunks, decode, batches of different lengths, prefix caching off and on,
preemption with recompute, and decoding requests that share cached blocks."""

from __future__ import annotations

from conftest import ONE_BATCH, PROMPTS, assert_matches


def test_the_selfextend_backend_runs_in_the_worker(one_pass):
    assert one_pass["backends"] == [("SelfExtendCPUImpl", True)]


def test_one_long_prompt_matches_transformers(one_pass, reference):
    assert_matches(one_pass["alone"]["long"], reference["long"], "long prompt, one-step prefill")


def test_batch_of_different_lengths_matches_transformers(one_pass, reference):
    for name in ONE_BATCH:
        assert_matches(one_pass["batch"][name], reference[name], f"{name} ({len(PROMPTS[name])} tokens) in a batch")


def test_chunked_prefill_matches_transformers(chunked, reference):
    assert_matches(chunked["alone"]["long"], reference["long"], "long prompt, prefill in chunks of 64")


def test_prefix_cache_hit_matches_transformers(chunked, reference):
    output = chunked["shared"]["shared"]
    assert output.num_cached_tokens == 256  # the 8 blocks it shares with "long" came from the cache
    assert_matches(output, reference["shared"], "prompt whose first 256 tokens are cached")


def test_preemption_and_recompute_match_transformers(chunked, reference):
    assert chunked["preemptions"] > 0  # the 26-block cache forced the scheduler to preempt
    for name, output in chunked["pressure"].items():
        assert_matches(output, reference[name], f"{name} in a batch that was preempted")


def test_decoding_requests_sharing_cached_blocks_match_transformers(chunked, reference):
    """Both requests read the two cached blocks of "x64" while decoding 5 positions apart: their
    neighbor keys in the second block need different moves, so they leave the kernel fast path."""
    outputs = chunked["clash"]
    for name in ("x64b", "x64c"):
        assert outputs[name].num_cached_tokens == 64
    for name in ("x64b", "x64c"):
        assert_matches(outputs[name], reference[name], f"{name} decoding beside a request sharing its blocks")


def test_request_reading_blocks_another_request_moves_matches_transformers(chunked, reference):
    """x64b moves its neighbor keys in the second cached block of "x64" for each decode step, while
    x64d, 100 tokens further, reads that block as grouped keys in the same kernel pass."""
    outputs = chunked["mover_and_reader"]
    for name in ("x64b", "x64d"):
        assert outputs[name].num_cached_tokens == 64
        assert_matches(outputs[name], reference[name], f"{name} beside a request sharing its blocks")
