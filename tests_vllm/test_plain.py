"""The plugin next to stock vLLM: installed but not switched on it changes nothing; switched on, a
model without SelfExtend settings runs the stock path; in an engine with SelfExtend, requests that fit
the trained length (G = 1) run vLLM's stock path: bit for bit what plain vLLM gives."""

from __future__ import annotations

from conftest import PLAIN_BATCH, greedy, max_difference, prompt_logprobs


def test_installed_but_not_switched_on_runs_stock_attention(plain):
    assert plain["backends"] == [("CPUAttentionBackendImpl", False)]


def test_switched_on_without_settings_runs_the_stock_path_bit_for_bit(plain, switched_on_plain_model):
    assert switched_on_plain_model["backends"] == [("SelfExtendCPUImpl", False)]
    for name in PLAIN_BATCH:
        ours, stock = switched_on_plain_model["batch"][name], plain["batch"][name]
        assert prompt_logprobs(ours) == prompt_logprobs(stock)
        assert greedy(ours) == greedy(stock)


def test_requests_that_fit_equal_plain_vllm_bit_for_bit(one_pass, plain):
    """"mid" (100 + 12 tokens) and "short" fit L = 128: G = 1, vLLM's own metadata, writes and kernel."""
    for name in PLAIN_BATCH:
        ours, stock = one_pass["alone"][name], plain["batch"][name]
        assert prompt_logprobs(ours) == prompt_logprobs(stock), name
        assert greedy(ours) == greedy(stock), name


def test_the_same_request_grouped_differs_from_plain_vllm(one_pass, plain):
    """A sanity check that the comparison above can fail: "mid" asking for G = 2 groups positions past w."""
    ours, stock = one_pass["asked_g2"]["mid"], plain["batch"]["mid"]
    assert max_difference(prompt_logprobs(ours)[40:], prompt_logprobs(stock)[40:]) > 0.1
