"""The SelfExtend attention backend for vLLM on CUDA, over vLLM's FlashAttention (``FLASH_ATTN``).

NOT RUN ON A GPU YET: no GPU was available where this was written. The logic in
:func:`flash_selfextend` is tested on CPU with torch stand-ins for the three FlashAttention calls
(``tests_vllm/test_cuda_backend.py``); ``bash scripts/test-vllm.sh --gpu`` runs the real thing.

Per step, for every request (prefill, chunk or decode alike; see ``plan.FlashPlan``):

1. new keys rotated to their grouped positions, written with ``reshape_and_cache_flash``;
2. grouped part: ``flash_attn_varlen_func`` over the paged cache, query at ``qg(p)``,
   ``seqused_k = S - w``, causal, ``return_softmax_lse=True``: one stock pass over the cache;
3. neighbor part: the last ``n + w - 1`` keys gathered, moved back to ordinary positions,
   ``flash_attn_varlen_func`` causal with window ``w``: O(w) per request;
4. the two parts merged by log-sum-exp (``merge_attn_states``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .paged import rotated
from .plan import FlashPlan


@dataclass(frozen=True)
class FlashOps:
    """The three kernels the CUDA path calls (vLLM's on a GPU; torch stand-ins in CPU tests)."""

    varlen: Callable      # flash_attn_varlen_func(q, k, v, ..., return_softmax_lse=True) -> (out, lse [H, T])
    cache_write: Callable  # reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, dtype, ks, vs)
    merge: Callable       # merge_attn_states(output, out_a, lse_a, out_b, lse_b)


def flash_selfextend(ops: FlashOps, plan: FlashPlan, query, key, value, key_cache, value_cache, slot_mapping,
                     query_start_loc, max_query_len: int, block_table, window: int, scale: float, output,
                     kv_cache_dtype: str = "auto", k_scale=None, v_scale=None):
    """SelfExtend attention of one batch over the paged cache ``key_cache/value_cache
    [blocks, B, Hkv, D]``; writes ``output[:T]`` and returns it."""
    n = plan.num_tokens
    ops.cache_write(rotated(key[:n], plan.key_rotation), value[:n], key_cache, value_cache, slot_mapping[:n],
                    kv_cache_dtype, k_scale, v_scale)
    neighbor_k = rotated(key_cache[plan.neighbor_blocks, plan.neighbor_offsets], plan.neighbor_rotation)
    neighbor_v = value_cache[plan.neighbor_blocks, plan.neighbor_offsets]  # [K, Hkv, D]
    neighbor_out, neighbor_lse = ops.varlen(
        q=query[:n], k=neighbor_k, v=neighbor_v, cu_seqlens_q=query_start_loc, max_seqlen_q=max_query_len,
        cu_seqlens_k=plan.neighbor_cu_seqlens, max_seqlen_k=plan.max_neighbor, softmax_scale=scale, causal=True,
        window_size=[window - 1, 0], return_softmax_lse=True)
    if plan.max_grouped == 0:  # every request still within its window
        output[:n] = neighbor_out
        return output
    grouped_out, grouped_lse = ops.varlen(
        q=rotated(query[:n], plan.query_rotation), k=key_cache, v=value_cache, cu_seqlens_q=query_start_loc,
        max_seqlen_q=max_query_len, seqused_k=plan.grouped_seq_lens, max_seqlen_k=plan.max_grouped,
        softmax_scale=scale, causal=True, block_table=block_table, return_softmax_lse=True)
    ops.merge(output[:n], grouped_out, grouped_lse, neighbor_out, neighbor_lse)
    return output


def _vllm_flash_ops(fa_version: int) -> FlashOps:
    """vLLM's own kernels (CUDA build only)."""
    from functools import partial

    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, reshape_and_cache_flash
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    return FlashOps(partial(flash_attn_varlen_func, fa_version=fa_version), reshape_and_cache_flash,
                    merge_attn_states)


def _backend_classes():
    """Build the backend classes (imports vLLM's FlashAttention module, which needs its CUDA build)."""
    from vllm.config import get_current_vllm_config
    from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )

    from .engine import check_layer, check_vllm_config, engine_settings, find_geometry
    from .plan import build_flash_plan

    class SelfExtendFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
        """FlashAttention metadata plus the step's SelfExtend plan; no CUDA graphs around attention
        (the plan is rebuilt on the host every step)."""

        _cudagraph_support = AttentionCGSupport.NEVER

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self.selfextend = engine_settings(vllm_config)
            self.geometry = None if self.selfextend is None else find_geometry(
                vllm_config, self.selfextend, kv_cache_spec.head_size)

        def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
            metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
            metadata.selfextend_plan = None
            if self.selfextend is not None:
                seq_lens = common_attn_metadata.seq_lens_cpu_upper_bound
                if seq_lens is None:
                    seq_lens = common_attn_metadata.seq_lens.cpu()
                metadata.selfextend_plan = build_flash_plan(
                    self.geometry, common_attn_metadata.query_start_loc_cpu, seq_lens, metadata.block_table,
                    self.kv_cache_spec.block_size, common_attn_metadata.num_actual_tokens)
            return metadata

    class SelfExtendFlashAttentionImpl(FlashAttentionImpl):
        """FlashAttention with SelfExtend when the model config asks for it, stock otherwise."""

        def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                     logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                     sinks=None):
            super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                             logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
            vllm_config = get_current_vllm_config()
            self.selfextend = engine_settings(vllm_config)
            if self.selfextend is not None:
                check_vllm_config(vllm_config, self.selfextend)
                check_layer(sliding_window, alibi_slopes, logits_soft_cap, sinks, attn_type,
                             kv_sharing_target_layer_name)
                self.flash_ops = _vllm_flash_ops(self.vllm_flash_attn_version)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    output_scale=None, output_block_scale=None):
            if attn_metadata is None:
                return output.fill_(0)
            if self.selfextend is None:  # plain model: the stock path (cache write, then attention)
                self.do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.slot_mapping)
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                       output_scale, output_block_scale)
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError("fused output quantization is not supported with SelfExtend")
            key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
            return flash_selfextend(
                self.flash_ops, attn_metadata.selfextend_plan, query, key, value, key_cache, value_cache,
                attn_metadata.slot_mapping, attn_metadata.query_start_loc, attn_metadata.max_query_len,
                attn_metadata.block_table, self.selfextend.window, self.scale, output, self.kv_cache_dtype,
                layer._k_scale, layer._v_scale)

    class SelfExtendFlashAttentionBackend(FlashAttentionBackend):
        """``FLASH_ATTN`` with SelfExtend; writes the KV cache inside ``forward`` (it needs positions)."""

        forward_includes_kv_cache_update: bool = True

        @staticmethod
        def get_impl_cls():
            return SelfExtendFlashAttentionImpl

        @staticmethod
        def get_builder_cls():
            return SelfExtendFlashAttentionMetadataBuilder

    return SelfExtendFlashAttentionBackend, SelfExtendFlashAttentionImpl, SelfExtendFlashAttentionMetadataBuilder


def __getattr__(name: str):
    """The backend classes are built on first access: importing this module needs no CUDA."""
    if name in ("SelfExtendFlashAttentionBackend", "SelfExtendFlashAttentionImpl",
                "SelfExtendFlashAttentionMetadataBuilder"):
        backend, impl, builder = _backend_classes()
        classes = {"SelfExtendFlashAttentionBackend": backend, "SelfExtendFlashAttentionImpl": impl,
                   "SelfExtendFlashAttentionMetadataBuilder": builder}
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
