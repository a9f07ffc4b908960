"""The vLLM plugin's front end and settings, which need no vLLM (``selfextend.vllm.settings`` and
``.frontend`` import none): the G of each request and its cache salt, the bound on G, the user's
``hf_overrides`` against SelfExtend's, the model config as vLLM builds it with those overrides, and
vLLM's plugin allow-list. The same checks through ``engine_args`` and ``selfextend vllm-serve`` are
tested with vLLM in tests_vllm/test_config.py."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from selfextend.positions import DEFAULT_MAX_GROUP_SIZE
from selfextend.settings import Settings
from selfextend.vllm.frontend import (
    admit_request,
    apply_overrides,
    check_model_config,
    check_plugin_allowed,
    engine_settings,
    hf_overrides_for,
)
from selfextend.vllm.settings import UnsupportedConfigError, engine_limit, request_group, settings_from_config, to_dict


def llama_config(**options) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=64, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **options)


# -- G is bounded as the library bounds it ---------------------------------------------------------


def test_group_size_is_bounded_by_the_librarys_largest():
    settings, max_model_len = engine_settings(8192, DEFAULT_MAX_GROUP_SIZE, 1024, None)
    assert max_model_len == engine_limit(settings) == (8192 - 1024) * DEFAULT_MAX_GROUP_SIZE + 1024
    with pytest.raises(ValueError, match=f"from 1 to {DEFAULT_MAX_GROUP_SIZE} .*DEFAULT_MAX_GROUP_SIZE.*got 100000"):
        engine_settings(8192, 100000, 1024, None)
    with pytest.raises(ValueError, match=f"from 1 to {DEFAULT_MAX_GROUP_SIZE}"):
        engine_settings(8192, DEFAULT_MAX_GROUP_SIZE + 1, 1024, None)


def test_settings_written_by_hand_into_a_model_config_are_bounded_too():
    config = llama_config()
    config.selfextend = {"pretrained_length": 8192, "window": 1024, "group_size": 100000, "mode": "floor"}
    with pytest.raises(UnsupportedConfigError, match="SelfExtend settings .* are invalid: group_size must be"):
        settings_from_config(config)
    config.selfextend = {"pretrained_length": 8192, "window": 9000, "group_size": 4, "mode": "floor"}
    with pytest.raises(UnsupportedConfigError, match="invalid: window must be"):
        settings_from_config(config)


# -- the user's hf_overrides are merged with SelfExtend's, never overwritten -------------------------


def test_user_overrides_are_merged_with_the_settings():
    settings = Settings(8192, 1024, 4)
    merged = hf_overrides_for(settings, 29696, {"rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 1e4}})
    assert merged == {"rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 1e4},
                      "selfextend": to_dict(settings), "max_position_embeddings": 29696}


@pytest.mark.parametrize("key, message", [
    ("selfextend", "already has a 'selfextend' entry"),
    ("max_position_embeddings", "sets 'max_position_embeddings'"),
])
def test_user_overrides_of_selfextends_keys_are_refused_by_name(key, message):
    user = {key: {"pretrained_length": 8192, "window": 512, "group_size": 2} if key == "selfextend" else 65536}
    with pytest.raises(ValueError, match=message):
        hf_overrides_for(Settings(8192, 1024, 4), 29696, user)
    assert key in user and len(user) == 1  # the caller's dict is left as it was


# -- the model is checked as vLLM will build it, with the user's overrides applied -------------------


@pytest.mark.parametrize("overrides, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "original_max_position_embeddings": 8192}}, "rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'dynamic'"),
    ({"sliding_window": 4096}, "sliding-window attention"),
    ({"layer_types": ["sliding_attention"]}, "sliding-window attention"),
])
def test_overrides_that_make_the_model_unsupported_are_seen(overrides, message):
    config = llama_config()
    check_model_config(config)  # the model itself is supported ...
    with pytest.raises(UnsupportedConfigError, match=message):
        check_model_config(apply_overrides(config, overrides))  # ... the overrides make it unsupported


def test_overrides_update_a_nested_config_key_by_key():
    """vLLM updates a nested config (here a multimodal model's text config) key by key: the keys the
    override leaves out keep the model's values."""
    from transformers import LlavaConfig

    config = LlavaConfig(text_config=llama_config().to_dict())
    apply_overrides(config, {"text_config": {"sliding_window": 512}, "rms_norm_eps": 1e-5})
    text = config.get_text_config()
    assert text.sliding_window == 512 and text.max_position_embeddings == 8192 and config.rms_norm_eps == 1e-5


# -- vLLM must load the plugin ---------------------------------------------------------------------


def test_a_plugin_allow_list_without_selfextend_is_refused():
    check_plugin_allowed(None)  # VLLM_PLUGINS unset: every plugin loads
    check_plugin_allowed(["lora_resolver", "selfextend"])
    with pytest.raises(UnsupportedConfigError, match="VLLM_PLUGINS='lora_resolver' leaves out the 'selfextend'"):
        check_plugin_allowed(["lora_resolver"])
    with pytest.raises(UnsupportedConfigError, match="leaves out"):
        check_plugin_allowed([""])  # VLLM_PLUGINS="" loads no plugin at all


# -- each request's G, and the cache salt that keeps different G apart -------------------------------


def test_a_request_that_fits_gets_g1_and_a_longer_one_the_engines_or_the_rules():
    fixed, auto = Settings(8192, 2048, 4), Settings(8192, 2048, None)
    assert request_group(fixed, 8000, 192, None) == request_group(auto, 8000, 192, None) == 1  # 8192: fits
    assert request_group(fixed, 8000, 193, None) == 4
    # the rule ("cover"): the smallest G with (8192 - 2048) * G + 2048 >= prompt + max_tokens
    assert request_group(auto, 8000, 193, None) == 2
    assert request_group(auto, 14336, 0, None) == 2 and request_group(auto, 14337, 0, None) == 3
    assert request_group(auto, 100, 10, {"selfextend_group_size": 3}) == 3  # asked for


@pytest.mark.parametrize("extra_args, message", [
    ({"selfextend_group_size": 2}, "may reach 20000 tokens .* with G=2 holds 14336"),
    ({"selfextend_group_size": 1}, "G=1 holds 8192"),
    ({"selfextend_group_size": 0}, "from 1 to 64"),
    ({"selfextend_group_size": "3"}, "from 1 to 64"),
])
def test_a_group_size_that_cannot_hold_the_request_is_refused(extra_args, message):
    with pytest.raises(ValueError, match=message):
        request_group(Settings(8192, 2048, None), 19000, 1000, extra_args)


def test_requests_with_g_above_1_get_a_cache_salt_naming_their_g():
    settings = Settings(8192, 2048, None)
    assert admit_request(settings, 1000, 100, 32768, None, None) is None  # G = 1: vLLM's own hashing
    assert admit_request(settings, 1000, 100, 32768, None, "user") is None
    assert admit_request(settings, 10000, 100, 32768, None, None) == "selfextend:G=2:w=2048"
    assert admit_request(settings, 10000, 100, 32768, None, "user") == "user|selfextend:G=2:w=2048"
    assert admit_request(settings, 10000, None, 32768, None, None) == "selfextend:G=5:w=2048"  # up to 32768
    with pytest.raises(ValueError, match="prompt embeddings"):
        admit_request(settings, None, 10, 32768, None, None)
