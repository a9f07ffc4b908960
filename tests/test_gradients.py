"""Gradients through SelfExtend: the same logits as without autograd, and the gradients of the float64
reference (the merged score matrix written out naively, differentiated by torch) within the usual
tolerance rule."""

from __future__ import annotations

import pytest
import torch
from conftest import ids_of, reference_logits, tiny_model

import selfextend
from selfextend.attention import attend

W, G, N = 16, 4, 150  # L = 64: 150 tokens need grouping


def embeddings_and_weights(model, ids):
    """Input embeddings (a leaf that requires grad) and fixed random weights for the logits."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    weights = torch.randn(1, ids.shape[1], model.config.vocab_size, generator=torch.Generator().manual_seed(3))
    return embeds, weights


def grad_of_inputs(run, model, ids):
    """d(sum(logits * weights)) / d(input embeddings) for the logits ``run(embeds)`` returns."""
    embeds, weights = embeddings_and_weights(model, ids)
    (run(embeds) * weights).sum().backward()
    return embeds.grad


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi", "cohere"])
def test_gradients_past_L_match_reference(family):
    """Backward through an enabled model (eval mode, grad on, past L) gives the gradients of the
    float64 reference: error at most twice the float32 reference's, plus 1e-6. Softcapping (Gemma 2),
    partial rotary (Phi) and interleaved pairs (Cohere) included."""
    model = tiny_model(family)
    ids = ids_of(N)
    ref64 = grad_of_inputs(lambda e: reference_logits(model, None, W, G, inputs_embeds=e, grad=True), model, ids)
    ref32 = grad_of_inputs(lambda e: reference_logits(model, None, W, G, inputs_embeds=e, grad=True,
                                                      dtype=torch.float32), model, ids)
    with selfextend.enable(model, group_size=G, window=W):
        fast = grad_of_inputs(lambda e: model(inputs_embeds=e).logits, model, ids)
    assert fast.abs().max() > 0
    assert (fast - ref64).abs().max() <= 2 * (ref32 - ref64).abs().max() + 1e-6


def test_logits_with_autograd_equal_logits_without():
    """Autograd takes out-of-place twins of the in-place kernels: the same operations, the same bits."""
    model = tiny_model("llama")
    ids = ids_of(N)
    with selfextend.enable(model, group_size=G, window=W):
        with torch.no_grad():
            plain = model(ids).logits
        with_grad = model(ids).logits
        assert with_grad.requires_grad
        assert torch.equal(with_grad.detach(), plain)
        with_grad.sum().backward()  # parameters receive gradients
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().max() > 0


@pytest.mark.parametrize("how", ["mask", "causal", "softcap", "none"])
def test_attend_gradients_through_out_and_lse(how):
    """attend() returns the log-sum-exp that weighs it in a merge; its gradient flows through both
    outputs (the fused kernel's own backward ignores the log-sum-exp). Against float64 autograd of the
    explicit formula, GQA with 3 query heads per key head."""
    torch.manual_seed(0)
    q = torch.randn(6, 9, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(1)) > 0.3 if how == "mask" else None
    softcap = 2.0 if how == "softcap" else None
    causal = how == "causal"
    d_out, d_lse = torch.randn(6, 9, 8, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)

    def explicit(q, k, v):
        s = q @ k.repeat_interleave(3, 0).transpose(-1, -2) * 0.3
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        allowed = mask if mask is not None else torch.ones(9, 9, dtype=torch.bool).tril() if causal else None
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
        return p @ v.repeat_interleave(3, 0), lse

    grads = []
    for fn in (lambda q, k, v: attend(q.float(), k.float(), v.float(), 0.3, mask, softcap, causal), explicit):
        out, lse = fn(q, k, v)
        finite = torch.isfinite(lse)
        loss = (out.double() * d_out).sum() + (lse.double()[finite] * d_lse[finite]).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for ours, theirs in zip(*grads):
        assert (ours - theirs).abs().max() < 1e-4
