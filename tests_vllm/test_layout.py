"""The KV cache layouts of vLLM's CPU kernels, as the backend measures them: keys and values written by
vLLM's own cache writer are read back exactly, for each instruction set this machine has."""

from __future__ import annotations

import pytest
import torch
from vllm import _custom_ops as ops

from selfextend.vllm.cpu_backend import probe_layout

CASES = [("vec", torch.float32, 32), ("vec", torch.bfloat16, 32), ("vec16", torch.float32, 16)]
if torch.cpu._is_amx_tile_supported():
    CASES.append(("amx", torch.bfloat16, 32))  # what vLLM picks for bfloat16 on this CPU


@pytest.mark.parametrize("isa, dtype, block", CASES)
def test_written_keys_and_values_are_found_where_the_layout_says(isa, dtype, block):
    heads, d, blocks = 2, 64, 3
    layout = probe_layout(isa, block, heads, d, dtype, "auto")
    storage = torch.zeros(blocks, heads, 2 * block, d, dtype=dtype)
    key_cache, value_cache = storage.chunk(2, dim=2)
    n = block + 5
    keys, values = torch.randn(n, heads, d).to(dtype), torch.randn(n, heads, d).to(dtype)
    table = torch.tensor([2, 0])  # the sequence's two blocks
    slots = table[torch.arange(n) // block] * block + torch.arange(n) % block
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
    k, v = layout.gather(key_cache, value_cache, table, n)
    assert torch.equal(k.transpose(0, 1), keys) and torch.equal(v.transpose(0, 1), values)
