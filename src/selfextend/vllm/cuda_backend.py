"""The SelfExtend attention backend for vLLM on CUDA, over vLLM's FlashAttention (worker process),
registered as vLLM's ``CUSTOM`` attention backend (``engine_args`` selects it on CUDA).

NOT RUN ON A GPU YET: no GPU was available where this was written. The logic in
:func:`flash_selfextend` is tested on CPU with torch stand-ins for the FlashAttention calls
(``tests_vllm/test_cuda_backend.py``); ``bash scripts/test-vllm.sh --gpu`` runs the real thing.

A step whose rows all have G = 1 runs vLLM's stock FlashAttention path. Otherwise, per step, for every
request (prefill, chunk or decode alike, each with its own G; G = 1 rows too, for which every move
below is by 0 positions; see :class:`FlashPlan`):

1. new keys rotated to their grouped positions, written with ``reshape_and_cache_flash``;
2. grouped part: ``flash_attn_varlen_func`` over the paged cache as stored, query at ``qg(p)``,
   ``seqused_k = S - w``, causal, ``return_softmax_lse=True``: one stock pass over the cache;
3. neighbour part: the last ``n + w - 1`` keys gathered (a copy: the cache is never written), moved
   back to their own positions, ``flash_attn_varlen_func`` causal with window ``w``: O(w) per request;
4. the two parts merged by log-sum-exp (``merge_attn_states``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .rotations import RotationTable


@dataclass(frozen=True)
class FlashOps:
    """The three kernels the CUDA path calls (vLLM's on a GPU; torch stand-ins in CPU tests)."""

    varlen: Callable      # flash_attn_varlen_func(q, k, v, ..., return_softmax_lse=True) -> (out, lse [H, T])
    cache_write: Callable  # reshape_and_cache_flash(key, value, key_cache, value_cache, slot_mapping, dtype, ks, vs)
    merge: Callable       # merge_attn_states(output, out_a, lse_a, out_b, lse_b)


@dataclass(frozen=True)
class FlashPlan:
    """One step of the FlashAttention backend (tensors on the model's device).

    grouped part   query at qg(p), paged cache as stored, ``seqused_k = S - w``: with FlashAttention's
                   bottom-right causal mask, the query at ``p`` sees keys ``0 .. p - w``
    neighbour part query at p, the keys ``f .. S - 1`` of each request gathered and moved back to
                   their own positions (``f = max(0, S - n - w + 1)``), causal with window ``w``"""

    num_tokens: int
    key_rotation: tuple              # cos/sin [T, 1, rd/2]: new keys to their grouped positions
    query_rotation: tuple            # cos/sin [T, 1, rd/2]: queries to their grouped query positions
    grouped_seq_lens: torch.Tensor   # [R] int32, max(0, S - w)
    max_grouped: int
    neighbor_blocks: torch.Tensor    # [K] long
    neighbor_offsets: torch.Tensor   # [K] long
    neighbor_rotation: tuple         # cos/sin [K, 1, rd/2]: kg(j) back to j
    neighbor_cu_seqlens: torch.Tensor  # [R + 1] int32
    max_neighbor: int


def build_flash_plan(groups: torch.Tensor, window: int, table: RotationTable, query_start_loc: torch.Tensor,
                     seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int,
                     num_tokens: int) -> FlashPlan:
    """The FlashAttention plan from the rows' ``groups [R]`` and CPU copies of the batch metadata;
    ``block_table`` may live on the device, where the plan's tensors go."""
    device = block_table.device
    starts, lens, g = query_start_loc.long(), seq_lens.long(), groups.long()
    queries = starts[1:] - starts[:-1]
    token_rows = torch.repeat_interleave(torch.arange(len(lens)), queries)
    pos = lens[token_rows] - queries[token_rows] + torch.arange(num_tokens) - starts[token_rows]  # [T]
    tg = g[token_rows]
    key_delta = torch.div(pos, tg, rounding_mode="floor") - pos  # kg(p) - p
    query_delta = key_delta + window - torch.div(torch.full_like(tg, window), tg, rounding_mode="floor")  # qg(p) - p
    first = (lens - queries - window + 1).clamp(min=0)  # first neighbour key of each request
    counts = lens - first
    owner = torch.repeat_interleave(torch.arange(len(lens)), counts)
    j = first[owner] + torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    back = j - torch.div(j, g[owner], rounding_mode="floor")  # j - kg(j)
    grouped = (lens - window).clamp(min=0)
    to = lambda cos_sin: tuple(t[:, None].to(device, non_blocking=True) for t in cos_sin)  # noqa: E731
    owner_d, j_d = owner.to(device), j.to(device)
    return FlashPlan(
        num_tokens=num_tokens, key_rotation=to(table.lookup(key_delta)), query_rotation=to(table.lookup(query_delta)),
        grouped_seq_lens=grouped.to(device, torch.int32), max_grouped=int(grouped.max()) if len(grouped) else 0,
        neighbor_blocks=block_table[owner_d, torch.div(j_d, block_size, rounding_mode="floor")].long(),
        neighbor_offsets=j_d % block_size, neighbor_rotation=to(table.lookup(back)),
        neighbor_cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device, torch.int32),
        max_neighbor=int(counts.max()) if len(counts) else 0)


def flash_selfextend(ops: FlashOps, plan: FlashPlan, table: RotationTable, query, key, value, key_cache, value_cache,
                     slot_mapping, query_start_loc, max_query_len: int, block_table, window: int, scale: float,
                     output, kv_cache_dtype: str = "auto", k_scale=None, v_scale=None):
    """SelfExtend attention of one batch over the paged cache ``key_cache/value_cache
    [blocks, B, Hkv, D]``; writes ``output[:T]`` and returns it."""
    n = plan.num_tokens
    rotate = table.rotary.rotate
    ops.cache_write(rotate(key[:n], *plan.key_rotation), value[:n], key_cache, value_cache, slot_mapping[:n],
                    kv_cache_dtype, k_scale, v_scale)
    neighbor_k = rotate(key_cache[plan.neighbor_blocks, plan.neighbor_offsets], *plan.neighbor_rotation)
    neighbor_v = value_cache[plan.neighbor_blocks, plan.neighbor_offsets]  # [K, Hkv, D]
    neighbor_out, neighbor_lse = ops.varlen(
        q=query[:n], k=neighbor_k, v=neighbor_v, cu_seqlens_q=query_start_loc, max_seqlen_q=max_query_len,
        cu_seqlens_k=plan.neighbor_cu_seqlens, max_seqlen_k=plan.max_neighbor, softmax_scale=scale, causal=True,
        window_size=[window - 1, 0], return_softmax_lse=True)
    if plan.max_grouped == 0:  # every request still within its window
        output[:n] = neighbor_out
        return output
    grouped_out, grouped_lse = ops.varlen(
        q=rotate(query[:n], *plan.query_rotation), k=key_cache, v=value_cache, cu_seqlens_q=query_start_loc,
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

    from .worker import check_layer, check_vllm_config, engine_settings, global_inv_freq, groups_layer

    class SelfExtendFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
        """FlashAttention metadata plus, when some row of the step has G > 1, the step's SelfExtend plan;
        no CUDA graphs around attention (the plan is rebuilt on the host every step). ``request_groups``
        (the G of each row) is set by the model runner each step (``worker.RequestGroups``)."""

        _cudagraph_support = AttentionCGSupport.NEVER

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)
            self.request_groups = None
            settings = engine_settings(vllm_config)
            window = getattr(kv_cache_spec, "sliding_window", None)
            self.selfextend = settings if settings is not None and groups_layer(settings, window) else None
            if self.selfextend is not None:
                self.table = RotationTable(global_inv_freq(vllm_config, kv_cache_spec.head_size),
                                           vllm_config.model_config.max_model_len)

        def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
            metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
            metadata.selfextend_plan = None
            num_reqs = common_attn_metadata.num_reqs
            groups = self.request_groups
            if self.selfextend is None or groups is None or not bool((groups[:num_reqs] > 1).any()):
                return metadata  # every row plain: vLLM's own FlashAttention path
            seq_lens = common_attn_metadata.seq_lens_cpu_upper_bound
            if seq_lens is None:
                seq_lens = common_attn_metadata.seq_lens.cpu()
            metadata.selfextend_plan = build_flash_plan(
                groups[:num_reqs], self.selfextend.window, self.table, common_attn_metadata.query_start_loc_cpu,
                seq_lens[:num_reqs], metadata.block_table, self.kv_cache_spec.block_size,
                common_attn_metadata.num_actual_tokens)
            metadata.selfextend_table = self.table
            return metadata

    class SelfExtendFlashAttentionImpl(FlashAttentionImpl):
        """FlashAttention with SelfExtend for steps with rows of G > 1, stock otherwise."""

        def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                     logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                     sinks=None):
            super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                             logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
            vllm_config = get_current_vllm_config()
            settings = engine_settings(vllm_config)
            self.selfextend = settings if settings is not None and groups_layer(settings, sliding_window) else None
            if settings is not None:
                check_vllm_config(vllm_config, settings)
            if self.selfextend is not None:
                check_layer(alibi_slopes, logits_soft_cap, sinks, attn_type, kv_sharing_target_layer_name)
                self.flash_ops = _vllm_flash_ops(self.vllm_flash_attn_version)

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    output_scale=None, output_block_scale=None):
            if attn_metadata is None:
                return output.fill_(0)
            plan = getattr(attn_metadata, "selfextend_plan", None)
            if self.selfextend is None or plan is None:  # every row plain: the stock path (cache write, attention)
                self.do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.slot_mapping)
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                       output_scale, output_block_scale)
            if output_scale is not None or output_block_scale is not None:
                raise NotImplementedError("fused output quantization is not supported with SelfExtend")
            key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # as vLLM splits it
            return flash_selfextend(
                self.flash_ops, plan, attn_metadata.selfextend_table, query, key, value, key_cache, value_cache,
                attn_metadata.slot_mapping, attn_metadata.query_start_loc, attn_metadata.max_query_len,
                attn_metadata.block_table, self.selfextend.window, self.scale, output, self.kv_cache_dtype,
                layer._k_scale, layer._v_scale)

    class SelfExtendFlashAttentionBackend(FlashAttentionBackend):
        """FlashAttention with SelfExtend, registered as ``CUSTOM``; writes the KV cache inside ``forward``
        (it needs each row's G)."""

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
