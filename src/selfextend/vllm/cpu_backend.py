"""The SelfExtend attention backend for vLLM on CPU, registered in place of ``CPU_ATTN``.

vLLM's CPU platform always picks ``CPU_ATTN``; the plugin points that name at this subclass when
switched on. For a model whose config carries no ``selfextend`` settings every call goes to the
stock implementation unchanged, so one process can serve plain and SelfExtend engines.

Per step (see ``plan.py`` for the geometry):

1. new keys are rotated to their grouped positions and written with vLLM's own cache writer;
2. decoding requests: their neighbor keys are moved in place for this step, one pass of vLLM's
   paged CPU kernel over the whole cache gives the exact result, the saved keys are written back;
3. other requests (prefill, chunked prefill, recompute, the rare shared-slot decode): their keys
   are gathered and attended in blocks with torch's flash kernel, parts merged by log-sum-exp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from .config import EngineSettings, UnsupportedConfigError
from .paged import CacheLayout, rotated, selfextend_attention
from .plan import StepPlan, build_plan
from .engine import check_layer, check_vllm_config, engine_settings, find_geometry


@dataclass
class SelfExtendCPUMetadata(CPUAttentionMetadata):
    """The stock CPU metadata plus this step's SelfExtend plan (None for a plain model)."""

    plan: StepPlan | None = None


class SelfExtendCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds the stock metadata, then the step plan shared by every layer."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.settings = engine_settings(vllm_config)
        if self.settings is not None:
            self.geometry = find_geometry(vllm_config, self.settings, self.head_dim)
            self.layout = probe_layout(self.isa, self.block_size, self.num_kv_heads, self.head_dim, self.dtype,
                                       self.kv_cache_dtype)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.settings is None:
            return metadata
        plan = build_plan(self.geometry, metadata.query_start_loc, metadata.seq_lens, metadata.block_table,
                          self.block_size, metadata.num_actual_tokens)
        plan.layout = self.layout
        if plan.decode is not None:
            plan.decode.tail_cos, plan.decode.tail_sin = self.layout.orient(plan.decode.tail_cos, plan.decode.tail_sin)
        if plan.decode is not None:
            if len(plan.decode.rows) == common_attn_metadata.num_reqs:
                plan.decode.kernel_metadata = metadata.scheduler_metadata  # the whole batch decodes
            else:
                plan.decode.kernel_metadata = ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=len(plan.decode.rows), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim, seq_lens=plan.decode.seq_lens, dtype=self.dtype,
                    query_start_loc=plan.decode.query_start_loc, causal=True, sliding_window_size=-1,
                    isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                    kv_cache_dtype=self.kv_cache_dtype)
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        return SelfExtendCPUMetadata(**fields, plan=plan)


class SelfExtendCPUImpl(CPUAttentionBackendImpl):
    """CPU attention with SelfExtend when the model config asks for it, stock otherwise."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        vllm_config = get_current_vllm_config()
        self.settings: EngineSettings | None = engine_settings(vllm_config)
        if self.settings is not None:
            check_vllm_config(vllm_config, self.settings)
            check_layer(sliding_window, alibi_slopes, logits_soft_cap, sinks, attn_type,
                         kv_sharing_target_layer_name)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:  # profiling run
            return output
        if self.settings is None:  # plain model: exactly the stock path
            if self.attn_type not in (AttentionType.ENCODER_ONLY, AttentionType.ENCODER):
                self.do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.slot_mapping)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with SelfExtend")
        plan: StepPlan = attn_metadata.plan
        n = plan.num_tokens
        key_cache, value_cache = _split(kv_cache)
        self._write_grouped_keys(layer, key[:n], value[:n], key_cache, value_cache, attn_metadata.slot_mapping[:n],
                                 plan)
        q_grouped = rotated(query[:n], plan.query_rotation)
        if plan.decode is not None:
            self._decode(layer, q_grouped, key_cache, value_cache, plan, output)
        for request in plan.general:
            self._attend_request(query, q_grouped, key_cache, value_cache, attn_metadata, plan, request, output)
        return output

    # -- the three steps ---------------------------------------------------------------------------

    def _write_grouped_keys(self, layer, key, value, key_cache, value_cache, slot_mapping, plan) -> None:
        """Store the new tokens' keys rotated to their grouped positions, and their values."""
        ops.cpu_attn_reshape_and_cache(rotated(key, plan.key_rotation), value, key_cache, value_cache, slot_mapping,
                                       layer.isa, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                                       kv_cache_dtype=self.kv_cache_dtype)

    def _decode(self, layer, q_grouped, key_cache, value_cache, plan: StepPlan, output) -> None:
        """One stock kernel pass for every decoding request on the fast path (see ``plan.py``)."""
        d = plan.decode
        saved = key_cache[d.tail_blocks]  # [Mb, Hkv, B, D]: the blocks holding neighbor keys (a copy)
        key_cache[d.tail_blocks] = plan.layout.rotate_key_pages(saved, d.tail_cos, d.tail_sin)
        try:
            n = len(d.rows)
            query = q_grouped[:n] if d.is_prefix else q_grouped[d.tokens]
            out = output[:n] if d.is_prefix else torch.empty_like(query)
            ops.cpu_attention_with_kv_cache(
                query=query, key_cache=key_cache, value_cache=value_cache, output=out,
                query_start_loc=d.query_start_loc, seq_lens=d.seq_lens, scale=self.scale, causal=True,
                alibi_slopes=None, sliding_window=-1, block_table=d.block_table, softcap=0,
                scheduler_metadata=d.kernel_metadata, s_aux=None, k_scale=layer._k_scale_float,
                v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
            if not d.is_prefix:
                output[d.tokens] = out
        finally:
            key_cache[d.tail_blocks] = saved

    def _attend_request(self, query, q_grouped, key_cache, value_cache, metadata, plan, request, output) -> None:
        """Exact SelfExtend attention of one request's new tokens over its gathered cache."""
        S, block_size = request.seq_len, key_cache.shape[2]
        blocks = metadata.block_table[request.index, : -(-S // block_size)].long()
        k_grouped, v = plan.layout.gather(key_cache, value_cache, blocks, S)  # [Hkv, S, D]
        first, back = plan.neighbor_rotation(request)
        k_neighbor = rotated(k_grouped[:, first:].transpose(0, 1), back).transpose(0, 1)
        t0, t1 = request.first_token, request.first_token + request.num_tokens
        output[t0:t1] = selfextend_attention(query[t0:t1], q_grouped[t0:t1], k_grouped, k_neighbor, v,
                                             self.settings.window, self.scale)


class SelfExtendCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with SelfExtend; writes the KV cache inside ``forward`` (it needs the positions)."""

    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_impl_cls():
        return SelfExtendCPUImpl

    @staticmethod
    def get_builder_cls():
        return SelfExtendCPUMetadataBuilder


def _split(kv_cache: torch.Tensor):
    """``[blocks, Hkv, B, 2 * D]`` -> key and value caches ``[blocks, Hkv, B, D]`` (views)."""
    blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, dim=2)


def probe_layout(isa: str, block_size: int, num_kv_heads: int, head_size: int, dtype, kv_cache_dtype) -> CacheLayout:
    """Measure where vLLM's CPU cache writer puts element ``(slot t, dim d)`` of a key and of a value
    inside a block, by writing small integers (exact in every float dtype) and reading pages back."""
    storage = torch.zeros(1, num_kv_heads, 2 * block_size, head_size, dtype=dtype)
    key_cache, value_cache = storage.chunk(2, dim=2)
    slots = torch.arange(block_size, dtype=torch.long)
    shape = (block_size, num_kv_heads, head_size)
    pages = {}
    for name, pattern in (("t", torch.arange(block_size)[:, None, None]), ("d", torch.arange(head_size))):
        storage.zero_()
        probe = (pattern.expand(shape) + 1).to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(probe, probe, key_cache, value_cache, slots, isa, kv_cache_dtype=kv_cache_dtype)
        pages[name] = (key_cache[0, 0].reshape(-1).long() - 1, value_cache[0, 0].reshape(-1).long() - 1)
    indexes = []
    for which in (0, 1):  # keys, values
        flat = pages["t"][which] * head_size + pages["d"][which]  # plain offset of what each element holds
        if not torch.equal(torch.sort(flat).values, torch.arange(block_size * head_size)):
            raise UnsupportedConfigError(f"cannot map vLLM's CPU KV cache layout (isa {isa!r}, {dtype})")
        index = torch.empty_like(flat)
        index[flat] = torch.arange(flat.numel())
        indexes.append(index.view(block_size, head_size))
    return CacheLayout(*indexes)
