"""selfextend.prompts: passkey prompts of an exact token length, and their scoring."""

from __future__ import annotations

import pytest

from selfextend import prompts


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_exact_length_and_key_at_depth(loaded, depth):
    _, tok = loaded
    p = prompts.passkey_prompt(tok, 400, depth, "71234")
    assert len(p.input_ids) == 400
    text = tok.decode(p.input_ids)
    assert text.count("71234") == 2
    fact = tok.decode(p.input_ids[p.fact_token:]).lstrip()
    assert fact.startswith("The pass key is 71234")
    assert text.rstrip().endswith(prompts.PASSKEY_QUESTION)


def test_passkey_scoring():
    assert prompts.passkey_correct(" 71234. Remember", "71234")
    assert not prompts.passkey_correct(" 7123 4", "71234")
    assert not prompts.passkey_correct(" the pass key", "71234")
