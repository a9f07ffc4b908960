"""SelfExtend inside vLLM, as a plugin of stock vLLM (no fork).

    from vllm import LLM
    from selfextend.vllm import engine_args

    llm = LLM(**engine_args("path/to/model", group_size=4, window=1024, max_model_len=29696))

``engine_args`` returns the keyword arguments for ``vllm.LLM`` (or ``EngineArgs``): the settings in
``hf_overrides`` (they reach every worker process), the RoPE table sized for ``max_model_len``, and
``max_model_len`` itself capped at SelfExtend's limit ``(L - w) * G + w``. The settings are the
switch: an engine whose config carries them runs SelfExtend or refuses to start (``plugin``). From the
command line: ``selfextend vllm-serve``, or ``vllm serve`` with the flags it prints.

Modules: ``config`` (settings, checks), ``plan`` / ``paged`` (the per-step geometry and the torch
attention), ``cpu_backend`` / ``cuda_backend`` (vLLM backends), ``plugin`` (registration),
``models`` (GGUF to a Hugging Face folder), ``serve`` (the CLI wrapper).
"""

from __future__ import annotations

import os

from .config import (
    SETTINGS_KEY,
    EngineSettings,
    UnsupportedConfigError,
    apply_overrides,
    check_engine_options,
    check_model_config,
    check_plugin_allowed,
    check_user_overrides,
    choose_settings,
    hf_overrides_for,
)
from .plugin import SWITCH_ENV, register, switch_on

__all__ = ["engine_args", "EngineSettings", "UnsupportedConfigError", "register", "SETTINGS_KEY", "SWITCH_ENV"]


def engine_args(model: str | os.PathLike, *, group_size: int | None = None, window: int | None = None,
                max_model_len: int | None = None, pretrained_length: int | None = None, rule: str | None = None,
                **other) -> dict:
    """Keyword arguments for ``vllm.LLM(...)`` / ``EngineArgs(...)`` that run SelfExtend.

    model              a local Hugging Face folder, a .gguf file or a built-in name (GGUF files are
                       dequantised once to a cached folder, see ``selfextend.vllm.models``)
    group_size         G, fixed for the engine; default: the G that ``rule`` picks for max_model_len
    rule               how that G is chosen (default "cover", the paper's, as ``selfextend.enable``; or "f=F")
    window             w, default the rule's (L // 8 for "f=F", L // 4 for "cover")
    max_model_len      longest request (prompt + output); default and maximum: (L - w) * G + w
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
    check_model_config(config)
    L = pretrained_length if pretrained_length is not None else getattr(config, "max_position_embeddings", None)
    if not isinstance(L, int):
        raise ValueError("the model config has no max_position_embeddings; pass pretrained_length=")
    settings, max_model_len = choose_settings(L, group_size, window, max_model_len, rule)
    overrides = hf_overrides_for(settings, max_model_len, user_overrides)
    if _on_cuda():
        other.setdefault("attention_backend", "FLASH_ATTN")  # the backend SelfExtend replaces there
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
