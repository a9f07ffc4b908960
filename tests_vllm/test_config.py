"""engine_args, the plugin switch and `selfextend vllm-serve`, without starting an engine."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from selfextend.cli import main as cli_main
from selfextend.positions import DEFAULT_RULE, rule_window
from selfextend.vllm import SWITCH_ENV, UnsupportedConfigError, engine_args
from selfextend.vllm.config import EngineSettings


def model_folder(tmp_path, **config) -> str:
    """A folder holding only a Llama config.json (engine_args reads no weights)."""
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
            "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    (tmp_path / "config.json").write_text(json.dumps({**base, **config}))
    return str(tmp_path)


def test_engine_args_carry_the_settings_and_cap_max_model_len(tmp_path, monkeypatch):
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    kwargs = engine_args(model_folder(tmp_path), group_size=4, window=1024, dtype="float32")
    limit = (8192 - 1024) * 4 + 1024
    assert kwargs == {"model": str(tmp_path), "dtype": "float32", "max_model_len": limit, "hf_overrides": {
        "selfextend": {"pretrained_length": 8192, "window": 1024, "group_size": 4, "mode": "floor"},
        "max_position_embeddings": limit}}
    assert os.environ[SWITCH_ENV] == "1"  # worker processes started from here inherit the switch


def test_group_size_defaults_to_what_the_rule_picks_for_max_model_len(tmp_path):
    # rule f=0.5: w = 8192 // 8, grouped distances below 4096: (4096 - 1024) * 7 + 1024 >= 20000
    kwargs = engine_args(model_folder(tmp_path), max_model_len=20000, rule="f=0.5")
    assert kwargs["hf_overrides"]["selfextend"]["group_size"] == 7
    assert kwargs["hf_overrides"]["selfextend"]["window"] == 1024 and kwargs["max_model_len"] == 20000
    # the paper's rule: the smallest G that covers it, (8192 - 2048) * 3 + 2048 = 20480
    kwargs = engine_args(model_folder(tmp_path), window=2048, max_model_len=20000, rule="cover")
    assert kwargs["hf_overrides"]["selfextend"]["group_size"] == 3


def test_user_hf_overrides_are_kept(tmp_path):
    kwargs = engine_args(model_folder(tmp_path), group_size=2, hf_overrides={"rms_norm_eps": 1e-5})
    assert kwargs["hf_overrides"]["rms_norm_eps"] == 1e-5 and "selfextend" in kwargs["hf_overrides"]


@pytest.mark.parametrize("options, message", [
    (dict(group_size=4, window=1024, max_model_len=30000), "beyond SelfExtend's extended limit 29696"),
    (dict(window=1024), "give group_size, max_model_len, or both"),
    (dict(group_size=2.5), "whole number"),
    (dict(group_size=4, window=8192), "window must be"),
    (dict(group_size=4, kv_cache_dtype="fp8"), "kv_cache_dtype='fp8' is not supported"),
    (dict(group_size=4, speculative_config={"method": "ngram"}), "speculative decoding"),
    (dict(group_size=4, pipeline_parallel_size=2), "pipeline parallelism"),
    (dict(group_size=4, decode_context_parallel_size=2), "decode context parallelism"),
])
def test_bad_settings_and_unsupported_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        engine_args(model_folder(tmp_path), **options)


@pytest.mark.parametrize("config, message", [
    ({"sliding_window": 4096}, "sliding-window attention"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window attention"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
])
def test_unsupported_models_are_refused(tmp_path, config, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        engine_args(model_folder(tmp_path, **config), group_size=4)


def test_settings_from_a_model_config_are_validated():
    assert EngineSettings.from_dict({"pretrained_length": 64, "window": 16, "group_size": 4}).limit == 208
    with pytest.raises(ValueError, match="unknown SelfExtend settings"):
        EngineSettings.from_dict({"pretrained_length": 64, "window": 16, "group_size": 4, "G": 2})
    with pytest.raises(ValueError, match="mode 'floor' only"):
        EngineSettings(64, 16, 4, mode="rerope")


def test_plugin_registers_only_when_switched_on(monkeypatch):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from selfextend.vllm.plugin import register

    AttentionBackendEnum.CPU_ATTN.clear_override()
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    register()
    assert not AttentionBackendEnum.CPU_ATTN.is_overridden()
    monkeypatch.setenv(SWITCH_ENV, "1")
    register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == "selfextend.vllm.cpu_backend.SelfExtendCPUBackend"
    AttentionBackendEnum.CPU_ATTN.clear_override()


def test_vllm_serve_prints_the_vllm_command(tmp_path, capsys):
    folder = model_folder(tmp_path)
    assert cli_main(["vllm-serve", "--model", folder, "-G", "4", "-w", "1024", "--print-command", "--",
                     "--port", "8000", "--dtype", "float32"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[:4] == [f"{SWITCH_ENV}=1", "vllm", "serve", folder]
    assert words[4:6] == ["--max-model-len", "29696"] and words[-4:] == ["--port", "8000", "--dtype", "float32"]
    overrides = json.loads(words[words.index("--hf-overrides") + 1])
    assert overrides["selfextend"] == {"pretrained_length": 8192, "window": 1024, "group_size": 4, "mode": "floor"}


def test_vllm_serve_refuses_bad_settings_in_one_line(tmp_path, capsys):
    assert cli_main(["vllm-serve", "--model", model_folder(tmp_path), "-G", "4", "--max-model-len", "99999"]) == 2
    err = capsys.readouterr().err.strip()
    w = rule_window(DEFAULT_RULE, 8192)  # the default window
    assert "\n" not in err and f"extended limit {(8192 - w) * 4 + w}" in err
