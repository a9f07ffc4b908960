"""The CUDA (FlashAttention) backend.

On CPU: its per-batch logic (``flash_selfextend`` with ``build_flash_plan``) runs with torch stand-ins
for FlashAttention's varlen kernel and cache writer, and vLLM's own ``merge_attn_states``, against
the float64 reference of ``test_paged.py``.

On a GPU (``-m cuda``; ``bash scripts/test-vllm.sh --gpu``): the real backend in a vLLM engine against
the transformers path, as the CPU engine tests do. These have not run yet: no GPU was available.
"""

from __future__ import annotations

import pytest
import torch
from conftest import engine, generate, greedy, max_difference, prompt_logprobs, worker_backends
from test_paged import INV_FREQ, at, reference

from selfextend.attention import attend
from selfextend.vllm.cuda_backend import FlashOps, build_flash_plan, flash_selfextend
from selfextend.vllm.rotations import RotationTable


# ------------------------------------------------------------------------------------------------
# torch stand-ins for FlashAttention (bottom-right causal mask, optional left window, paged keys)
# ------------------------------------------------------------------------------------------------


def varlen(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale, causal, return_softmax_lse, cu_seqlens_k=None,
           seqused_k=None, max_seqlen_k=None, block_table=None, window_size=None):
    assert causal and return_softmax_lse
    outs, lses = [], []
    for r in range(len(cu_seqlens_q) - 1):
        q_r = q[cu_seqlens_q[r]:cu_seqlens_q[r + 1]]
        if block_table is None:
            k_r, v_r = k[cu_seqlens_k[r]:cu_seqlens_k[r + 1]], v[cu_seqlens_k[r]:cu_seqlens_k[r + 1]]
        else:
            j = torch.arange(int(seqused_k[r]))
            blocks, offsets = block_table[r, j // k.shape[1]].long(), j % k.shape[1]
            k_r, v_r = k[blocks, offsets], v[blocks, offsets]
        n, m = q_r.shape[0], k_r.shape[0]
        last_visible = torch.arange(n)[:, None] + m - n  # bottom-right aligned causal mask
        keys = torch.arange(m)[None, :]
        mask = keys <= last_visible
        if window_size is not None:
            mask &= keys >= last_visible - window_size[0]
        out, lse = attend(q_r.transpose(0, 1), k_r.transpose(0, 1), v_r.transpose(0, 1), softmax_scale, mask)
        outs.append(out.transpose(0, 1))  # [n, Hq, D]
        lses.append(lse.transpose(0, 1))  # [n, Hq]
    return torch.cat(outs), torch.cat(lses).transpose(0, 1).contiguous()  # lse [H, T] as FlashAttention


def cache_write(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale):
    block_size = key_cache.shape[1]
    key_cache[slot_mapping // block_size, slot_mapping % block_size] = key
    value_cache[slot_mapping // block_size, slot_mapping % block_size] = value


def test_flash_path_matches_float64_reference_on_cpu():
    """One batch, each request with its own G: a prefill chunk (53 tokens cached, G = 3), a decode
    (G = 4), a whole prompt (G = 1: every move by 0) and a short prompt within the window (G = 2)."""
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    torch.manual_seed(0)
    hq, hkv, d, scale, window, block = 4, 2, 32, 32 ** -0.5, 16, 8
    table = RotationTable(INV_FREQ, 100)
    requests = [(90, 37, 3), (50, 1, 4), (40, 40, 1), (10, 10, 2)]  # (seq_len, new tokens, G)
    key_cache, value_cache = torch.zeros(40, block, hkv, d), torch.zeros(40, block, hkv, d)
    block_table = torch.zeros(len(requests), 12, dtype=torch.int32)
    free = iter(torch.randperm(39).tolist())
    queries, keys, values, slots, expected = [], [], [], [], []
    for r, (S, n, group) in enumerate(requests):
        for b in range(-(-S // block)):
            block_table[r, b] = next(free) + 1
        q_raw, k_raw, v = torch.randn(S, hq, d) * 2, torch.randn(S, hkv, d) * 2, torch.randn(S, hkv, d)
        pos = torch.arange(S)
        slot = block_table[r, pos // block].long() * block + pos % block
        cached = S - n  # earlier steps left these keys in the cache, at their grouped positions j // G
        cache_write(at(k_raw[:cached], pos[:cached] // group).float(), v[:cached], key_cache, value_cache,
                    slot[:cached], "auto", None, None)
        queries.append(at(q_raw, pos).float()[cached:])
        keys.append(at(k_raw, pos).float()[cached:])
        values.append(v[cached:])
        slots.append(slot[cached:])
        expected.append(reference(q_raw, k_raw, v, window, group, scale)[cached:])
    query_start_loc = torch.tensor([0] + [n for _, n, _ in requests]).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([S for S, _, _ in requests], dtype=torch.int32)
    groups = torch.tensor([g for _, _, g in requests], dtype=torch.int32)
    num_tokens = int(query_start_loc[-1])
    plan = build_flash_plan(groups, window, table, query_start_loc, seq_lens, block_table, block, num_tokens)
    output = torch.zeros(num_tokens, hq, d)
    flash_selfextend(FlashOps(varlen, cache_write, merge_attn_states), plan, table, torch.cat(queries),
                     torch.cat(keys), torch.cat(values), key_cache, value_cache, torch.cat(slots), query_start_loc,
                     max(n for _, n, _ in requests), block_table, window, scale, output)
    assert (output.double() - torch.cat(expected)).abs().max() < 2e-5


# ------------------------------------------------------------------------------------------------
# on a GPU: the engine against the transformers path (float16: FlashAttention has no float32)
# ------------------------------------------------------------------------------------------------

GPU_ATOL = 5e-2  # float16 activations against the float32 reference
GPU_MARGIN = 0.2


@pytest.fixture(scope="module")
def gpu_outputs(tiny_model):
    names = ["long", "long2", "long3", "mid", "short"]
    with engine(tiny_model, dtype="float16", enforce_eager=False, gpu_memory_utilization=0.3,
                enable_prefix_caching=True, max_num_batched_tokens=64) as llm:
        return {"backends": worker_backends(llm), "batch": generate(llm, names),
                "shared": generate(llm, ["shared"], prompt_logprobs=None)}


@pytest.mark.cuda
def test_gpu_engine_runs_the_selfextend_flash_backend(gpu_outputs):
    assert gpu_outputs["backends"] == [("SelfExtendFlashAttentionImpl", True)]


@pytest.mark.cuda
def test_gpu_engine_matches_transformers(gpu_outputs, reference):
    for name, output in gpu_outputs["batch"].items():
        ref = reference[name]
        assert max_difference(prompt_logprobs(output), ref["prompt_logprobs"]) < GPU_ATOL, name
        steps = next((i for i, m in enumerate(ref["margins"]) if m <= GPU_MARGIN), len(ref["margins"]))
        assert greedy(output)[0][:steps] == ref["greedy"][:steps], name


@pytest.mark.cuda
def test_gpu_prefix_cache_hit_matches_transformers(gpu_outputs, reference):
    output = gpu_outputs["shared"]["shared"]
    assert output.num_cached_tokens == 256
    ref = reference["shared"]
    steps = next((i for i, m in enumerate(ref["margins"]) if m <= GPU_MARGIN), len(ref["margins"]))
    assert greedy(output)[0][:steps] == ref["greedy"][:steps]

