"""engine_args, the plugin switch and `selfextend vllm-serve`, without starting an engine."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from selfextend.cli import main as cli_main
from selfextend.positions import DEFAULT_RULE, rule_window
from selfextend.vllm import SWITCH_ENV, UnsupportedConfigError, engine_args
from selfextend.vllm.settings import engine_limit, from_dict


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
        "selfextend": {"pretrained_length": 8192, "window": 1024, "group_size": 4, "rule": "cover"},
        "max_position_embeddings": limit}}
    assert os.environ[SWITCH_ENV] == "1"  # worker processes started from here inherit the switch


def test_without_a_group_size_each_request_gets_the_rules_g(tmp_path):
    """No G for the engine: the rule picks each request's (settings.request_group); the engine serves 4 L."""
    kwargs = engine_args(model_folder(tmp_path), rule="f=0.5")
    assert kwargs["hf_overrides"]["selfextend"] == {"pretrained_length": 8192, "window": 1024, "group_size": None,
                                                    "rule": "f=0.5"}
    assert kwargs["max_model_len"] == 4 * 8192
    kwargs = engine_args(model_folder(tmp_path), max_model_len=20000)
    assert kwargs["hf_overrides"]["selfextend"]["rule"] == "cover" and kwargs["max_model_len"] == 20000


def test_user_hf_overrides_are_kept(tmp_path):
    kwargs = engine_args(model_folder(tmp_path), group_size=2, hf_overrides={"rms_norm_eps": 1e-5})
    assert kwargs["hf_overrides"]["rms_norm_eps"] == 1e-5 and "selfextend" in kwargs["hf_overrides"]


@pytest.mark.parametrize("options, message", [
    (dict(group_size=4, window=1024, max_model_len=30000), "max_model_len=30000: input has 30000 tokens but "
                                                           "SelfExtend's extended limit is 29696 tokens"),
    (dict(group_size=4, rule="cover"), "give group_size=4 or rule='cover', not both"),
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
    assert engine_limit(from_dict({"pretrained_length": 64, "window": 16, "group_size": 4})) == 208
    with pytest.raises(ValueError, match="unknown SelfExtend settings"):
        from_dict({"pretrained_length": 64, "window": 16, "group_size": 4, "G": 2})
    with pytest.raises(ValueError, match="mode 'floor' only"):
        from_dict({"pretrained_length": 64, "window": 16, "mode": "rerope"})


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


def vllm_sees(words: list[str]):
    """What ``vllm serve`` makes of a command line (``vllm serve ...`` words): vLLM's own parser, set
    up as its ``main`` sets it up."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert words[:2] == ["vllm", "serve"], words
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    return parser.parse_args(words[1:])


def printed_command(capsys, folder: str, *argv: str) -> list[str]:
    assert cli_main(["vllm-serve", "--model", folder, "--print-command", *argv]) == 0
    return shlex.split(capsys.readouterr().out)


SETTINGS_G4 = {"pretrained_length": 8192, "window": 1024, "group_size": 4, "rule": "cover"}


def test_vllm_serve_prints_the_vllm_command(tmp_path, capsys):
    folder = model_folder(tmp_path)
    words = printed_command(capsys, folder, "-G", "4", "-w", "1024", "--", "--port", "8000", "--dtype", "float32")
    assert words[:3] == ["vllm", "serve", folder]  # no environment variable: the settings are the switch
    assert words[3:5] == ["--max-model-len", "29696"] and words[-4:] == ["--port", "8000", "--dtype", "float32"]
    seen = vllm_sees(words)
    assert seen.model_tag == folder and seen.max_model_len == 29696 and seen.port == 8000
    assert seen.hf_overrides == {"selfextend": SETTINGS_G4, "max_position_embeddings": 29696}


@pytest.mark.parametrize("user", [
    ["--hf-overrides", '{"rms_norm_eps": 1e-05}'],
    ["--hf-overrides={\"rms_norm_eps\": 1e-05}"],
    ["--hf_overrides", '{"rms_norm_eps": 1e-05}'],
    ["--hf-overrides.rms_norm_eps", "1e-05"],
])
def test_vllm_serve_merges_user_hf_overrides_into_the_settings(tmp_path, capsys, user):
    """Before: the user's later --hf-overrides replaced SelfExtend's, and vLLM served plain attention."""
    folder = model_folder(tmp_path)
    words = printed_command(capsys, folder, "-G", "4", "-w", "1024", "--", "--port", "8000", *user)
    assert vllm_sees(words).hf_overrides == {"rms_norm_eps": 1e-05, "selfextend": SETTINGS_G4,
                                             "max_position_embeddings": 29696}
    assert sum(w.replace("_", "-").startswith("--hf-overrides") for w in words) == 1


@pytest.mark.parametrize("user, message", [
    (["--hf-overrides", '{"selfextend": {"window": 512}}'], "already has a 'selfextend' entry"),
    (["--hf-overrides.selfextend.window", "512"], "already has a 'selfextend' entry"),
    (["--hf-overrides", '{"max_position_embeddings": 65536}'], "sets 'max_position_embeddings'"),
    (["--max-model-len", "99999"], "--max-model-len 99999 is given after --"),
    (["--max-model-len=32k"], "--max-model-len 32000 is given after --"),
    (["/some/other/model"], "vllm serve options after --: unrecognized arguments: /some/other/model"),
    (["--model", "/some/other/model"], "--model is given after --"),
    (["--model=/some/other/model"], "--model is given after --"),
    (["--no-such-option"], "vllm serve options after --: unrecognized arguments: --no-such-option"),
])
def test_vllm_serve_refuses_what_conflicts_with_its_own_flags(tmp_path, capsys, user, message):
    assert cli_main(["vllm-serve", "--model", model_folder(tmp_path), "-G", "4", "--print-command", "--", *user]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and err.startswith("selfextend vllm-serve: error: ")
    assert message in err


def test_engine_args_refuse_user_hf_overrides_of_selfextends_keys(tmp_path):
    with pytest.raises(ValueError, match="already has a 'selfextend' entry"):
        engine_args(model_folder(tmp_path), group_size=4, hf_overrides={"selfextend": SETTINGS_G4})
    with pytest.raises(ValueError, match="sets 'max_position_embeddings'"):
        engine_args(model_folder(tmp_path), group_size=4, hf_overrides={"max_position_embeddings": 65536})


@pytest.mark.parametrize("argv, message", [
    (["-G", "100000"], "must be a whole number from 1 to 64"),
    (["-G", "4", "--", "--kv-cache-dtype", "fp8"], "kv_cache_dtype='fp8' is not supported"),
    (["-G", "4", "--", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'],
     "speculative decoding"),
    (["-G", "4", "--", "--pipeline-parallel-size", "2"], "pipeline parallelism"),
    (["-G", "4", "--", "--hf-overrides", '{"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, '
                                         '"factor": 4.0, "original_max_position_embeddings": 8192}}'],
     "rope type 'yarn'"),
    (["-G", "4", "--", "--hf-overrides", '{"sliding_window": 4096}'], "sliding-window attention"),
    (["-G", "4", "-w", "8192"], "window must be"),
    (["-G", "4", "--max-model-len", "99999"], "SelfExtend's extended limit is"),
])
def test_vllm_serve_refuses_unsupported_settings_before_vllm_starts(tmp_path, capsys, argv, message):
    """Before: accepted here, refused in the worker minutes later ("Engine core initialization failed")."""
    assert cli_main(["vllm-serve", "--model", model_folder(tmp_path), "--print-command", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


@pytest.mark.parametrize("overrides, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "original_max_position_embeddings": 8192}}, "rope type 'yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope type 'dynamic'"),
    ({"sliding_window": 4096}, "sliding-window attention"),
])
def test_engine_args_check_the_model_with_the_users_hf_overrides(tmp_path, overrides, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        engine_args(model_folder(tmp_path), group_size=4, hf_overrides=overrides)


@pytest.mark.parametrize("overrides", [
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                         "original_max_position_embeddings": 8192}},
    {"rope_scaling": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    {"sliding_window": 4096, "rms_norm_eps": 1e-5},
    {"layer_types": ["sliding_attention", "full_attention"]},
])
def test_overrides_are_applied_as_vllm_applies_them(tmp_path, overrides, monkeypatch):
    """The front end checks the model with the overrides applied by ``config.apply_overrides``: what
    it checks (rope, sliding window, layer types) equals the config vLLM builds from the same overrides."""
    from transformers import AutoConfig
    from vllm.engine.arg_utils import EngineArgs

    from selfextend.vllm.frontend import apply_overrides

    monkeypatch.setenv(SWITCH_ENV, "0")  # no SelfExtend settings here; vLLM just builds the config
    folder = model_folder(tmp_path)
    ours = apply_overrides(AutoConfig.from_pretrained(folder), overrides)
    theirs = EngineArgs(model=folder, skip_tokenizer_init=True, hf_overrides=overrides,
                        max_model_len=8192).create_engine_config().model_config.hf_config
    for name in ("rope_parameters", "rope_scaling", "sliding_window", "layer_types", "rms_norm_eps"):
        assert getattr(ours, name, None) == getattr(theirs, name, None), name


def test_engine_args_refuse_a_plugin_allow_list_without_selfextend(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "lora_resolver")
    with pytest.raises(UnsupportedConfigError, match="leaves out the 'selfextend' plugin"):
        engine_args(model_folder(tmp_path), group_size=4)


def test_vllm_serve_refuses_bad_settings_in_one_line(tmp_path, capsys):
    assert cli_main(["vllm-serve", "--model", model_folder(tmp_path), "-G", "4", "--max-model-len", "99999"]) == 2
    err = capsys.readouterr().err.strip()
    w = rule_window(DEFAULT_RULE, 8192)  # the default window
    assert "\n" not in err and f"extended limit is {(8192 - w) * 4 + w} tokens" in err
