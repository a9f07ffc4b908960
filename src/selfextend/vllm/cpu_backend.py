"""The SelfExtend attention backend for vLLM on CPU, registered in place of ``CPU_ATTN`` (worker process).

vLLM's CPU platform always picks ``CPU_ATTN``; the plugin points that name at this subclass when
switched on. A step whose rows all have G = 1 -- every request that fits the trained length, every
model without SelfExtend settings, every sliding-window layer whose window is at most w -- runs the
stock implementation unchanged: the same metadata, the same cache writes, the same kernel.

A step with rows of G > 1 (see ``plan.py``):

1. the new keys of those rows are rotated to their grouped positions (a table lookup, no trig) and
   every new key and value is written with vLLM's own cache writer;
2. rows with G = 1: vLLM's stock kernel over the paged cache (a sub-batch);
3. rows with G > 1 that decode: the C++ decode kernel (``cpu_kernel.decode``) over the paged cache;
4. the other rows with G > 1 (prefill, chunks, recompute): the C++ prefill kernel
   (``cpu_kernel.prefill``) over the paged cache, one call for all of them.

Both kernels only read the cache. Without them (no AVX-512, a geometry they are not built for, the
``amx`` cache layout, or ``SELFEXTEND_VLLM_KERNEL=torch``; the builder says why, once) every row with
G > 1 gathers its request's keys and runs the library's kernel (``paged.attend_request``).

Nothing in the cache changes during a step except the new keys.
"""

from __future__ import annotations

import dataclasses
import logging
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

from ..settings import Settings
from . import cpu_kernel
from .paged import CacheLayout, attend_request
from .plan import StepPlan, build_plan
from .rotations import RotationTable
from .settings import UnsupportedConfigError
from .worker import check_layer, check_vllm_config, engine_settings, global_inv_freq, groups_layer

logger = logging.getLogger(__name__)


@dataclass
class SelfExtendCPUMetadata(CPUAttentionMetadata):
    """The stock CPU metadata plus this step's SelfExtend plan and what the layers share to run it."""

    plan: StepPlan | None = None
    table: RotationTable | None = None
    layout: CacheLayout | None = None
    kernel: bool = False  # the C++ kernels (cpu_kernel) serve this layer's rows with G > 1


class SelfExtendCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds the stock metadata, then, when some row of the step has G > 1, the step plan shared by
    every layer. ``request_groups`` (the G of each row) is set by the model runner each step
    (``worker.RequestGroups``)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.request_groups: torch.Tensor | None = None
        settings = engine_settings(vllm_config)
        window = None if self.window_size == -1 else self.window_size
        self.settings = settings if settings is not None and groups_layer(settings, window) else None
        if self.settings is not None:
            inv_freq = global_inv_freq(vllm_config, self.head_dim)
            self.table = RotationTable(inv_freq, vllm_config.model_config.max_model_len)
            self.layout = probe_layout(self.isa, self.block_size, self.num_kv_heads, self.head_dim, self.dtype,
                                       self.kv_cache_dtype)
            self.kernel_refusal = cpu_kernel.unsupported(self.dtype, self.head_dim, self.num_heads,
                                                         self.num_kv_heads, self.block_size, self.isa)
            if self.kernel_refusal is None and not cpu_kernel.available():
                self.kernel_refusal = cpu_kernel.reason()
            if self.kernel_refusal is not None:
                logger.warning("SelfExtend: rows with G > 1 gather each request's keys (exact, slower) instead of "
                               "using the C++ kernels: %s", self.kernel_refusal)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        groups = self.request_groups
        if self.settings is None or groups is None or not bool((groups[:num_reqs] > 1).any()):
            return metadata  # every row plain: vLLM's own metadata and path
        plan = build_plan(groups[:num_reqs], metadata.query_start_loc, metadata.seq_lens, metadata.block_table,
                          metadata.num_actual_tokens)
        if plan.plain is not None:
            plan = dataclasses.replace(plan, plain=dataclasses.replace(plan.plain, kernel_metadata=self._scheduler(
                plan.plain.query_start_loc, plan.plain.seq_lens)))
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        return SelfExtendCPUMetadata(**fields, plan=plan, table=self.table, layout=self.layout,
                                     kernel=self.kernel_refusal is None)

    def _scheduler(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor):
        """The stock kernel's scheduler metadata for a sub-batch."""
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.numel(), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype, query_start_loc=query_start_loc,
            causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=self.kv_cache_dtype)


class SelfExtendCPUImpl(CPUAttentionBackendImpl):
    """CPU attention with SelfExtend for rows with G > 1, stock otherwise."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        vllm_config = get_current_vllm_config()
        settings = engine_settings(vllm_config)
        self.settings: Settings | None = settings if settings is not None and groups_layer(settings, sliding_window) \
            else None
        if settings is not None:
            check_vllm_config(vllm_config, settings)
        if self.settings is not None:
            check_layer(alibi_slopes, logits_soft_cap, sinks, attn_type, kv_sharing_target_layer_name)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:  # profiling run
            return output
        plan: StepPlan | None = getattr(attn_metadata, "plan", None)
        if self.settings is None or plan is None:  # every row plain: exactly the stock path
            if self.attn_type not in (AttentionType.ENCODER_ONLY, AttentionType.ENCODER):
                self.do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.slot_mapping)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported with SelfExtend")
        n = plan.num_tokens
        key_cache, value_cache = _split(kv_cache)
        self._write_keys(layer, key[:n], value[:n], key_cache, value_cache, attn_metadata, plan)
        if plan.plain is not None:
            self._plain(layer, query, key_cache, value_cache, plan.plain, output)
        for rows, kernel in ((plan.decode, self._decode), (plan.general, self._general)):
            if rows is None:
                continue
            if attn_metadata.kernel:
                kernel(query, key_cache, value_cache, attn_metadata, rows, output)
            else:  # (the builder said why, once)
                for request in rows.requests():
                    self._gathered(query, key_cache, value_cache, attn_metadata, *request, output)
        return output

    # -- the steps ------------------------------------------------------------------------------------

    def _write_keys(self, layer, key, value, key_cache, value_cache, metadata, plan: StepPlan) -> None:
        """Store the new keys (rows with G > 1: rotated to their grouped positions) and values."""
        if plan.grouped_tokens.numel():
            key = key.clone()
            key[plan.grouped_tokens] = metadata.table.rotate(key[plan.grouped_tokens], plan.key_delta)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, metadata.slot_mapping[: plan.num_tokens],
                                       layer.isa, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                                       kv_cache_dtype=self.kv_cache_dtype)

    def _plain(self, layer, query, key_cache, value_cache, rows, output) -> None:
        """vLLM's stock kernel for the rows with G = 1."""
        q, out = _rows_of(query, output, rows, self.num_heads, self.head_size)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=rows.query_start_loc, seq_lens=rows.seq_lens, scale=self.scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=rows.block_table, softcap=0,
            scheduler_metadata=rows.kernel_metadata, s_aux=None, k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
        _write_back(output, out, rows)

    def _decode(self, query, key_cache, value_cache, metadata, rows, output) -> None:
        """The rows with G > 1 that decode one token: the decode kernel, reading the cache as stored."""
        q, out = _rows_of(query, output, rows, self.num_heads, self.head_size)
        cpu_kernel.decode(q, key_cache, value_cache, rows.block_table, rows.seq_lens, rows.group_size,
                          self.settings.window, self.scale, metadata.table, out=out)
        _write_back(output, out, rows)

    def _general(self, query, key_cache, value_cache, metadata, rows, output) -> None:
        """The other rows with G > 1 (prefill, chunks, recompute): the prefill kernel, one call for all."""
        q, out = _rows_of(query, output, rows, self.num_heads, self.head_size)
        cpu_kernel.prefill(q, key_cache, value_cache, rows.query_start_loc, rows.seq_lens, rows.block_table,
                           rows.group_size, self.settings.window, self.scale, metadata.table, out=out)
        _write_back(output, out, rows)

    def _gathered(self, query, key_cache, value_cache, metadata, row, first_token, num_tokens, seq_len, group,
                  output) -> None:
        """Exact SelfExtend attention of one request's new tokens over its gathered cache (no kernels)."""
        block_size = key_cache.shape[2]
        blocks = metadata.block_table[row, : -(-seq_len // block_size)].long()
        k_stored, v = metadata.layout.gather(key_cache, value_cache, blocks, seq_len)  # [Hkv, S, D]
        settings = dataclasses.replace(self.settings, group_size=group)
        t0, t1 = first_token, first_token + num_tokens
        output[t0:t1] = attend_request(query[t0:t1], k_stored, v, settings, metadata.table, self.scale).view(
            output[t0:t1].shape)


def _rows_of(query, output, rows, num_heads: int, head_size: int):
    """The sub-batch's queries ``[T', Hq, D]`` and where its outputs go: views of the step's tensors when
    its tokens are one run, else a copy of the queries and a new output tensor (see :func:`_write_back`)."""
    q = rows.span(query)
    if q is None:
        return query[rows.tokens], torch.empty((rows.tokens.numel(), num_heads, head_size), dtype=query.dtype)
    return q, rows.span(output).view(-1, num_heads, head_size)


def _write_back(output, out, rows) -> None:
    if rows.start is None:
        output[rows.tokens] = out.view(output[rows.tokens].shape)


class SelfExtendCPUBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with SelfExtend; writes the KV cache inside ``forward`` (it needs each row's G)."""

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
