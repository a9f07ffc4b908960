"""How people call an enabled model: padded batches without position_ids, every KV cache class
transformers ships, cache cropping and beam reordering, several threads, copies of the model, inputs
past the limit. Each case gives exactly what the plain-path equivalent gives, or a clear error."""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys
import threading

import pytest
import torch
from conftest import FAMILY_NAMES, L, ids_of, left_padded_pair, logits, sequence_logits, tiny_model
from transformers import DynamicCache, QuantizedCache, StaticCache

import selfextend
from selfextend.attention import Row, selfextend_row
from selfextend.naive import naive_attention as reference_attention
from selfextend.rope import Rotary
from selfextend.schedule import Schedule
from selfextend.sequence import RowKeys, decode_stats
from selfextend.positions import DEFAULT_RULE, rule_window
from selfextend.settings import Settings

W = 16  # window used by the tests (L = 64)
TOL = 1e-4  # float32: what the plain model's own cached decoding agrees to


def decode_with(model, ids, cache, prefill):
    """Logits of every position: ``prefill`` tokens in one call, then one token per call."""
    with torch.no_grad():
        out = [model(ids[:, :prefill], cache=cache).logits.float()]
        out += [model(ids[:, t : t + 1], cache=cache).logits.float() for t in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1)


def max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------
# padded batches in a plain forward call (no position_ids)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_left_padded_batch_without_position_ids_gives_each_row_as_alone(family):
    model = tiny_model(family)
    long, short, pad, batch, mask = left_padded_pair()
    with selfextend.enable(model, window=W):
        together = logits(model, batch, attention_mask=mask)  # the way a batch is scored: tok(texts, padding=True)
        alone = [logits(model, long), logits(model, short)]
    assert max_diff(together[0], alone[0][0]) <= TOL
    assert max_diff(together[1, pad:], alone[1][0]) <= TOL


def test_right_padded_batch_gives_each_real_token_as_alone():
    model = tiny_model("llama")
    long, short = ids_of(150, seed=2), ids_of(110, seed=3)
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, pad, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, short.shape[1]:] = 0
    with selfextend.enable(model, window=W):
        together = logits(model, batch, attention_mask=mask)
        alone = logits(model, short)
    assert max_diff(together[1, : short.shape[1]], alone[0]) <= TOL


def test_gap_inside_a_sequence_is_refused():
    model = tiny_model("llama")
    ids = ids_of(150)
    mask = torch.ones_like(ids)
    mask[0, 70:80] = 0
    with selfextend.enable(model, window=W), pytest.raises(NotImplementedError, match="gap inside a sequence"):
        logits(model, ids, attention_mask=mask)


def test_shifted_position_ids_give_the_same_answer():
    """RoPE attention does not change when every position moves by the same amount; neither does
    SelfExtend: a row's first token is its position 0 whatever position_ids say."""
    model = tiny_model("llama")
    ids = ids_of(150)
    with selfextend.enable(model, window=W):
        base = logits(model, ids)
        shifted = logits(model, ids, position_ids=torch.arange(7, 157)[None])
    assert max_diff(base, shifted) <= TOL


# ------------------------------------------------------------------------------------------------
# inputs past the automatic limit: finish, with the warning that states the limit
# ------------------------------------------------------------------------------------------------
def test_automatic_group_size_past_its_cap_matches_reference():
    """Past (L - w) * 64 + w the automatic G stays at 64 (the kernel used to loop forever there)."""
    torch.manual_seed(0)
    Lp, w, n = 8, 2, 420  # limit (8 - 2) * 64 + 2 = 386
    settings = Settings(Lp, w, None, "floor", False, 64)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    q, k, v = torch.randn(4, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 16)
    row, rotary, schedule = Row(q, k, v, 0, 0, 0.25), Rotary(inv_freq.double()), Schedule(settings)
    fast = selfextend_row(row, schedule, rotary, RowKeys.for_row(row, settings, rotary))
    pos = torch.arange(n)
    groups = torch.tensor([float(schedule.group_at(int(p))) for p in pos])
    assert groups.max() == 64 and (groups == 64).sum() > 30
    ref = reference_attention(q, k, v, pos, pos, inv_freq, w, groups, "floor", 0.25)
    assert max_diff(fast, ref) <= 1e-5


def test_cli_with_limit_warn_finishes_past_the_automatic_limit(tmp_path):
    """`selfextend generate --limit warn` on an input past (L - w) * 64 + w: it runs, warns, answers."""
    from tiny_checkpoint import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "tiny")
    doc = tmp_path / "long.txt"
    doc.write_text("The grass is green. The sky is blue. " * 400)  # > 3592 tokens of the tiny tokenizer
    w = rule_window(DEFAULT_RULE, L)  # the default window
    proc = subprocess.run(
        [sys.executable, "-m", "selfextend.cli", "generate", "--model", str(folder), "-f", str(doc), "-p", "Color?",
         "--limit", "warn", "--max-new-tokens", "2", "--no-chat"],
        capture_output=True, text=True, timeout=600)  # it used to never return
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"extended limit is {(L - w) * 64 + w} tokens" in proc.stderr


# ------------------------------------------------------------------------------------------------
# every KV cache class, cropping, reordering
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_static_cache_decoding_matches_one_forward_pass(family):
    model = tiny_model(family)
    ids = ids_of(112)  # within the limit of the G a rule picks for 100 tokens ((64 - 16) * 2 + 16 for "cover")
    full = sequence_logits(model, ids, 100, W)  # the G the rule chooses from the 100-token prefill
    with selfextend.enable(model, window=W):
        stepped = decode_with(model, ids, StaticCache(config=model.config, max_cache_len=160), 100)
    assert max_diff(stepped, full) <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding and full cache layers
@pytest.mark.parametrize("implementation", ["static"])  # offloaded caches need CUDA
def test_generate_with_each_cache_implementation_equals_the_dynamic_cache(implementation, family):
    model = tiny_model(family)
    prompt = ids_of(120)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with selfextend.enable(model, window=W):
        dynamic = model.generate(prompt, **kwargs)
        other = model.generate(prompt, cache_implementation=implementation, **kwargs)
    assert torch.equal(other.sequences, dynamic.sequences)
    assert max_diff(torch.stack(other.logits), torch.stack(dynamic.logits)) <= TOL


def test_quantized_cache_is_as_close_as_the_plain_model_gets_with_it():
    """An fp8 KV cache changes the keys; SelfExtend with it must drift from its own full forward no
    more than the plain model drifts with it (here within the trained length), and it must not keep
    grouped keys it cannot check against the cache."""
    model = tiny_model("llama")
    ids = ids_of(112)  # within the limit of the G a rule picks for 100 tokens
    short = ids[:, :L]
    plain_drift = max_diff(decode_with(model, short, QuantizedCache(backend="fp8", config=model.config), 40),
                           logits(model, short))
    full = sequence_logits(model, ids, 100, W)
    with selfextend.enable(model, window=W):
        cache = QuantizedCache(backend="fp8", config=model.config)
        drift = max_diff(decode_with(model, ids, cache, 100), full)
    assert 0 < drift <= 2 * plain_drift + 1e-3
    assert decode_stats(cache)["grouped_key_bytes"] == 0


def test_crop_then_regrow_never_uses_stale_grouped_keys():
    """Assisted decoding crops the cache and regrows it with other tokens; a tiny window puts the
    cropped keys inside the grouped range."""
    model = tiny_model("llama")
    first, second = ids_of(130, seed=4), ids_of(130, seed=5)
    second[:, :118] = first[:, :118]  # same prefix, different last 12 tokens
    with selfextend.enable(model, group_size=3, window=4):
        cache = DynamicCache(config=model.config)
        decode_with(model, first, cache, 100)  # keys of `first` up to 125 are grouped and kept
        cache.crop(-12)  # back to 118 tokens
        with torch.no_grad():
            regrown = [model(second[:, t : t + 1], cache=cache).logits.float() for t in range(118, 130)]
        expected = logits(model, second)[:, 118:]
    assert max_diff(torch.cat(regrown, 1), expected) <= TOL


def test_assisted_decoding_matches_greedy():
    model, assistant = tiny_model("llama"), tiny_model("llama", seed=7)
    prompt = ids_of(110)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with selfextend.enable(model, window=4):
        greedy = model.generate(prompt, **kwargs)
        assisted = model.generate(prompt, assistant_model=assistant, **kwargs)
    assert torch.equal(assisted, greedy)


def test_beam_search_matches_beam_search_without_cache():
    """Beam search reorders the cache rows at every step; kept grouped keys must follow or be rebuilt."""
    model = tiny_model("llama", seed=2)
    prompt = ids_of(110, seed=2)
    kwargs = dict(max_new_tokens=20, num_beams=4, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True, length_penalty=0.0)
    with selfextend.enable(model, group_size=3, window=4):
        cached = model.generate(prompt, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.allclose(cached.sequences_scores, uncached.sequences_scores, atol=1e-4)


def test_reused_static_cache_after_reset_is_fresh():
    model = tiny_model("llama")
    a, b = ids_of(112, seed=8), ids_of(112, seed=9)  # within the limit of the G a rule picks for 100 tokens
    expected = sequence_logits(model, b, 100, W)
    with selfextend.enable(model, window=W):
        cache = StaticCache(config=model.config, max_cache_len=140)
        decode_with(model, a, cache, 100)
        cache.reset()
        again = decode_with(model, b, cache, 100)
    assert max_diff(again, expected) <= TOL


# ------------------------------------------------------------------------------------------------
# several threads, one model
# ------------------------------------------------------------------------------------------------
def test_two_threads_generate_what_each_generates_alone():
    model = tiny_model("llama")
    prompts = [ids_of(140, seed=10), ids_of(120, seed=11)]
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with selfextend.enable(model, window=W):
        alone = [model.generate(p, **kwargs) for p in prompts]
        for _ in range(3):
            results, errors = [None, None], []
            start = threading.Barrier(2)

            def run(i):
                try:
                    start.wait()
                    results[i] = model.generate(prompts[i], **kwargs)
                except Exception as err:  # surfaced below with its type
                    errors.append(err)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, repr(errors[0])
            assert all(torch.equal(r, a) for r, a in zip(results, alone))


# ------------------------------------------------------------------------------------------------
# copies of an enabled model
# ------------------------------------------------------------------------------------------------
def _pickled(model):
    return pickle.loads(pickle.dumps(model))


def _torch_saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make_copy", [copy.deepcopy, _pickled, _torch_saved], ids=["deepcopy", "pickle", "torch.save"])
def test_copies_of_an_enabled_model_are_enabled_and_independent(make_copy):
    model = tiny_model("gemma3")
    ids = ids_of(150)
    plain = logits(model, ids)
    selfextend.enable(model, group_size=3, window=W)
    extended = logits(model, ids)
    clone = make_copy(model)
    assert selfextend.is_enabled(clone) and selfextend.get_handle(clone).group_size == 3
    assert torch.equal(logits(clone, ids), extended)
    selfextend.disable(clone)
    assert torch.equal(logits(clone, ids), plain)
    assert torch.equal(logits(model, ids), extended)  # the original is untouched
    selfextend.disable(model)


def test_save_pretrained_of_an_enabled_model_loads_as_plain(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    with selfextend.enable(model, window=W):
        model.save_pretrained(tmp_path)
    assert "selfextend" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation != "selfextend" and not selfextend.is_enabled(loaded)


# ------------------------------------------------------------------------------------------------
# torch.compile, output_attentions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [40, 150], ids=["within-L", "past-L"])
def test_compiled_model_gives_what_the_eager_model_gives(n):
    """``torch.compile(model)`` compiles around the attention function (a graph break) instead of
    tracing it; past L this used to fail inside aot_autograd. One pass, then a cached decode step."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = ids_of(n + 1)
    with selfextend.enable(model, group_size=4, window=W):
        compiled = torch.compile(model)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            expected = [model(ids[:, :n]).logits] * 2 + [model(ids).logits[:, n:]]
            got = [compiled(ids[:, :n]).logits,  # the model makes its own cache
                   compiled(ids[:, :n], cache=cache).logits, compiled(ids[:, n:], cache=cache).logits]
    for a, b in zip(got, expected):
        assert (a - b).abs().max() < 1e-5


def test_output_attentions_past_the_window_warns():
    """An eager model returns attention weights; SelfExtend never builds them for inputs it groups:
    it says so (it used to return an empty tuple silently), and inputs that fit keep their weights."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    with selfextend.enable(model, group_size=2, window=W):
        with torch.no_grad():
            fits = model(ids_of(W), output_attentions=True)
            assert len(fits.attentions) == model.config.num_hidden_layers
            with pytest.warns(UserWarning, match="output_attentions=True: SelfExtend never builds"):
                model(ids_of(150), output_attentions=True)
