"""SelfExtend in a vLLM engine against this project's transformers path (see conftest for tolerances),
each request with its own G: prefill in one step or in chunks, decode, batches that mix G = 1 and
G > 1, prefix caching (never shared across G), preemption with recompute, decoding requests that
share cached blocks, and a cache that nothing but the new keys ever changes."""

from __future__ import annotations

import pytest

from conftest import ONE_BATCH, PROMPTS, TIGHT, assert_matches, greedy, max_difference, prompt_logprobs, request_group


def test_the_selfextend_backend_runs_in_the_worker(one_pass):
    assert one_pass["backends"] == [("SelfExtendCPUImpl", True)]


def test_grouped_rows_use_the_cpu_kernels_where_they_build(one_pass):
    from selfextend.vllm import cpu_kernel

    expected = None if cpu_kernel.available() else cpu_kernel.reason()
    assert one_pass["kernel_refusals"] == [[expected]]
    if expected is None:  # prompts past L prefill through the prefill kernel, then decode through the other
        assert all(calls["prefill"] > 0 and calls["decode"] > 0 for calls in one_pass["kernel_calls"])


def test_chunks_after_cached_tokens_run_the_prefill_kernel(chunked):
    from selfextend.vllm import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip(f"the CPU kernels are unavailable here: {cpu_kernel.reason()}")
    assert all(calls["prefill"] > 0 for calls in chunked["kernel_calls"])


def test_each_request_gets_its_own_group_size():
    assert [request_group(len(PROMPTS[name])) for name in ONE_BATCH] == [4, 4, 4, 1, 1]


def test_every_prompt_alone_matches_transformers(one_pass, reference):
    for name in ONE_BATCH:
        assert_matches(one_pass["alone"][name], reference[name], f"{name} ({len(PROMPTS[name])} tokens) alone")


def test_a_batch_mixing_g1_and_g4_requests_matches_transformers(one_pass, reference):
    for name in ONE_BATCH:
        assert_matches(one_pass["batch"][name], reference[name], f"{name} ({len(PROMPTS[name])} tokens) in a batch")


def test_the_torch_decode_path_matches_transformers(torch_decode, reference):
    """Without the C++ kernels (no AVX-512, or SELFEXTEND_VLLM_KERNEL=torch) rows with G > 1 gather."""
    for name in ONE_BATCH:
        assert_matches(torch_decode["batch"][name], reference[name], f"{name}, decoding in torch")
    assert all(w["changed"] == 0 and w["calls"] > 0 for w in torch_decode["cache_watch"])
    assert torch_decode["kernel_calls"] == [{"decode": 0, "prefill": 0}]


def test_a_request_in_a_mixed_batch_equals_the_request_alone(one_pass):
    for name in ONE_BATCH:
        batch, alone = one_pass["batch"][name], one_pass["alone"][name]
        assert max_difference(prompt_logprobs(batch), prompt_logprobs(alone)) < 1e-5, name
        assert greedy(batch)[0] == greedy(alone)[0], name
        assert max_difference(greedy(batch)[1], greedy(alone)[1]) < 1e-5, name


def test_a_group_size_asked_for_in_extra_args_is_used(one_pass, tiny_model):
    from conftest import run_reference

    reference = run_reference(tiny_model, {n: PROMPTS[n] for n in ("long3", "mid")}, groups={"long3": 2, "mid": 2})
    for name in ("long3", "mid"):
        assert_matches(one_pass["asked_g2"][name], reference[name], f"{name} with extra_args G = 2")


def test_a_group_size_that_cannot_hold_the_request_is_refused_before_it_runs(one_pass):
    refused = one_pass["refused"]
    assert "may reach 312 tokens (prompt 300 + max_tokens 12) but SelfExtend with G=2 holds 224" in refused[2]
    assert "from 1 to 64" in refused[65] and "from 1 to 64" in refused["4"]


def test_chunked_prefill_matches_transformers(chunked, reference):
    assert_matches(chunked["alone"]["long"], reference["long"], "long prompt, prefill in chunks of 64")


def test_prefix_cache_hit_matches_transformers(chunked, reference):
    output = chunked["shared"]["shared"]
    assert output.num_cached_tokens == 256  # the 8 blocks it shares with "long" came from the cache
    assert_matches(output, reference["shared"], "prompt whose first 256 tokens are cached")


def test_cached_blocks_are_never_shared_between_group_sizes(chunked, tiny_model):
    """"prefix_fits" starts with the first 3 blocks of "long" (G = 4). As G = 1 (it fits L) and as G = 3
    it must not read them (keys at other positions); as G = 4 it does."""
    from conftest import run_reference

    assert chunked["prefix_fits"]["prefix_fits"].num_cached_tokens == 0
    assert chunked["prefix_g3"]["prefix_fits"].num_cached_tokens == 0
    assert chunked["prefix_g4"]["prefix_fits"].num_cached_tokens == 96
    prompt = {"prefix_fits": PROMPTS["prefix_fits"]}
    for key, group in (("prefix_fits", 1), ("prefix_g3", 3), ("prefix_g4", 4)):
        reference = run_reference(tiny_model, prompt, groups={"prefix_fits": group})["prefix_fits"]
        assert_matches(chunked[key]["prefix_fits"], reference, f"prefix of 'long' with G = {group}")


def test_preemption_and_recompute_with_mixed_group_sizes_match_transformers(chunked, reference):
    assert chunked["preemptions"] > 0  # the 26-block cache forced the scheduler to preempt
    for name in TIGHT:
        assert_matches(chunked["pressure"][name], reference[name], f"{name} in a batch that was preempted")


def test_decoding_requests_that_share_cached_blocks_match_transformers(chunked, reference):
    """Both read the two cached blocks of "x64" while they decode 5 positions apart: each sees the
    shared keys as neighbours or grouped keys of its own, from the same unchanged blocks."""
    outputs = chunked["x64"]
    for name in ("x64b", "x64c"):
        assert outputs[name].num_cached_tokens == 64
        assert_matches(outputs[name], reference[name], f"{name} decoding beside a request sharing its blocks")


def test_nothing_in_the_cache_changes_but_the_new_keys(one_pass, chunked):
    """Checked around every attention call of both engines: no (block, head, slot) other than the call's
    new tokens differs after the call (and the new ones were written)."""
    for watch in one_pass["cache_watch"] + chunked["cache_watch"]:
        assert watch["calls"] > 0 and watch["written"] > 0
        assert watch["changed"] == 0


def test_without_a_fixed_g_each_request_gets_the_rules_g(tiny_model):
    """An engine without group_size: the rule ("cover") picks each request's G from its prompt + max_tokens
    (long: 312 tokens, G = 3; long3: 212, G = 2; mid fits, G = 1), as selfextend.enable picks it."""
    from conftest import engine, generate, run_reference

    names = ["long", "long3", "mid"]
    groups = {name: request_group(len(PROMPTS[name]), group_size=None) for name in names}
    assert groups == {"long": 3, "long3": 2, "mid": 1}
    with engine(tiny_model, group_size=None, enable_prefix_caching=False, max_num_batched_tokens=2048) as llm:
        outputs = generate(llm, names)
    reference = run_reference(tiny_model, {name: PROMPTS[name] for name in names}, groups=groups)
    for name in names:
        assert_matches(outputs[name], reference[name], f"{name} with the rule's G = {groups[name]}")
