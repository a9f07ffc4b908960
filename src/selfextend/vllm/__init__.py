"""SelfExtend inside vLLM, as a plugin of stock vLLM (no fork).

    from vllm import LLM
    from selfextend.vllm import engine_args

    llm = LLM(**engine_args("path/to/model", max_model_len=32768))

``engine_args`` returns the keyword arguments for ``vllm.LLM`` (or ``EngineArgs``): the settings in
``hf_overrides`` (they reach every vLLM process, and they are the switch: an engine with them runs
SelfExtend or refuses to start), the RoPE table sized for ``max_model_len``. Each request gets its own
G: 1 -- vLLM's stock attention, untouched -- when its prompt plus ``max_tokens`` fits the trained
length, else the engine's fixed G or the rule's G for that length, or the G it asks for
(``SamplingParams(extra_args={"selfextend_group_size": G})``). From the command line:
``selfextend vllm-serve``, or ``vllm serve`` with the flags it prints.

Which process runs what:

    file              process              job
    __init__.py       front end            engine_args: the engine's keyword arguments
    frontend.py       front end            checks before an engine starts; each request's G and cache salt
    models.py         front end            GGUF file or built-in name -> a Hugging Face folder
    serve.py          front end            the ``vllm`` launcher (``python -m selfextend.vllm.serve``)
    settings.py       every process        the settings in the model config; the G of a request
    plugin.py         every process        the entry point: backend registration and the guards
    worker.py         worker               engine checks, layer geometry, each batch row's G per step
    plan.py           worker, per step     which rows go which way, key rotations (shared by all layers)
    rotations.py      worker               cos/sin by whole position deltas, one table per engine
    paged.py          worker               reading a request out of the paged cache; its exact attention
    cpu_kernel.py     worker (CPU)         the C++ kernels over vLLM's CPU cache: decode, prefill (csrc/)
    cpu_backend.py    worker (CPU)         the attention backend registered as CPU_ATTN
    cuda_backend.py   worker (CUDA)        the attention backend on FlashAttention (not yet run on a GPU)
    bench.py          (benchmark)          SelfExtend against plain vLLM in the same run
"""

from __future__ import annotations

import os

from .frontend import (
    apply_overrides,
    check_engine_options,
    check_model_config,
    check_plugin_allowed,
    check_user_overrides,
    engine_settings,
    hf_overrides_for,
)
from .plugin import SWITCH_ENV, register, switch_on
from .settings import GROUP_SIZE_ARG, SETTINGS_KEY, UnsupportedConfigError

__all__ = ["engine_args", "UnsupportedConfigError", "register", "SETTINGS_KEY", "SWITCH_ENV", "GROUP_SIZE_ARG"]


def engine_args(model: str | os.PathLike, *, group_size: int | None = None, window: int | None = None,
                max_model_len: int | None = None, pretrained_length: int | None = None, rule: str | None = None,
                **other) -> dict:
    """Keyword arguments for ``vllm.LLM(...)`` / ``EngineArgs(...)`` that run SelfExtend.

    model              a local Hugging Face folder, a .gguf file or a built-in name (GGUF files are
                       dequantised once to a cached folder, see ``selfextend.vllm.models``)
    group_size         G of every request longer than L (1 to 64); default: chosen per request by ``rule``
    rule               how a request's G is chosen (default "cover", the paper's, as ``selfextend.enable``;
                       or "f=F"): the G the rule picks for the request's prompt + max_tokens
    window             w, default the rule's (L // 8 for "f=F", L // 4 for "cover")
    max_model_len      longest request (prompt + output); default (L - w) * G + w for a fixed G, else 4 L;
                       at most the limit of the largest G
    pretrained_length  L, default the model's max_position_embeddings
    **other            any other vLLM engine argument, passed through; ``hf_overrides`` are merged
                       with SelfExtend's (they may not set ``selfextend`` or ``max_position_embeddings``)
                       and the model is checked with them applied

    Raises ValueError (``UnsupportedConfigError`` for unsupported models or options) naming what to
    change; nothing is switched on then. The returned settings are themselves the switch: vLLM,
    with this package installed, runs SelfExtend for them or refuses (see ``plugin``)."""
    from .models import hf_folder

    check_plugin_allowed(_vllm_plugins())
    check_engine_options(other)
    user_overrides = check_user_overrides(other.pop("hf_overrides", None))
    folder = hf_folder(model)
    config = _text_config(folder, other, user_overrides)  # as vLLM will build it
    L = pretrained_length if pretrained_length is not None else getattr(config, "max_position_embeddings", None)
    if not isinstance(L, int):
        raise ValueError("the model config has no max_position_embeddings; pass pretrained_length=")
    settings, max_model_len = engine_settings(L, group_size, window, max_model_len, rule)
    check_model_config(config, settings.window)
    overrides = hf_overrides_for(settings, max_model_len, user_overrides)
    if _on_cuda():
        other.setdefault("attention_backend", "CUSTOM")  # SelfExtend's backend there (plugin.selfextend_backend)
    switch_on()
    return {"model": str(folder), **other, "max_model_len": max_model_len, "hf_overrides": overrides}


def _text_config(folder, other: dict, overrides: dict | None):
    """The model's (text) config, as transformers reads it, with ``overrides`` applied as vLLM does."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=bool(other.get("trust_remote_code", False)))
    config = apply_overrides(config, overrides)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vllm_plugins() -> list[str] | None:
    """vLLM's plugin allow-list (``VLLM_PLUGINS``), None when every plugin loads."""
    from vllm import envs

    return envs.VLLM_PLUGINS


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()
