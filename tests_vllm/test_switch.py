"""The settings in the model config are the switch (``selfextend.vllm.plugin``): an engine whose config
carries them runs SelfExtend's backend or refuses to start; nothing is half on. Tested where vLLM
builds the config (the API server / ``LLM`` process) and where a worker picks the attention backend,
without starting an engine (one slow test starts one)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import ENGINE_DEFAULTS, L, LIMIT, W, G, switch_off, worker_backends

from selfextend.vllm import SWITCH_ENV
from selfextend.vllm.plugin import CPU_BACKEND

SETTINGS = {"pretrained_length": L, "window": W, "group_size": G, "rule": "cover"}
CPU_ATTN = "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"


@pytest.fixture
def folder(tmp_path, monkeypatch) -> str:
    """A tiny Llama's config.json alone (building a vLLM config reads no weights); the switch off."""
    from conftest import make_tiny_llama

    monkeypatch.delenv(SWITCH_ENV, raising=False)
    switch_off()
    make_tiny_llama(tmp_path)
    yield str(tmp_path)
    switch_off()


def vllm_config(folder: str, settings: dict | None = SETTINGS, max_model_len: int = LIMIT, table: int | None = None,
                extra: dict | None = None, **options):
    """vLLM's config for ``folder`` as ``vllm serve`` / ``LLM`` build it, with hand-written overrides."""
    from vllm.engine.arg_utils import EngineArgs

    overrides = {"max_position_embeddings": table or max_model_len, **(extra or {})}
    if settings is not None:
        overrides["selfextend"] = settings
    return EngineArgs(model=folder, skip_tokenizer_init=True, dtype="float32", max_model_len=max_model_len,
                      hf_overrides=overrides, **options).create_engine_config()


def chosen_backend(config) -> str:
    """The attention backend a worker picks for a layer of this model (as ``Attention.__init__`` does)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    with set_current_vllm_config(config):
        backend = get_attn_backend(32, torch.float32, "auto")
    return f"{backend.__module__}.{backend.__qualname__}"


def test_settings_switch_selfextend_on_where_the_config_is_built(folder):
    vllm_config(folder)
    assert os.environ.get(SWITCH_ENV) == "1"  # inherited by the engine core and workers started after


def test_settings_switch_selfextend_on_in_a_worker_the_switch_did_not_reach(folder):
    config = vllm_config(folder)
    switch_off()  # e.g. a Ray actor: vLLM does not pass SELFEXTEND_VLLM on
    assert chosen_backend(config) == CPU_BACKEND


def test_a_config_without_settings_runs_stock_attention(folder):
    config = vllm_config(folder, settings=None, max_model_len=L)
    assert SWITCH_ENV not in os.environ
    assert chosen_backend(config) == CPU_ATTN


def test_settings_with_selfextend_switched_off_are_refused(folder, monkeypatch):
    monkeypatch.setenv(SWITCH_ENV, "0")
    with pytest.raises(ValueError, match=f"{SWITCH_ENV}=0 switches SelfExtend off"):
        vllm_config(folder)  # where the config is built: before the engine starts
    monkeypatch.delenv(SWITCH_ENV)
    config = vllm_config(folder)
    switch_off()
    monkeypatch.setenv(SWITCH_ENV, "0")
    with pytest.raises(ValueError, match=f"{SWITCH_ENV}=0 switches SelfExtend off"):
        chosen_backend(config)  # where a worker picks the backend


@pytest.mark.parametrize("config, message", [
    (dict(settings={**SETTINGS, "window": L}), "invalid: window must be"),
    (dict(settings={**SETTINGS, "group_size": 1000}), "invalid: group_size must be a whole number from 1 to 64"),
    (dict(settings={**SETTINGS, "stride": 2}), "unknown SelfExtend settings"),
    (dict(max_model_len=LIMIT + 1), f"beyond SelfExtend's extended limit {LIMIT}"),
    (dict(worker_cls="my.Worker"), "worker_cls='my.Worker': SelfExtend runs with vLLM's own"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype='fp8' is not supported"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}),
     "speculative decoding"),
    (dict(extra={"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                     "original_max_position_embeddings": L}}), "rope type 'yarn'"),
])
def test_hand_written_settings_are_checked_when_the_config_is_built(folder, config, message):
    """What a `vllm serve --hf-overrides '{"selfextend": ...}'` written by hand asks for is refused
    when vLLM builds its config, seconds after start, not in the worker minutes later."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        vllm_config(folder, **config)


def test_a_rope_table_shorter_than_max_model_len_is_refused(folder, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own check is then off
    with pytest.raises(ValueError, match=f"beyond the model's RoPE table \\(max_position_embeddings={L}\\)"):
        vllm_config(folder, table=L)


@pytest.mark.slow
def test_the_printed_settings_run_selfextend_without_the_env_var(tiny_model, monkeypatch):
    """`vllm serve` with the printed --hf-overrides and no SELFEXTEND_VLLM: SelfExtend runs in the worker."""
    from vllm import LLM

    monkeypatch.delenv(SWITCH_ENV, raising=False)
    switch_off()
    llm = LLM(model=tiny_model, max_model_len=LIMIT, hf_overrides={"selfextend": SETTINGS,
                                                                   "max_position_embeddings": LIMIT},
              **ENGINE_DEFAULTS)
    try:
        assert worker_backends(llm) == [("SelfExtendCPUImpl", True)]
    finally:
        llm.llm_engine.engine_core.shutdown()
        switch_off()
