"""STRING and DCA (``selfextend.peers``) against their formulas, in float64, on tiny models.

The reference here is written from the papers' position maps alone: for every pair (i, j) it rotates
the query by ``P[i, j] - (i - j)`` (q and k arrive rotated at i and j, so the pair is then scored at
relative position ``P[i, j]``), builds the full score matrix, one softmax per row. ``P`` comes from the
tables of the official code (ChunkLlama's ``q_t``, ``qc_t``, ``k_t``; STRING's shifted query positions),
rebuilt here with tensors as that code builds them, not from ``peers.formulas``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import L, ids_of, logits, model_frequencies, tiny_model
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from selfextend import peers
from selfextend.peers.formulas import DcaSettings, StringSettings
from selfextend.sequence import prompt_length

S, W = 21, 5  # STRING on the tiny models (L = 64): S = int(0.33 * L); W < S (the paper's 128 needs L > 388)


# ------------------------------------------------------------------------------------------------
# position tables, as the official code builds them
# ------------------------------------------------------------------------------------------------
def string_table(n: int, shift: int, local: int) -> torch.Tensor:
    """``P [n, n]`` of STRING: the diagonal part (flash window) at i - j, the shifted part with the query
    at ``position_ids - diag_size + local_window`` (string_for_llama.py), split at d < S (its decoding path)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return torch.where(i - j < shift, i - j, (i - shift + local) - j)


def dca_table(n: int, pretrained_length: int) -> torch.Tensor:
    """``P [n, n]`` of DCA from chunkllama_attn_replace.py's tables: chunk_size = L*3//4, local_window =
    L//8, chunk_len = chunk_size - local_window; q_t = arange(chunk_len); qc_t = (arange(chunk_len) +
    chunk_len).clamp(max=chunk_size); k_t = arange % chunk_len; the inter query uses qc_t[chunk_len - 1]."""
    chunk_size = pretrained_length * 3 // 4
    local_window = pretrained_length // 8
    chunk_len = chunk_size - local_window
    q_t = torch.arange(chunk_len)
    qc_t = (torch.arange(chunk_len) + chunk_len).clamp(max=chunk_size)
    k_t = torch.arange(n) % chunk_len
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    behind = i // chunk_len - j // chunk_len
    query = torch.where(behind == 0, q_t[i % chunk_len],
                        torch.where(behind == 1, qc_t[i % chunk_len], qc_t[chunk_len - 1]))
    return query - k_t[j]


def test_string_formula_matches_its_table():
    st = StringSettings.for_length(L, shift=S, local=W)
    table = string_table(100, S, W)
    assert all(st.relative(d) == int(table[d + 3, 3]) for d in range(97))
    assert StringSettings.for_length(8192) == StringSettings(8192, 2703, 128)  # the paper's S = 0.33 L, W = 128


def test_dca_formula_matches_the_official_tables():
    settings = DcaSettings.for_length(L)
    assert (settings.chunk, settings.local, settings.chunk_size) == (40, 8, 48)
    table = dca_table(200, L)
    got = torch.tensor([[settings.relative(i, j) if j <= i else 0 for j in range(200)] for i in range(200)])
    assert torch.equal(got, torch.where(torch.arange(200)[None, :] <= torch.arange(200)[:, None], table, 0))
    assert int(table.tril().max()) == settings.chunk_size < L  # every position stays inside the trained range
    big = DcaSettings.for_length(8192)
    assert (big.chunk, big.local) == (6144 - 1024, 1024)


def test_dca_scale_is_the_official_mscale_squared():
    settings = DcaSettings.for_length(L)
    assert settings.logit_scale(L) == 1.0 and settings.logit_scale(L // 2) == 1.0
    assert settings.logit_scale(3 * L) == pytest.approx((0.05 * math.log(3) + 1) ** 2)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="0 < W < S"):
        StringSettings.for_length(L)  # W = 128 >= S = 21
    with pytest.raises(ValueError, match="unknown peer"):
        peers.peer_settings("nope", L)


# ------------------------------------------------------------------------------------------------
# the float64 reference, as a transformers attention implementation
# ------------------------------------------------------------------------------------------------
REF = {}


def _rotate(x, angles):
    """x ``[..., D]`` rotated by ``angles [..., rd/2]`` (rotate_half layout, first rd dims)."""
    rd = 2 * angles.shape[-1]
    c, s = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x[..., : rd // 2], x[..., rd // 2 : rd]
    return torch.cat([x[..., :rd] * c + torch.cat([-x2, x1], -1) * s, x[..., rd:]], -1)


def _reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    dtype = REF["dtype"]
    table, scale_of, inv = REF["table"], REF["scale"], REF["inv_freq"][module.layer_idx].double()
    b_, hq, lq, d = query.shape
    hkv = key.shape[1]
    window = kwargs.get("sliding_window")
    out = torch.empty(b_, lq, hq, value.shape[-1], dtype=query.dtype)
    n = key.shape[2]
    for b in range(b_):
        q, k, v = query[b].to(dtype), key[b].to(dtype), value[b].to(dtype)
        k = k.repeat_interleave(hq // hkv, 0)
        v = v.repeat_interleave(hq // hkv, 0)
        for i in range(lq):
            p = n - lq + i
            keys = torch.arange(p + 1)
            rel = (p - keys) if window else table[p, : p + 1]
            delta = (rel - (p - keys)).double()  # extra rotation of the query, per key
            qi = _rotate(q[:, i : i + 1, :].double().expand(hq, p + 1, d), delta[:, None] * inv).to(dtype)
            s = (qi * k[:, : p + 1]).sum(-1) * (scaling * (1.0 if window else scale_of))
            if kwargs.get("softcap"):
                s = torch.tanh(s / kwargs["softcap"]) * kwargs["softcap"]
            if window:
                s = s.masked_fill((p - keys)[None, :] >= window, -math.inf)
            out[b, i] = (torch.softmax(s.double(), -1).to(dtype)[..., None] * v[:, : p + 1]).sum(1).to(query.dtype)
    return out, None


AttentionInterface.register("peer_reference", _reference)
AttentionMaskInterface.register("peer_reference", lambda **kw: sdpa_mask(**{**kw, "allow_is_causal_skip": False}))


def reference_logits(model, ids, table, scale, dtype=torch.float64):
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None)
    REF.update(table=table, scale=scale, dtype=dtype,
               inv_freq={i: model_frequencies(model, types[i] if types else None)
                         for i in range(config.num_hidden_layers)})
    original = model.config._attn_implementation
    model.set_attn_implementation("peer_reference")
    try:
        return logits(model, ids)
    finally:
        model.set_attn_implementation(original)


def peer_logits(model, ids, name, **params):
    peers.enable_peer(model, name, **params)
    try:
        return logits(model, ids)
    finally:
        peers.disable_peer(model)


def assert_close_by_rule(fast, ref64, ref32, eps=1e-5):
    err = (fast - ref64).abs().max().item()
    base = (ref32 - ref64).abs().max().item()
    assert err <= 2 * base + eps, f"error {err:.3g} vs naive float32 error {base:.3g}"


FAMS = ["llama", "gemma3", "gpt_neox"]


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("block", [7, 1024])
def test_string_matches_its_formula(fam, block):
    model, ids = tiny_model(fam), ids_of(150)
    table, scale = string_table(150, S, W), StringSettings.for_length(L, S, W).logit_scale(150)
    fast = peer_logits(model, ids, "string", shift=S, local=W, block_size=block)
    assert_close_by_rule(fast, reference_logits(model, ids, table, scale),
                         reference_logits(model, ids, table, scale, torch.float32))
    assert (fast - logits(model, ids)).abs().max() > 1e-3  # STRING changed something


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("block", [6, 1024])
def test_dca_matches_its_formula(fam, block):
    model, ids = tiny_model(fam), ids_of(200)  # 5 chunks of 40: intra, successive and inter parts
    table, scale = dca_table(200, L), DcaSettings.for_length(L).logit_scale(200)
    assert scale > 1
    fast = peer_logits(model, ids, "dca", block_size=block)
    assert_close_by_rule(fast, reference_logits(model, ids, table, scale),
                         reference_logits(model, ids, table, scale, torch.float32))


def test_dca_within_one_chunk_is_the_plain_model():
    model, ids = tiny_model("llama"), ids_of(40)
    assert (peer_logits(model, ids, "dca") - logits(model, ids)).abs().max() < 1e-5


@pytest.mark.parametrize("fam", ["llama", "gemma3"])  # gemma3: its sliding layers' cache keeps the last 24 keys
@pytest.mark.parametrize("name,params", [("string", dict(shift=S, local=W, block_size=8)), ("dca", dict(block_size=8))])
def test_decoding_and_a_copied_cache_continue_as_one_pass(name, params, fam):
    """Prefill a prefix, then the rest from a deep copy of the cache, one token at a time and as a chunk:
    the logits equal one forward pass over the whole sequence (DCA told the length up front)."""
    model, ids = tiny_model(fam), ids_of(180)
    full = peer_logits(model, ids, name, **params)
    peers.enable_peer(model, name, **params)
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            with prompt_length(180):
                model(ids[:, :150], cache=cache)
            chunk = model(ids[:, 150:], cache=copy.deepcopy(cache)).logits
            steps = [model(ids[:, t : t + 1], cache=cache).logits[:, -1] for t in range(150, 180)]
    finally:
        peers.disable_peer(model)
    assert (chunk[0] - full[0, 150:]).abs().max() < 1e-4
    assert (torch.stack(steps, 1)[0] - full[0, 150:]).abs().max() < 1e-4


def test_padding_is_refused_and_disable_restores():
    model, ids = tiny_model("llama"), ids_of(30, batch=2)
    before = logits(model, ids)
    peers.enable_peer(model, "dca")
    try:
        with pytest.raises(NotImplementedError, match="unpadded"):
            model(ids, attention_mask=torch.tensor([[0] * 3 + [1] * 27, [1] * 30]))
    finally:
        peers.disable_peer(model)
    assert torch.equal(logits(model, ids), before)
