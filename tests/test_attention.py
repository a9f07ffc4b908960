"""The invariants (ARCHITECTURE.md) on tiny random models of every supported family, float32 and
bfloat16: bit-identity when nothing is grouped, agreement with a float64 reference, KV-cache
decoding, left padding, and enable/disable leaving the model untouched."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import (FAMILIES, L, ids_of, left_padded_pair, logits, reference_logits, sequence_logits,
                      tiny_model)
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import selfextend
from selfextend.attention import Row, selfextend_row
from selfextend.naive import naive_attention as reference_attention
from selfextend.rope import Rotary
from selfextend.schedule import Schedule
from selfextend.sequence import RowKeys
from selfextend.settings import Settings
from selfextend.sequence import prompt_length
from selfextend.positions import DEFAULT_RULE

DTYPES = [torch.float32, torch.bfloat16]
W = 16  # window used by the tests (L = 64)


def test_every_supported_family_is_tested():
    """The README's table is SUPPORTED_MODEL_TYPES; every entry has a tiny model in these tests."""
    assert {model_type for model_type, _ in FAMILIES.values()} == set(selfextend.SUPPORTED_MODEL_TYPES)


# ------------------------------------------------------------------------------------------------
# 1. nothing grouped -> the original attention path, bit-identical
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_nothing_grouped_is_bit_identical(family, dtype):
    model = tiny_model(family, dtype)
    short, fits = ids_of(W), ids_of(L)
    plain_short, plain_fits = logits(model, short), logits(model, fits)
    with selfextend.enable(model, group_size=4, window=W):  # sequence no longer than w
        assert torch.equal(logits(model, short), plain_short)
    with selfextend.enable(model, group_size=1, window=W):  # G = 1
        assert torch.equal(logits(model, fits), plain_fits)
    with selfextend.enable(model, window=W):  # automatic G: input fits the trained length
        assert torch.equal(logits(model, fits), plain_fits)


# ------------------------------------------------------------------------------------------------
# 2. fast path vs the float64 reference (flash-attention's rule: error <= 2x the error of the
#    naive computation in the same dtype, plus a tiny epsilon)
# ------------------------------------------------------------------------------------------------
def assert_close_by_rule(fast, ref64, same_dtype_ref, eps):
    err = (fast.float() - ref64.float()).abs().max().item()
    base = (same_dtype_ref.float() - ref64.float()).abs().max().item()
    assert err <= 2 * base + eps, f"error {err:.3g} vs naive-in-dtype error {base:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [4, None])
def test_model_matches_reference(family, dtype, group_size):
    model = tiny_model(family, dtype)
    ids = ids_of(150)  # > L: auto G reaches 3
    ref64 = reference_logits(model, ids, W, group_size)
    ref_dtype = reference_logits(model, ids, W, group_size, dtype=dtype)
    with selfextend.enable(model, group_size=group_size, window=W):
        fast = logits(model, ids)
    assert_close_by_rule(fast, ref64, ref_dtype, eps=1e-5 if dtype == torch.float32 else 1e-2)
    assert (fast - logits(model, ids)).abs().max() > 1e-3 or "swa" in family  # SelfExtend changed something


@pytest.mark.parametrize("mode,group_size", [("rerope", None), ("leaky", 3), ("leaky", 2.5)])
@pytest.mark.parametrize("fam", ["llama", "gemma3", "gpt_neox"])
def test_modes_match_reference(fam, mode, group_size):
    model = tiny_model(fam)
    ids = ids_of(120)
    ref64 = reference_logits(model, ids, W, group_size, mode=mode)
    ref32 = reference_logits(model, ids, W, group_size, mode=mode, dtype=torch.float32)
    with selfextend.enable(model, group_size=group_size, window=W, mode=mode):
        fast = logits(model, ids)
    assert_close_by_rule(fast, ref64, ref32, eps=1e-5)


KERNEL_CASES = [  # (Lq, Lk, key_offset, mode, G, softcap, log_scale, block)
    (300, 300, 0, "floor", 3, None, False, 64),
    (300, 300, 0, "floor", None, None, True, 128),
    (1, 300, 0, "floor", 5, None, False, 64),  # decode step
    (37, 300, 0, "floor", None, 30.0, False, 16),  # chunked prefill with softcapping
    (200, 230, 30, "leaky", 2.5, None, False, 64),  # left padding: 30 pad keys
    (9, 260, -5, "rerope", math.inf, None, False, 4),  # positions start at 5
]


def run_kernel_case(case, dtype, device="cpu", interleaved=False):
    """One row of KERNEL_CASES through the fast kernel on ``device`` and through the reference (float64
    and ``dtype``), rotary pairs in the rotate-half or the ``interleaved`` layout. Returns ``(fast, ref64, ref_dtype, rows)``: fast ``[Hq, Lq, D]`` on the CPU, the
    references ``[Hq, rows, D]``, ``rows`` the queries at real positions (the others are padding)."""
    lq, lk, off, mode, g, softcap, log_scale, block = case
    torch.manual_seed(0)
    hq, hkv, d, w, Lp = 6, 2, 32, 24, 96
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 24, 2).float() / 24))  # partial rotary: 24 of 32 dims
    q = (torch.randn(hq, lq, d) * 2).to(dtype)
    k = (torch.randn(hkv, lk, d) * 2).to(dtype)
    v = torch.randn(hkv, lk, d).to(dtype)
    settings = Settings(Lp, w, None if mode == "rerope" else g, mode, log_scale, block)
    schedule = Schedule(settings)
    first = (lk - 1 - off) - (lq - 1)
    rotary = Rotary(inv_freq.double(), interleaved).to(device)
    row = Row(q.to(device), k.to(device), v.to(device), first, off, d**-0.5, softcap)
    fast = selfextend_row(row, schedule, rotary, RowKeys.for_row(row, settings, rotary)).cpu()  # in the model's dtype
    q_pos, k_pos = torch.arange(first, first + lq), torch.arange(lk) - off
    groups = torch.tensor([float(schedule.group_at(int(p))) for p in q_pos.clamp(min=0)])
    args = (q, k, v, q_pos, k_pos, inv_freq, w, groups, mode, d**-0.5)
    kw = dict(softcap=softcap, key_valid=k_pos >= 0, log_scale_length=Lp if log_scale else None,
              interleaved=interleaved)
    rows = q_pos >= 0
    ref64 = reference_attention(*args, **kw)[:, rows]
    ref_dtype = reference_attention(*args, **kw, dtype=dtype)[:, rows]
    return fast, ref64, ref_dtype, rows


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[3]}-Lq{c[0]}-Lk{c[1]}-off{c[2]}")
def test_kernel_matches_reference(case, dtype, interleaved):
    fast, ref64, ref_dtype, rows = run_kernel_case(case, dtype, interleaved=interleaved)
    assert fast.dtype == dtype
    assert_close_by_rule(fast[:, rows], ref64, ref_dtype, eps=1e-6)
    assert torch.all(fast[:, ~rows] == 0)  # left-padding queries attend to nothing


_MEMORY_PROBE = """
import resource, torch
from selfextend.attention import Row, selfextend_row
from selfextend.rope import Rotary
from selfextend.schedule import Schedule
from selfextend.sequence import RowKeys
from selfextend.settings import Settings

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # high-water mark, bytes
torch.manual_seed(0)
n = 4096
q, k, v = torch.randn(4, n, 16), torch.randn(4, n, 16), torch.randn(4, n, 16)
settings = Settings(64, 16, 8, "floor", False, 128)
rotary = Rotary(torch.ones(8, dtype=torch.float64))
def run(n):
    row = Row(q[:, :n], k[:, :n], v[:, :n], 0, 0, 0.25)
    selfextend_row(row, Schedule(settings), rotary, RowKeys.for_row(row, settings, rotary))
run(300)  # warm up
before = peak()
run(n)
ours = peak() - before
before = peak()
torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # what one full score matrix per head costs
print(ours, peak() - before)
"""


def test_no_full_score_matrix():
    """A 4096-token prefill (4 heads) raises the peak memory of a fresh process by far less than one
    [4, 4096, 4096] float32 score matrix (256 MiB) would."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, check=True).stdout
    ours, naive = (int(x) for x in out.split())
    assert naive > 200 * 2**20  # the probe sees a full score matrix when there is one
    assert ours < 32 * 2**20, f"SelfExtend raised the peak by {ours / 2**20:.0f} MiB"


_GEMMA3_PROBE = """
import resource, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
import selfextend

n, L = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
config = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                              max_position_embeddings=L, sliding_window=512, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"])
model = AutoModelForCausalLM.from_config(config).eval()
ids = torch.randint(3, 128, (1, n))
selfextend.enable(model)
with torch.no_grad():
    model(ids[:, :600], logits_to_keep=1)  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model(ids, logits_to_keep=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


def probe_gemma3_memory(n: int, trained: int) -> int:
    """Peak memory increase of one forward pass of ``n`` tokens through a tiny Gemma 3 (a sliding
    layer of 512, a global layer) with SelfExtend on, in a fresh process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _GEMMA3_PROBE, str(n), str(trained)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[-1])


def test_sliding_window_layers_stay_linear_in_memory():
    """16k tokens on a Gemma 3 config trained on 4k: the original sliding-window path would build a
    [16k, 16k] mask (256 MiB as bool); with SelfExtend grouping, sliding layers run blocked."""
    grown = probe_gemma3_memory(16384, 4096)  # measured: 82 MiB here; the plain model: 1325 MiB
    assert grown < 128 * 2**20, f"peak grew by {grown / 2**20:.0f} MiB"


@pytest.mark.slow
def test_sliding_window_layers_at_64k_hold_no_length_squared_tensor():
    """The issue's probe: 64k tokens on a Gemma 3 config (trained 32k). One [64k, 64k] bool mask is 4 GiB."""
    grown = probe_gemma3_memory(65536, 32768)
    assert grown < 512 * 2**20, f"peak grew by {grown / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------
# 3. KV-cache decoding == one forward pass
# ------------------------------------------------------------------------------------------------
def decode_logits(model, ids, prefill, chunk=None):
    """Logits for every position: prefill ``prefill`` tokens (in chunks, announced first as the library's
    own prefill does), then one token at a time."""
    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        with prompt_length(prefill):
            for s in range(0, prefill, chunk or prefill):
                out.append(model(ids[:, s : min(prefill, s + (chunk or prefill))], cache=cache).logits.float())
        for p in range(prefill, ids.shape[1]):
            out.append(model(ids[:, p : p + 1], cache=cache).logits.float())
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_full_forward(family, dtype):
    """Decoding gives what one forward pass with the sequence's G gives: a fixed G, or the G the rule
    chose from the prefill (which stays while the sequence is within its limit)."""
    model = tiny_model(family, dtype)
    ids = ids_of(112)  # within the limit of the G any rule picks for the prefills below: (64 - 16) * 2 + 16
    # how far the plain model's own cached decode drifts from its full forward, in this dtype
    plain_drift = (decode_logits(model, ids[:, :L], 40) - logits(model, ids[:, :L])).abs().max().item()
    for group_size, prefill, chunk in ((3, 100, None), (3, 90, 32), (None, 100, None), (None, 90, 32)):
        if group_size is None:
            full = sequence_logits(model, ids, prefill, W)
        else:
            with selfextend.enable(model, group_size=group_size, window=W):
                full = logits(model, ids)
        with selfextend.enable(model, group_size=group_size, window=W):
            err = (decode_logits(model, ids, prefill, chunk) - full).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2 * plain_drift + 0.05
        assert err <= tol, f"G={group_size} prefill={prefill} chunk={chunk}: {err}"


def test_a_copied_cache_keeps_the_g_chosen_for_its_sequence():
    """Copies of a KV cache (``copy.deepcopy``: transformers' prompt-reuse pattern) continue as the original
    would: after the first chunk of an announced prefill (the rest must still use the G chosen for the
    whole prompt, although its first queries are below L) and after the whole prompt (decoding)."""
    model = tiny_model("llama")
    ids = ids_of(112)
    full = sequence_logits(model, ids, 100, W)  # one pass with the G the rule picks for 100 tokens
    with selfextend.enable(model, window=W):
        original = DynamicCache(config=model.config)
        with torch.no_grad():
            with prompt_length(100):
                first = model(ids[:, :40], cache=original).logits.float()
            cache = copy.deepcopy(original)  # mid-prefill
            rest = model(ids[:, 40:100], cache=cache).logits.float()
            cache = copy.deepcopy(cache)  # the prompt's cache, reused
            steps = [model(ids[:, p:p + 1], cache=cache).logits.float() for p in range(100, 112)]
    err = (torch.cat([first, rest] + steps, dim=1) - full).abs().max().item()
    assert err <= 1e-4, err


def test_a_prefill_in_unannounced_chunks_groups_per_position_from_the_first_chunk():
    """Raw calls that bring a sequence in chunks, unannounced: G is chosen from the first call (G = 1 for
    a chunk that fits), so past L each query gets the rule's G for its own position, which a decode of
    the same sequence in one-token steps also gives."""
    model = tiny_model("llama")
    ids = ids_of(140)
    with selfextend.enable(model, window=W):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            chunked = torch.cat([model(ids[:, s:s + 32], cache=cache).logits.float() for s in range(0, 140, 32)], 1)
        stepped = decode_logits_unannounced(model, ids, 32)
    assert (chunked - stepped).abs().max().item() <= 1e-4


def decode_logits_unannounced(model, ids, first):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = [model(ids[:, :first], cache=cache).logits.float()]
        out += [model(ids[:, t:t + 1], cache=cache).logits.float() for t in range(first, ids.shape[1])]
    return torch.cat(out, dim=1)


def test_generate_greedy_equals_argmax_of_full_forward(family):
    model = tiny_model(family)
    prompt = ids_of(120)
    with selfextend.enable(model, window=W):
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        full = logits(model, out)
    predicted = full[0, prompt.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(out[0, prompt.shape[1]:], predicted)


def generated_scores(model, prompt, **kwargs):
    """Greedy ``model.generate``: the new tokens and their scores ``[steps, vocab]``."""
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences[0, prompt.shape[1]:], torch.stack(out.scores)[:, 0]


def test_generate_with_prefill_chunks_chooses_g_for_the_whole_prompt():
    """``generate(prefill_chunk_size=...)`` with the default settings: G is chosen for the whole prompt,
    as in one pass (it used to be chosen for the first chunk, then per position: scores 8e-3 off)."""
    model = tiny_model("llama")
    prompt = ids_of(150)
    with selfextend.enable(model, window=W):
        tokens, one_pass = generated_scores(model, prompt)
        chunked_tokens, chunked = generated_scores(model, prompt, prefill_chunk_size=40)
    assert torch.equal(tokens, chunked_tokens)
    assert (chunked - one_pass).abs().max() <= 1e-4


def test_generate_without_a_cache_keeps_the_prompts_g():
    """``generate(use_cache=False)`` runs every step as a new full pass; G stays the one chosen for the
    prompt, as with a cache (a prompt that fits keeps G = 1 below L; it used to switch the whole
    sequence to G = 2 once the text outgrew L)."""
    model = tiny_model("llama")
    prompt = ids_of(L - 3)  # fits: G = 1; the generation crosses L
    with selfextend.enable(model, window=W):
        tokens, cached = generated_scores(model, prompt)
        uncached_tokens, uncached = generated_scores(model, prompt, use_cache=False)
    assert torch.equal(tokens, uncached_tokens)
    assert (uncached - cached).abs().max() <= 1e-4


def test_generate_of_an_enabled_model_is_removed_by_disable():
    model = tiny_model("llama")
    selfextend.enable(model)
    assert "generate" in model.__dict__
    copied = copy.deepcopy(model)
    assert copied.generate.model is copied  # a copy generates with its own weights
    selfextend.disable(model)
    assert "generate" not in model.__dict__ and model.generate.__func__ is type(model).generate


def test_decode_does_not_rerotate_the_cache():
    """The first decode step rotates the cached keys once; after that a step rotates about one new
    key per layer (in batches of KEYS_AHEAD), never the whole cache again."""
    from selfextend.attention import KEYS_AHEAD
    from selfextend.sequence import decode_stats

    model = tiny_model("llama")
    prefill, steps = 150, 40
    ids = ids_of(prefill + steps)
    with selfextend.enable(model, group_size=4, window=W):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :prefill], cache=cache)
            rotated = []
            for t in range(prefill, prefill + steps):
                step = model(ids[:, t : t + 1], cache=cache).logits
                rotated.append(decode_stats(cache)["rotated_keys"])
        full = logits(model, ids)
    layers = model.config.num_hidden_layers
    assert layers * (prefill - W + 1) <= rotated[0] <= layers * (prefill + 1)  # the cache, once
    assert rotated[-1] - rotated[0] <= layers * (steps - 1 + KEYS_AHEAD)  # then ~one key per step
    assert decode_stats(cache)["grouped_key_bytes"] > 0
    assert torch.allclose(step.float()[0, -1], full[0, -1], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# 4. left padding: each row as if alone
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_left_padding_rows_match_alone(family, dtype):
    model = tiny_model(family, dtype)
    long, short, pad, batch, mask = left_padded_pair()
    with selfextend.enable(model, window=W):
        out = model.generate(batch, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        alone = [model.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                                return_dict_in_generate=True) for x in (long, short)]
    tol = 1e-4 if dtype == torch.float32 else 0.15
    for row in range(2):
        batched = torch.stack([step[row].float() for step in out.logits])
        single = torch.stack([step[0].float() for step in alone[row].logits])
        assert (batched - single).abs().max().item() <= tol
        if dtype == torch.float32:
            assert torch.equal(out.sequences[row, -5:], alone[row].sequences[0, -5:])


# ------------------------------------------------------------------------------------------------
# 5. enable then disable leaves the model exactly as it was
# ------------------------------------------------------------------------------------------------
def test_disable_restores_model(family):
    model = tiny_model(family)
    ids = ids_of(150)
    before = logits(model, ids)
    impl = model.config._attn_implementation
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = selfextend.enable(model, window=W)
    assert selfextend.is_enabled(model) and model.config._attn_implementation == "selfextend"
    if "swa" not in family:  # all of mistral-swa's layers are sliding-window: left as they are
        assert not torch.equal(logits(model, ids), before)
    selfextend.disable(model)
    assert not selfextend.is_enabled(model)
    assert model.config._attn_implementation == impl
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any("_selfextend" in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(logits(model, ids), before)
    handle.disable()  # idempotent


# ------------------------------------------------------------------------------------------------
# settings, errors, limits
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(group_size=0), "group_size"), (dict(group_size=-2), "group_size"), (dict(group_size=2.5), "whole"),
    (dict(group_size=True), "group_size"), (dict(group_size="4"), "group_size"),
    (dict(window=0), "window"), (dict(window=L), "window"), (dict(window=L + 5), "window"),
    (dict(window=8.0), "window"), (dict(mode="ntk"), "mode"), (dict(mode="rerope", group_size=4), "rerope"),
    (dict(pretrained_length=1), "pretrained_length"), (dict(block_size=0), "block_size"),
])
def test_bad_settings_raise_and_change_nothing(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        selfextend.enable(model, **kwargs)
    assert model.config._attn_implementation == "sdpa" and not selfextend.is_enabled(model)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_model_without_rope_is_refused():
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
    model = AutoModelForCausalLM.from_config(config)
    impl = model.config._attn_implementation
    with pytest.raises(selfextend.UnsupportedModelError, match="llama.*qwen3"):
        selfextend.enable(model)
    assert model.config._attn_implementation == impl


def test_limits_warn_and_raise_if_too_long():
    model = tiny_model("llama")
    handle = selfextend.enable(model, group_size=2, window=W)
    assert handle.max_length == (L - W) * 2 + W == 112
    handle.raise_if_too_long(112)
    with pytest.raises(selfextend.ContextLengthError, match="112"):
        handle.raise_if_too_long(113)
    with pytest.warns(UserWarning, match="extended limit is 112"):
        logits(model, ids_of(130))
    assert handle.group_size_for(1000) == 2 and "G=2" in handle.describe()
    handle.disable()
    assert selfextend.enable(model, window=W).rule == DEFAULT_RULE
    auto = selfextend.enable(model, window=W, rule="f=0.5")  # grouped distances below 32
    assert auto.group_size is None and auto.group_size_for(L) == 1 and auto.group_size_for(L + 1) == 4
    assert auto.rule == "f=0.5" and auto.max_length == (L - W) * 64 + W
    cover = selfextend.enable(model, window=W, rule="cover")
    assert cover.group_size_for(L + 1) == 2 and cover.rule == "cover"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits(model, ids_of(200))  # auto G never exceeds its limit here
    auto.disable()
    assert selfextend.enable(model, mode="rerope", window=W).max_length is None


def test_packed_sequences_and_4d_masks_are_refused():
    model = tiny_model("llama")
    ids = ids_of(150)
    with selfextend.enable(model, window=W):
        packed = torch.cat([torch.arange(50), torch.arange(100)])[None]  # last sequence beyond L
        with pytest.raises(NotImplementedError, match="consecutive position_ids"):
            logits(model, ids, position_ids=packed)
        mask4d = torch.ones(1, 1, 150, 150, dtype=torch.bool).tril()
        with pytest.raises(NotImplementedError, match="4D attention mask"):
            logits(model, ids, attention_mask=mask4d)
