"""A vLLM CPU paged KV cache holding given keys and values, written by vLLM's own writer.

``PagedCache(keys, values, block_size, dtype)`` allocates the tensor vLLM 0.32's CPU backend allocates,
``[num_blocks, Hkv, 2B, D]`` (keys in the first B rows of each page, values in the last B), hands out
blocks in a shuffled order (a request's blocks are not adjacent, as in a running engine), and stores
every key and value with ``vllm._custom_ops.cpu_attn_reshape_and_cache`` -- so the layout the tests
read is vLLM's, whatever it is, not a copy of it. Slots no request uses hold random numbers, or NaN
every 97th element with ``poison=True`` (a kernel that reads past a request's keys shows it).
"""

from __future__ import annotations

import math

import pytest
import torch

BLOCKS = (16, 32, 128)
DTYPES = (torch.float32, torch.bfloat16)


def kernel_grid(cases: dict, big: dict) -> list:
    """Every case at every block size and dtype, plus the engine-sized cases (block 128, marked slow)."""
    grid = [pytest.param(name, block, dtype, id=f"{name}-B{block}-{str(dtype)[6:]}") for name in cases
            for block in BLOCKS for dtype in DTYPES]
    return grid + [pytest.param(name, 128, dtype, id=f"{name}-B128-{str(dtype)[6:]}", marks=pytest.mark.slow)
                   for name in big for dtype in DTYPES]


def cold_copies(n_req: int, seq: int, hkv: int, d: int, block: int, dtype: torch.dtype, generator: torch.Generator,
                megabytes: float = 160) -> list[PagedCache]:
    """Enough caches of n_req random requests of seq keys each to total >= megabytes, so that a
    benchmark cycling through them does not find the previous call's keys hot in the CPU cache."""
    nbytes = n_req * seq * hkv * d * 2 * torch.tensor([], dtype=dtype).element_size()
    caches = []
    for c in range(max(1, math.ceil(megabytes * 1e6 / nbytes))):
        keys = [torch.randn(seq, hkv, d, generator=generator) for _ in range(n_req)]
        values = [torch.randn(seq, hkv, d, generator=generator) for _ in range(n_req)]
        caches.append(PagedCache(keys, values, block, dtype, extra_blocks=0, seed=c))
    return caches


def built_kernels():
    """selfextend.vllm.cpu_kernel, compiled here if setup-vllm.sh has not; skips, saying why, when it
    cannot be built on this machine."""
    from selfextend.vllm import cpu_kernel

    try:
        cpu_kernel.build()
    except RuntimeError as error:
        pytest.skip(f"the CPU kernels are unavailable here: {error}")
    return cpu_kernel


class PagedCache:
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], block_size: int, dtype: torch.dtype,
                 extra_blocks: int = 8, seed: int = 0, poison: bool = False):
        """keys / values: per request ``[S_n, Hkv, D]`` (keys as they are to be stored)."""
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        generator = torch.Generator().manual_seed(seed)
        hkv, d = keys[0].shape[1], keys[0].shape[2]
        lens = [k.shape[0] for k in keys]
        blocks = [-(-s // block_size) for s in lens]
        total = sum(blocks) + extra_blocks
        self.kv = torch.randn(total, hkv, 2 * block_size, d, generator=generator).to(dtype)
        if poison:
            self.kv.view(-1)[::97] = float("nan")
        order = torch.randperm(total, generator=generator)
        self.block_table = torch.zeros(len(keys), max(max(blocks), 1), dtype=torch.int32)
        at = 0
        for n, b in enumerate(blocks):
            self.block_table[n, :b] = order[at: at + b].to(torch.int32)
            at += b
        self.key_cache, self.value_cache = self.kv.chunk(2, dim=2)  # [num_blocks, Hkv, B, D] views
        self.isa = _get_attn_isa(dtype, block_size, d)
        for n, (k, v) in enumerate(zip(keys, values)):
            j = torch.arange(k.shape[0])
            slots = self.block_table[n, j // block_size].long() * block_size + j % block_size
            ops.cpu_attn_reshape_and_cache(k.to(dtype).contiguous(), v.to(dtype).contiguous(), self.key_cache,
                                           self.value_cache, slots, self.isa)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32)
        self.block_size = block_size

    def checksum(self) -> str:
        """Hash of every byte of the cache (NaNs included)."""
        import hashlib

        return hashlib.sha256(self.kv.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    def stock(self, query: torch.Tensor, scale: float, metadata=None,
              query_start_loc: torch.Tensor | None = None) -> torch.Tensor:
        """vLLM's stock CPU kernel: plain causal attention of ``query [T, Hq, D]``, request n's queries
        being rows ``query_start_loc[n] .. [n + 1] - 1`` (default: one decoding query per request)."""
        from vllm import _custom_ops as ops

        starts = self.starts(query_start_loc)
        if metadata is None:
            metadata = self.metadata(query.shape[1], query.dtype, starts)
        out = torch.empty_like(query)
        ops.cpu_attention_with_kv_cache(query=query, key_cache=self.key_cache, value_cache=self.value_cache,
                                        output=out, query_start_loc=starts,
                                        seq_lens=self.seq_lens, scale=scale, causal=True, alibi_slopes=None,
                                        sliding_window=-1, block_table=self.block_table, softcap=0,
                                        scheduler_metadata=metadata,
                                        s_aux=None)
        return out

    def starts(self, query_start_loc: torch.Tensor | None = None) -> torch.Tensor:
        n = len(self.seq_lens)
        return torch.arange(n + 1, dtype=torch.int32) if query_start_loc is None else query_start_loc

    def metadata(self, num_heads: int, dtype: torch.dtype, query_start_loc: torch.Tensor | None = None):
        """vLLM's scheduler metadata for ``stock`` (vLLM builds it once per step for all layers)."""
        from vllm import _custom_ops as ops

        n = len(self.seq_lens)
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=n, num_heads=num_heads, num_kv_heads=self.key_cache.shape[1], head_dim=self.key_cache.shape[3],
            seq_lens=self.seq_lens, dtype=dtype, query_start_loc=self.starts(query_start_loc),
            causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=True)
