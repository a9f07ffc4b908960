"""The invariants on a CUDA GPU: the fused kernels there (torch's memory-efficient SDPA op, which
returns the log-sum-exp) against the float64 reference, decoding, and the model end to end.

Not part of the default suite (marker ``cuda``); run them with ``bash scripts/gpu.sh`` or
``pytest -m cuda`` on a machine with a GPU. They fail, not skip, where CUDA is missing, so a GPU run
that silently tested nothing cannot pass. They have not yet run on a GPU (none was available where
this code was written).
"""

from __future__ import annotations

import pytest
import torch
from conftest import reference_logits, tiny_model
from reference import reference_attention
from test_attention import KERNEL_CASES, assert_close_by_rule, decode_logits, ids_of, logits

import selfextend
from selfextend.attention import selfextend_row
from selfextend.settings import Settings

pytestmark = pytest.mark.cuda
W = 16
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def cuda_device():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU (torch.cuda.is_available() is False)"
    torch.manual_seed(0)
    yield torch.device("cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[3]}-Lq{c[0]}-Lk{c[1]}-off{c[2]}")
def test_kernel_matches_reference_on_cuda(case, dtype, cuda_device):
    lq, lk, off, mode, g, softcap, log_scale, block = case
    hq, hkv, d, w, Lp = 6, 2, 32, 24, 96
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 24, 2).float() / 24))
    q = (torch.randn(hq, lq, d) * 2).to(dtype)
    k = (torch.randn(hkv, lk, d) * 2).to(dtype)
    v = torch.randn(hkv, lk, d).to(dtype)
    settings = Settings(Lp, w, g, mode, log_scale, block)
    first = (lk - 1 - off) - (lq - 1)
    fast = selfextend_row(q.to(cuda_device), k.to(cuda_device), v.to(cuda_device), first, off, settings,
                          inv_freq.to(cuda_device), d**-0.5, softcap).cpu()
    q_pos, k_pos = torch.arange(first, first + lq), torch.arange(lk) - off
    groups = torch.tensor([1.0 if settings.is_plain(int(p)) else float(settings.group_size_at(int(p)))
                           for p in q_pos.clamp(min=0)])
    args = (q, k, v, q_pos, k_pos, inv_freq, w, groups, mode, d**-0.5)
    kw = dict(softcap=softcap, key_valid=k_pos >= 0, log_scale_length=Lp if log_scale else None)
    rows = q_pos >= 0
    ref64 = reference_attention(*args, **kw)[:, rows]
    ref_dtype = reference_attention(*args, **kw, dtype=dtype)[:, rows]
    assert_close_by_rule(fast[:, rows], ref64, ref_dtype, eps=1e-3 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_matches_reference_on_cuda(family, dtype, cuda_device):
    model = tiny_model(family, dtype)
    ids = ids_of(150)
    ref64 = reference_logits(model, ids, W, None)
    ref_dtype = reference_logits(model, ids, W, None, dtype=dtype)
    model = model.to(cuda_device)
    with selfextend.enable(model, window=W):
        fast = logits(model, ids.to(cuda_device)).cpu()
    assert_close_by_rule(fast, ref64, ref_dtype, eps=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decode_matches_full_forward_on_cuda(family, cuda_device):
    model = tiny_model(family).to(cuda_device)
    ids = ids_of(140).to(cuda_device)
    with selfextend.enable(model, window=W):
        full = logits(model, ids)
        stepped = decode_logits(model, ids, 100)
    assert (stepped - full).abs().max().item() <= 1e-4


def test_generate_equals_the_argmax_of_one_forward_on_cuda(cuda_device):
    model = tiny_model("llama").to(cuda_device)
    prompt = ids_of(120).to(cuda_device)
    with selfextend.enable(model, window=W):
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        full = logits(model, out)
    assert torch.equal(out[0, prompt.shape[1]:], full[0, prompt.shape[1] - 1 : -1].argmax(-1))


@pytest.mark.parametrize("implementation", ["offloaded", "offloaded_static"])
def test_offloaded_caches_on_cuda(implementation, cuda_device):
    model = tiny_model("llama").to(cuda_device)
    prompt = ids_of(120).to(cuda_device)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with selfextend.enable(model, window=W):
        dynamic = model.generate(prompt, **kwargs)
        other = model.generate(prompt, cache_implementation=implementation, **kwargs)
    assert torch.equal(other, dynamic)

