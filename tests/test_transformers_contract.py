"""What selfextend relies on in transformers, one test per item (the list is in ARCHITECTURE.md).

When a transformers release changes one of these, the test names the item and the place in
selfextend that depends on it, instead of the invariant tests failing somewhere downstream.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import FAMILY_NAMES, tiny_model
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, create_causal_mask
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import selfextend
from selfextend import integration
from selfextend.call import DeferredMask
from selfextend.rope import find_rotary_modules

CHANGED = "transformers changed {what}; selfextend relies on it in {where}"


def _record_calls(model, ids, **kwargs):
    """Run ``model`` once with a recording attention function; return the (args, kwargs) it got."""
    seen = []

    def record(module, query, key, value, attention_mask, **kw):
        seen.append((module, query, key, value, attention_mask, kw))
        out = torch.zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1], dtype=query.dtype)
        return out, None  # [B, Lq, Hq, D]

    AttentionInterface.register("contract_probe", record)
    AttentionMaskInterface.register("contract_probe", lambda **kw: kw)
    original = model.config._attn_implementation
    model.set_attn_implementation("contract_probe")
    try:
        with torch.no_grad():
            model(ids, **kwargs)
    finally:
        model.set_attn_implementation(original)
    return seen


def test_attention_and_mask_interfaces_take_registrations():
    assert integration.ATTENTION_NAME in ALL_ATTENTION_FUNCTIONS, CHANGED.format(
        what="AttentionInterface.register", where="integration.py (import-time registration)")
    assert integration.ATTENTION_NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, CHANGED.format(
        what="AttentionMaskInterface.register", where="integration.py (import-time registration)")


def test_attention_function_calling_convention():
    model = tiny_model("gemma2")  # has softcapping and sliding layers
    ids = torch.randint(3, 128, (1, 12))
    calls = _record_calls(model, ids)
    assert calls, CHANGED.format(what="how attention functions are called", where="selfextend_attention")
    module, query, key, value, mask, kw = calls[-1]
    assert query.shape[:2] == (1, model.config.num_attention_heads) and query.shape[2] == 12, CHANGED.format(
        what="the query layout [B, Hq, Lq, D]", where="selfextend_attention")
    assert key.shape[1] == model.config.num_key_value_heads, CHANGED.format(
        what="the key layout [B, Hkv, Lk, D]", where="selfextend_attention")
    assert "position_ids" in kw and "scaling" in kw, CHANGED.format(
        what="the keyword arguments (position_ids, scaling)", where="selfextend_attention / row_layouts")
    assert kw.get("softcap") == model.config.attn_logit_softcapping, CHANGED.format(
        what="the softcap keyword of Gemma 2", where="selfextend_attention (softcap)")
    assert isinstance(mask, dict), "the mask arrives as whatever the registered mask function returned"


def test_mask_factory_keywords():
    model = tiny_model("gemma3")
    ids = torch.randint(3, 128, (1, 12))
    masks = [call[4] for call in _record_calls(model, ids, cache=DynamicCache(config=model.config))]
    for name in ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset", "attention_mask"):
        assert all(name in m for m in masks), CHANGED.format(what=f"the mask factory keyword {name!r}",
                                                             where="DeferredMask")
    assert any(m.get("local_size") for m in masks), CHANGED.format(
        what="local_size (sliding-window masks)", where="DeferredMask.local_size / sliding layers")
    sig = inspect.signature(ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    assert {"q_offset", "kv_offset", "attention_mask", "local_size"} <= set(sig.parameters) or any(
        p.kind == p.VAR_KEYWORD for p in sig.parameters.values()), CHANGED.format(
        what="sdpa_mask's parameters", where="DeferredMask.build")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_modules_receive_the_cache_and_the_mask_as_keywords(family):
    """hand_over_cache gives the call's KV cache to the mask object the same module call receives."""
    model = tiny_model(family)
    seen = {}
    attention = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    handle = attention.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    cache = DynamicCache(config=model.config)
    with selfextend.enable(model), torch.no_grad():
        model(torch.randint(3, 128, (1, 5)), cache=cache)
    handle.remove()
    assert seen.get("cache", seen.get("past_key_values", seen.get("layer_past"))) is cache, CHANGED.format(
        what="the keyword that passes the KV cache to attention modules", where="call.hand_over_cache")
    assert isinstance(seen.get("attention_mask"), DeferredMask), CHANGED.format(
        what="the keyword that passes the mask to attention modules", where="call.hand_over_cache")


def test_output_capturing_collects_attentions_through_a_context_variable():
    """The attention function learns that output_attentions is on from transformers' collector."""
    model = tiny_model("llama")
    seen = []
    model.set_attn_implementation("eager")
    attention = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    handle = attention.register_forward_pre_hook(lambda *a: seen.append(integration._attentions_requested()))
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 5)), output_attentions=True)
        model(torch.randint(3, 128, (1, 5)))
    handle.remove()
    assert seen == [True, False], CHANGED.format(what="output_capturing._active_collector",
                                                 where="integration._attentions_requested")


def test_attention_modules_are_found_by_name_and_layer_idx():
    for family in ("llama", "gemma3", "gpt_neox", "phi"):
        model = tiny_model(family)
        found = integration._attention_modules(model)
        assert len(found) == model.config.num_hidden_layers, CHANGED.format(
            what=f"attention module classes of {family} (name contains 'Attention', int layer_idx, .config)",
            where="integration._attention_modules")


def test_rotary_modules_and_rope_init_functions():
    for family in ("llama", "gemma3", "gpt_neox"):
        model = tiny_model(family)
        assert find_rotary_modules(model), CHANGED.format(
            what=f"the rotary embedding class name of {family} (contains 'Rotary')", where="rope.find_rotary_modules")
    gemma = find_rotary_modules(tiny_model("gemma3"))[0]
    assert hasattr(gemma, "full_attention_original_inv_freq") or hasattr(gemma, "full_attention_inv_freq"), \
        CHANGED.format(what="per-layer-type inv_freq buffers of Gemma 3", where="rope.inv_freq_for_layer")
    assert {"linear", "dynamic", "yarn", "llama3"} <= set(ROPE_INIT_FUNCTIONS), CHANGED.format(
        what="ROPE_INIT_FUNCTIONS", where="rope.inv_freq_for_layer and the evaluation baselines")
    assert callable(getattr(gemma, "compute_default_rope_parameters", None)), CHANGED.format(
        what="compute_default_rope_parameters on rotary modules (rope_type 'default')", where="rope.inv_freq_for_layer")


def test_eager_attention_forward_lives_in_the_model_module():
    import sys

    for family in ("llama", "gemma2"):
        module = next(m for m in tiny_model(family).modules() if type(m).__name__.endswith("Attention"))
        assert hasattr(sys.modules[type(module).__module__], "eager_attention_forward"), CHANGED.format(
            what="eager_attention_forward in the modeling module", where="integration._original_attention")


@pytest.mark.parametrize("make", [lambda c: DynamicCache(config=c), lambda c: StaticCache(config=c, max_cache_len=16)],
                         ids=["dynamic", "static"])
def test_cache_layers_hold_index_aligned_keys(make):
    model = tiny_model("llama")
    cache = make(model.config)
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        model(ids, cache=cache)
    layer = cache.layers[-1]
    assert type(layer) in (DynamicLayer, StaticLayer), CHANGED.format(
        what="the layer classes of DynamicCache/StaticCache", where="sequence._KEEPABLE_LAYERS")
    assert layer.keys.dim() == 4 and layer.keys.shape[0] == 2 and layer.keys.shape[2] >= 7, CHANGED.format(
        what="cache layer .keys [B, Hkv, S, D]", where="sequence (fingerprints of kept grouped keys)")


def test_generate_hands_a_prepared_mask_back_to_the_model():
    """With a compileable cache, generate builds the mask and passes it as attention_mask; the model's
    create_causal_mask must pass a non-2D mask object through to the mask function."""
    model = tiny_model("llama")
    mask = DeferredMask(dict(batch_size=1, q_length=3, kv_length=3, q_offset=0, kv_offset=0,
                                         attention_mask=None))
    seen = []
    AttentionMaskInterface.register("contract_probe", lambda **kw: seen.append(kw) or kw)
    model.config._attn_implementation = "contract_probe"
    try:
        create_causal_mask(config=model.config, inputs_embeds=torch.zeros(1, 3, 8), attention_mask=mask,
                           cache=DynamicCache(config=model.config), position_ids=None)
    finally:
        model.config._attn_implementation = "sdpa"
    assert seen and seen[0]["attention_mask"] is mask, CHANGED.format(
        what="create_causal_mask's handling of an already prepared mask object", where="DeferredMask.ndim/shape")


def test_set_attn_implementation_round_trip():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with selfextend.enable(model):
        assert model.config._attn_implementation == integration.ATTENTION_NAME, CHANGED.format(
            what="set_attn_implementation / config._attn_implementation", where="enable/disable")
    assert model.config._attn_implementation == before
