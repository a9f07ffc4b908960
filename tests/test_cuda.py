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
from conftest import ids_of, logits, reference_logits, tiny_model
from test_attention import KERNEL_CASES, assert_close_by_rule, decode_logits, run_kernel_case

import selfextend

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
    fast, ref64, ref_dtype, rows = run_kernel_case(case, dtype, cuda_device)
    assert fast.dtype == dtype
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

