"""selfextend.naive, as the benchmark runs it (``bench.naive_applied``: the settings of a SelfExtend
method, G from the library's schedule): the paper's formula with full score matrices computes what the
fast path computes."""

from __future__ import annotations

import pytest
import torch

import selfextend
from selfextend.bench import naive_applied
from selfextend.evaluation.methods import selfextend_method


@pytest.mark.parametrize("group_size, window, mode", [(None, 16, "floor"), (4, 8, "floor"), (3, 16, "leaky"),
                                                      (None, 16, "rerope")])
def test_naive_attention_gives_the_logits_selfextend_gives(loaded, group_size, window, mode):
    model, tok = loaded
    ids = torch.randint(3, len(tok), (1, 150), generator=torch.Generator().manual_seed(0))
    with selfextend.enable(model, group_size=group_size, window=window, mode=mode) as handle, torch.no_grad():
        expected = model(ids).logits  # [1, 150, vocab]
        g = handle.settings.group_size_for(150)
    with naive_applied(model, selfextend_method(group_size, window, mode), 150) as record, torch.no_grad():
        naive = model(ids).logits
    assert (float(record["G"]), record["w"]) == (g, window)  # the naive merge ran the same settings
    torch.testing.assert_close(naive, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(ids).logits
    assert not torch.allclose(plain, expected, atol=1e-2)  # the comparison is not vacuous
    assert model.config._attn_implementation not in ("selfextend", "selfextend_naive")  # put back
