"""Tiny random models of every supported family, and the float64 SelfExtend reference
(``reference_logits``: ``selfextend.naive`` as the model's attention, G written out here). Fixtures
shared by many modules are in ``tiny_fixtures.py`` (the tiny checkpoint, the essays) and
``server_support.py`` (a served model), loaded as plugins."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from selfextend.naive import use_naive_attention

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ("tiny_fixtures", "server_support")  # fixtures every test module may use

L = 64  # pretrained length of every tiny model
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=L,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# family name -> (model_type, config overrides), shaped after each family's real config
FAMILIES = {
    "llama": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
    "llama3-rope": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 32})),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-swa": ("mistral", dict(sliding_window=24)),
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "phi3": ("phi3", dict()),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=24, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=24, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})),
    "gpt_neox": ("gpt_neox", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.25})),
    "phi": ("phi", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.5})),
    "cohere": ("cohere", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "cohere2": ("cohere2", dict(sliding_window=24, layer_types=["sliding_attention", "full_attention"],
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "glm": ("glm", dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.5})),
    "glm4": ("glm4", dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5})),
}
INTERLEAVED = {"cohere", "cohere2", "glm", "glm4"}  # model types that rotate pairs (2i, 2i + 1), written out here
FAMILY_NAMES = list(FAMILIES)


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    model_type, extra = FAMILIES[family]
    kwargs = {**COMMON, **extra, **overrides}
    if model_type == "gpt_neox":
        kwargs.pop("num_key_value_heads")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # random init is tiny; make attention sharp enough that positions matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("q_proj", "k_proj", "query_key_value", "qkv_proj")):
                p.mul_(4.0)
    return model.to(dtype).eval()


def ids_of(n, batch=1, seed=1):
    """``[batch, n]`` random token ids (no special tokens)."""
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def sequence_logits(model, ids, prefill: int, window: int):
    """Logits of one forward pass over ``ids`` with the G SelfExtend's default rule (the paper's) chooses for
    a sequence whose first call (prefill) holds ``prefill`` tokens, as a fixed G (formula written out in this
    file). What decoding after such a prefill must give while the sequence stays within that G's limit."""
    import selfextend

    g = int(auto_group(prefill - 1, L, window, rule_reach(PAPER_RULE, L)))
    assert ids.shape[1] <= (L - window) * g + window
    assert not selfextend.is_enabled(model), "compute the reference before enabling the settings under test"
    with selfextend.enable(model, group_size=g, window=window):
        return logits(model, ids)


def left_padded_pair():
    """Two sequences (150 and 110 tokens) as one left-padded batch: ``(long, short, pad, batch, mask)``."""
    long, short = ids_of(150, seed=2), ids_of(110, seed=3)
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    return long, short, pad, batch, mask


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_everywhere():
    """Tiny models run as fast on one thread, and a suite that leaves the other core alone does not
    slow down (or get slowed down by) whatever else runs on a 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


# ------------------------------------------------------------------------------------------------
# the float64 reference: selfextend.naive (the paper's formula, full score matrices) as the model's
# attention, with G per query written out here (it imports nothing of the library's position code)
# ------------------------------------------------------------------------------------------------
PAPER_RULE = "cover"  # the paper's rule, the library's default: what an automatic G follows unless a test names a rule


def rule_reach(rule: str, L: int) -> int:
    """The bound on grouped distances a rule keeps: L for "cover", int(F * L) for "f=F" (written out here,
    independently of the library's parser)."""
    return L if rule == "cover" else int(float(rule.split("=")[1]) * L)


def auto_group(p: int, L: int, w: int, reach: int | None = None) -> float:
    """G of the query at position p: 1 while p + 1 <= L, else the smallest with (reach - w) * G + w >= p + 1."""
    reach = L if reach is None else reach
    return 1.0 if p + 1 <= L else float(math.ceil((p + 1 - w) / (reach - w)))


def sequence_group(p: int, last: int, L: int, w: int, reach: int | None = None) -> float:
    """G of the query at position p of a sequence whose first forward pass ends at position ``last``: the
    rule's G for the whole sequence (last + 1 tokens) up to that G's limit (L - w) * G + w, then per position."""
    g = auto_group(last, L, w, reach)
    return g if p + 1 <= (L - w) * g + w else auto_group(p, L, w, reach)


def reference_groups(window: int, group_size, mode: str, rule: str):
    """G per query for :func:`selfextend.naive.use_naive_attention`: infinite for rerope, ``group_size``
    when fixed, else the rule's (once per sequence for SelfExtend, per position for leaky)."""
    reach = rule_reach(rule, L)

    def groups(q_pos: torch.Tensor, last: int) -> torch.Tensor:
        if mode == "rerope":
            return torch.full((len(q_pos),), math.inf, dtype=torch.float64)
        if group_size is not None:
            return torch.full((len(q_pos),), float(group_size), dtype=torch.float64)
        if mode == "floor":
            return torch.tensor([sequence_group(int(p), last, L, window, reach) for p in q_pos], dtype=torch.float64)
        return torch.tensor([auto_group(int(p), L, window, reach) for p in q_pos], dtype=torch.float64)

    return groups


def model_frequencies(model, layer_type=None) -> torch.Tensor:
    """The inverse frequencies the model rotates a layer type with right now: its rotary module's
    ``[<layer_type>_]inv_freq`` buffer (read here, not through the library)."""
    rotary = next(m for m in model.modules() if "Rotary" in type(m).__name__)
    name = f"{layer_type}_inv_freq" if layer_type is not None and hasattr(rotary, f"{layer_type}_inv_freq") else "inv_freq"
    return getattr(rotary, name).detach().double().cpu()


def reference_logits(model, input_ids, window, group_size, mode="floor", attention_mask=None, dtype=torch.float64,
                     rule=PAPER_RULE, inputs_embeds=None, grad=False):
    """Logits of ``model`` with every attention layer replaced by the float64 reference (sliding-window
    layers keep ordinary positions); an automatic G follows ``rule``. ``grad=True`` keeps autograd on
    (the reference is plain torch, differentiable)."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    interleaved = config.model_type in INTERLEAVED

    def rotary(module):
        return model_frequencies(model, layer_types[module.layer_idx] if layer_types else None), interleaved

    groups = reference_groups(window, group_size, mode, rule)
    with use_naive_attention(model, window, mode, groups, rotary, dtype=dtype), torch.set_grad_enabled(grad):
        return model(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds).logits.float()
