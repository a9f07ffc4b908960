"""Tiny random models of every supported family, and a float64 SelfExtend reference wired into
transformers as its own attention implementation (``selfextend_reference``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

sys.path.insert(0, str(Path(__file__).parent))
from reference import reference_attention  # noqa: E402

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
    """Logits of one forward pass over ``ids`` with the G SelfExtend's default rule chooses for a sequence
    whose first call (prefill) holds ``prefill`` tokens, as a fixed G (formula written out in this file).
    What decoding after such a prefill must give while the sequence stays within that G's limit."""
    import selfextend
    from selfextend.positions import DEFAULT_RULE

    g = int(auto_group(prefill - 1, L, window, rule_reach(DEFAULT_RULE, L)))
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
# the float64 reference as a transformers attention implementation
# ------------------------------------------------------------------------------------------------
REFERENCE = {"settings": None, "dtype": torch.float64}


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


def _reference_mask(**kwargs):
    return sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """No-cache forward only: key j is token j, at position position_ids[b, j]."""
    s = REFERENCE["settings"]  # dict(L, w, G, mode, inv_freq: {layer_idx: tensor})
    b_, hq, lq, d = query.shape
    out = torch.empty(b_, hq, lq, value.shape[-1], dtype=query.dtype)
    pos_ids = kwargs["position_ids"].expand(b_, -1)
    sliding = kwargs.get("sliding_window") is not None  # local layers keep ordinary attention
    for b in range(b_):
        pos = pos_ids[b]
        mask = attention_mask[b, 0]  # [Lq, Lk] bool, causal & padding (& sliding)
        if sliding:
            groups = torch.ones(lq)
            w = 10**9
        else:
            w = s["w"]
            groups = torch.tensor([s["G"] if s["G"] is not None else sequence_group(int(p), int(pos.max()), s["L"], w,
                                                                                      s["reach"])
                                   for p in pos],
                                  dtype=torch.float64)
        o = reference_attention(query[b], key[b], value[b], pos, pos, s["inv_freq"][module.layer_idx], w, groups,
                                s["mode"] if not sliding else "floor", scaling, softcap=kwargs.get("softcap"),
                                dtype=REFERENCE["dtype"], interleaved=s["interleaved"])
        # apply padding/sliding mask by recomputing on masked rows: reference handles causality by
        # positions; padding keys must be excluded explicitly
        if not bool(mask.all() or torch.equal(mask, torch.ones_like(mask).tril())):
            o = _masked_reference(query[b], key[b], value[b], pos, s, module, w, groups, scaling, kwargs, mask,
                                  sliding)
        out[b] = o.to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _masked_reference(q, k, v, pos, s, module, w, groups, scaling, kwargs, mask, sliding):
    # rows: keys allowed by the boolean mask only (padding / sliding window)
    rows = []
    for i in range(q.shape[1]):
        keep = mask[i]
        if not keep.any():
            rows.append(torch.zeros(q.shape[0], 1, v.shape[-1], dtype=torch.float64))
            continue
        rows.append(reference_attention(q[:, i : i + 1], k[:, keep], v[:, keep], pos[i : i + 1], pos[keep],
                                        s["inv_freq"][module.layer_idx], w, groups[i : i + 1],
                                        s["mode"] if not sliding else "floor", scaling,
                                        softcap=kwargs.get("softcap"), dtype=REFERENCE["dtype"],
                                        interleaved=s["interleaved"]))
    return torch.cat(rows, dim=1)


AttentionInterface.register("selfextend_reference", _reference_attention)
AttentionMaskInterface.register("selfextend_reference", _reference_mask)


def model_frequencies(model, layer_type=None) -> torch.Tensor:
    """The inverse frequencies the model rotates a layer type with right now: its rotary module's
    ``[<layer_type>_]inv_freq`` buffer (read here, not through the library)."""
    rotary = next(m for m in model.modules() if "Rotary" in type(m).__name__)
    name = f"{layer_type}_inv_freq" if layer_type is not None and hasattr(rotary, f"{layer_type}_inv_freq") else "inv_freq"
    return getattr(rotary, name).detach().double().cpu()


def reference_logits(model, input_ids, window, group_size, mode="floor", attention_mask=None, dtype=torch.float64,
                     rule=None, inputs_embeds=None, grad=False):
    """Logits of ``model`` with every full-attention layer replaced by the float64 reference; an automatic
    G follows ``rule`` (default: the library's default for SelfExtend, "cover" for the other modes).
    ``grad=True`` keeps autograd on (the reference is plain torch, differentiable)."""
    from selfextend.positions import DEFAULT_RULE

    rule = rule or (DEFAULT_RULE if mode == "floor" else "cover")
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    inv = {i: model_frequencies(model, layer_types[i] if layer_types else None) for i in range(config.num_hidden_layers)}
    REFERENCE["settings"] = dict(L=L, w=window, G=(math.inf if mode == "rerope" else group_size), mode=mode,
                                 inv_freq=inv, reach=rule_reach(rule, L), interleaved=config.model_type in INTERLEAVED)
    REFERENCE["dtype"] = dtype
    original = model.config._attn_implementation
    model.set_attn_implementation("selfextend_reference")
    try:
        with torch.set_grad_enabled(grad):
            return model(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds).logits.float()
    finally:
        model.set_attn_implementation(original)
