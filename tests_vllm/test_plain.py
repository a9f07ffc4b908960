"""The plugin next to stock vLLM: installed but not switched on it changes nothing; switched on, a
model without SelfExtend settings runs the stock path; with SelfExtend, inputs that stay within the
window give what plain vLLM gives."""

from __future__ import annotations

from conftest import ATOL, PLAIN_BATCH, greedy, max_difference, prompt_logprobs


def test_installed_but_not_switched_on_runs_stock_attention(plain):
    assert plain["backends"] == [("CPUAttentionBackendImpl", False)]


def test_switched_on_without_settings_runs_the_stock_path_bit_for_bit(plain, switched_on_plain_model):
    assert switched_on_plain_model["backends"] == [("SelfExtendCPUImpl", False)]
    for name in PLAIN_BATCH:
        ours, stock = switched_on_plain_model["batch"][name], plain["batch"][name]
        assert prompt_logprobs(ours) == prompt_logprobs(stock)
        assert greedy(ours) == greedy(stock)


def test_inputs_within_the_window_equal_plain_vllm(one_pass, plain):
    ours, stock = one_pass["batch"]["short"], plain["batch"]["short"]  # 20 + 12 tokens, window 32
    assert max_difference(prompt_logprobs(ours), prompt_logprobs(stock)) < ATOL
    tokens, logprobs = greedy(ours)
    stock_tokens, stock_logprobs = greedy(stock)
    assert tokens == stock_tokens
    assert max_difference(logprobs, stock_logprobs) < ATOL


def test_inputs_beyond_the_window_differ_from_plain_vllm(one_pass, plain):
    """A sanity check that the comparisons above can fail: past w = 32 SelfExtend groups positions."""
    ours, stock = one_pass["batch"]["mid"], plain["batch"]["mid"]
    assert max_difference(prompt_logprobs(ours)[40:], prompt_logprobs(stock)[40:]) > 0.1
