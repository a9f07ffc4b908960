"""Inside a running engine: SelfExtend's settings from vLLM's config, the checks that refuse what is
not supported, and the model's own rotary frequencies.

Runs in every worker process (the settings arrived there inside the model config).
"""

from __future__ import annotations

import torch

from .config import EngineSettings, UnsupportedConfigError, check_engine_options, check_model_config, \
    settings_from_config
from .paged import Geometry


def engine_settings(vllm_config) -> EngineSettings | None:
    """The engine's SelfExtend settings, or None when its model config carries none."""
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return None
    return settings_from_config(model_config.hf_config)


def check_vllm_config(vllm_config, settings: EngineSettings) -> None:
    """Refuse engines SelfExtend cannot serve exactly; each error names the option to change."""
    check_model_config(vllm_config.model_config.hf_config)
    parallel = vllm_config.parallel_config
    check_engine_options({
        "kv_cache_dtype": vllm_config.cache_config.cache_dtype,
        "speculative_config": vllm_config.speculative_config,
        "kv_transfer_config": vllm_config.kv_transfer_config,
        "decode_context_parallel_size": parallel.decode_context_parallel_size,
        "pipeline_parallel_size": parallel.pipeline_parallel_size,
    })
    max_len = vllm_config.model_config.max_model_len
    if max_len > settings.limit:
        raise UnsupportedConfigError(
            f"max_model_len={max_len} is beyond SelfExtend's extended limit {settings.limit} "
            f"({settings.describe()}); pass --max-model-len {settings.limit} or less")
    model_config = vllm_config.model_config
    table = getattr(getattr(model_config, "hf_text_config", None) or model_config.hf_config,
                    "max_position_embeddings", None)
    if isinstance(table, int) and table < max_len:  # possible with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1
        raise UnsupportedConfigError(
            f"max_model_len={max_len} is beyond the model's RoPE table (max_position_embeddings={table}); "
            f"set max_position_embeddings to {max_len} in hf_overrides (engine_args and vllm-serve do)")


def check_layer(sliding_window, alibi_slopes, logits_soft_cap, sinks, attn_type, kv_sharing) -> None:
    """Refuse attention-layer features SelfExtend does not reproduce (arguments of an AttentionImpl)."""
    from vllm.v1.attention.backend import AttentionType

    problems = {
        "sliding-window layers": sliding_window is not None,
        "ALiBi": alibi_slopes is not None,
        "attention logit soft-capping": bool(logits_soft_cap),
        "attention sinks": sinks is not None,
        f"attention type {attn_type!r} (decoder self-attention only)": attn_type != AttentionType.DECODER,
        "cross-layer KV cache sharing": kv_sharing is not None,
    }
    for what, present in problems.items():
        if present:
            raise UnsupportedConfigError(f"SelfExtend in vLLM does not support {what}")


def find_geometry(vllm_config, settings: EngineSettings, head_size: int) -> Geometry:
    """SelfExtend's geometry with the inverse frequencies of the rotary embedding the model built.

    vLLM keeps every rotary embedding it creates in ``rotary_embedding._ROPE_DICT``; the model's is
    the one with its head size (and RoPE table length). Only plain rotations in the
    ``rotate_half`` (GPT-NeoX) layout are accepted, since SelfExtend moves keys by rotating them."""
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding

    table = getattr(vllm_config.model_config.hf_config, "max_position_embeddings", None)
    candidates = [rope for rope in _ROPE_DICT.values() if rope.head_size == head_size]
    if any(rope.max_position_embeddings == table for rope in candidates):
        candidates = [rope for rope in candidates if rope.max_position_embeddings == table]
    if not candidates:
        raise UnsupportedConfigError("SelfExtend found no rotary embedding in this model (it needs RoPE)")
    for rope in candidates:
        if type(rope) not in (RotaryEmbedding, Llama3RotaryEmbedding):
            raise UnsupportedConfigError(f"rotary embedding {type(rope).__name__} is not supported "
                                         "(supported: plain and llama3 RoPE)")
        if not rope.is_neox_style:
            raise UnsupportedConfigError("GPT-J style (interleaved) rotary embeddings are not supported")
    inv_freqs = {tuple(rope._compute_inv_freq(rope.base).tolist()) for rope in candidates}
    if len(inv_freqs) != 1:
        raise UnsupportedConfigError("this model uses several different rotary embeddings; not supported")
    inv_freq = torch.tensor(inv_freqs.pop(), dtype=torch.float32)
    return Geometry(settings.window, settings.group_size, inv_freq)
