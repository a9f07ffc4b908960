"""A model with sliding-window layers (Gemma 3: local layers with a window of 16, global layers with their
own rotary base) in vLLM: the local layers run vLLM's stock attention (a window no larger than w never
sees a grouped key), the global layers group, each request with its own G; against the transformers
path beyond L."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import L, PROMPTS, W, assert_matches, engine, generate, run_reference, save_redrawn, worker_backends

NAMES = ["long", "long3", "mid"]  # G = 4, 4, 1


def make_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Gemma 3 (one local layer, window 16 <= w; one global layer), trained length L."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    config = Gemma3TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=L,
                              sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                              query_pre_attn_scalar=32, final_logit_softcapping=None, attn_logit_softcapping=None,
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                              bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    save_redrawn(Gemma3ForCausalLM(config), folder)
    return folder


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> dict:
    folder = str(make_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3")))
    with engine(folder, enable_prefix_caching=False, max_num_batched_tokens=2048, window=W) as llm:
        outputs = {"backends": worker_backends(llm), "batch": generate(llm, NAMES)}
    outputs["reference"] = run_reference(folder, {name: PROMPTS[name] for name in NAMES})
    return outputs


def test_local_layers_run_stock_and_global_layers_selfextend(gemma3):
    assert gemma3["backends"] == [("SelfExtendCPUImpl", False)]  # layer 0 is local: no settings, stock code


def test_gemma3_beyond_L_matches_transformers(gemma3):
    for name in NAMES:
        assert_matches(gemma3["batch"][name], gemma3["reference"][name], f"gemma3 {name} ({len(PROMPTS[name])} tokens)")
