"""Rotary embeddings: every rope type transformers has is either exact or refused by name; both pair
layouts (rotate-half, interleaved) rotate as the model's own code does."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import L, ids_of, reference_logits, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import selfextend
from selfextend.naive import rotate_by
from selfextend.rope import FIXED_ROPE_TYPES, LENGTH_DEPENDENT_ROPE_TYPES, Rotary, find_rotary_modules

W, G = 16, 4
# rope type -> rope_parameters of a tiny Llama (head_dim 16, L = 64) that uses it
ROPE_PARAMETERS = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 2.0, "original_max_position_embeddings": L // 2},
    "longrope": {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": L // 2},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": L // 2},
    "proportional": {"partial_rotary_factor": 0.5, "factor": 1.5},
}


def transformers_rope_types() -> list[str]:
    return ["default", *ROPE_INIT_FUNCTIONS]


def rope_model(rope_type: str):
    params = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_PARAMETERS[rope_type]}
    return tiny_model("llama", rope_parameters=params)


def test_every_rope_type_has_a_decision():
    """A rope type added to transformers fails here until SelfExtend decides on it (and this file tests it)."""
    for rope_type in transformers_rope_types():
        assert rope_type in ROPE_PARAMETERS, f"no test model for rope type {rope_type!r}"
        assert (rope_type in FIXED_ROPE_TYPES) != (rope_type in LENGTH_DEPENDENT_ROPE_TYPES), rope_type


@pytest.mark.parametrize("rope_type", transformers_rope_types())
def test_length_dependent_rope_types_are_exactly_those_that_change_with_length(rope_type):
    """Measured, not assumed: a forward pass at 4 L positions changes the frequencies of exactly the
    types the library refuses as length-dependent."""
    model = rope_model(rope_type)
    rotary = find_rotary_modules(model)[0]
    before = rotary.inv_freq.clone()
    with torch.no_grad():
        rotary(torch.zeros(1, 1, 16), torch.arange(4 * L)[None])
    changed = not torch.equal(rotary.inv_freq, before)
    assert changed == (rope_type in LENGTH_DEPENDENT_ROPE_TYPES)


@pytest.mark.parametrize("rope_type", transformers_rope_types())
def test_every_rope_type_is_exact_or_refused_by_name(rope_type):
    """Exact against the float64 reference that rotates with the frequencies the model itself uses
    (its rotary module's ``inv_freq`` after the forward pass, attention scaling inside q and k),
    past L; or refused, naming the rope type, with the model unchanged."""
    model = rope_model(rope_type)
    ids = ids_of(150)
    if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
        impl = model.config._attn_implementation
        with pytest.raises(selfextend.UnsupportedModelError, match=f"rope type '{rope_type}'"):
            selfextend.enable(model, group_size=G, window=W)
        assert model.config._attn_implementation == impl and not selfextend.is_enabled(model)
        return
    ref64 = reference_logits(model, ids, W, G)
    ref32 = reference_logits(model, ids, W, G, dtype=torch.float32)
    with selfextend.enable(model, group_size=G, window=W):
        with torch.no_grad():
            fast = model(ids).logits.float()
    assert (fast - ref64).abs().max() <= 2 * (ref32 - ref64).abs().max() + 1e-5


def test_dynamic_rope_used_to_be_silently_wrong():
    """The case the issue reported: a dynamic-NTK Llama was accepted and gave logits 0.1 off."""
    model = rope_model("dynamic")
    with pytest.raises(selfextend.UnsupportedModelError, match="recomputes its frequencies from the input length"):
        selfextend.enable(model)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_rotary_rotates_as_the_reference(interleaved):
    """Rotary.rotate_by (float32 tables from float64 angles) against the reference's float64 rotation,
    partial rotary (12 of 16 dims), positions past 30k."""
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 12, 2, dtype=torch.float64) / 12))
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    delta = torch.tensor([0.0, 1.0, 17.0, 4096.0, 32767.0])
    ours = Rotary(inv_freq, interleaved).rotate_by(x.float(), delta)
    ref = rotate_by(x, delta, inv_freq, interleaved)
    assert (ours.double() - ref).abs().max() < 1e-5
    assert torch.equal(ours[..., 12:], x[..., 12:].float())  # pass-through dims untouched


def test_rotation_supports_autograd():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    x = torch.randn(2, 4, 8, dtype=torch.float32, requires_grad=True)
    rotary = Rotary(inv_freq)
    out = rotary.rotate_by(x, torch.arange(4.0))
    with torch.no_grad():
        assert torch.equal(out, rotary.rotate_by(x, torch.arange(4.0)))  # same numbers as the fused path
    out.pow(2).sum().backward()  # a rotation keeps norms: d/dx |R x|^2 = 2 x
    assert torch.allclose(x.grad, 2 * x.detach(), atol=1e-5)


@pytest.mark.parametrize("model_type", ["gptj", "codegen"])
def test_sine_table_rotary_is_refused_for_what_it_is(model_type):
    """GPT-J and CodeGen rotate interleaved pairs from a fixed sine table: refused with that reason,
    not as "no rotary position embedding"."""
    config = AutoConfig.for_model(model_type, vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                                  rotary_dim=8, bos_token_id=1, eos_token_id=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(selfextend.UnsupportedModelError, match="fixed table of sines"):
        selfextend.enable(model)
    assert not selfextend.is_enabled(model)


@pytest.mark.parametrize("family", ["cohere", "glm"])
def test_interleaved_models_are_detected_and_shift_invariant(family):
    """Shifting every position by 500 leaves an enabled model's output as it leaves the plain model's
    (RoPE sees only distances): with the rotate-half layout assumed, Cohere moved by 3e-3, GLM by 5e-2."""
    model = tiny_model(family)
    ids = ids_of(150)
    shifted = torch.arange(150)[None] + 500
    with selfextend.enable(model, group_size=G, window=W):
        assert all(m._selfextend.rotary.interleaved for m in model.modules() if "_selfextend" in m.__dict__
                   and m is not model)
        with torch.no_grad():
            moved = (model(ids).logits - model(ids, position_ids=shifted).logits).abs().max()
    assert moved < 1e-5
