"""``logprobs`` in OpenAI's shapes, read with the official openai client and checked against the
log-softmax of ``model.generate``'s logits on an independent copy of the model."""

from __future__ import annotations

import pytest
import torch

from selfextend.serve.protocol import token_text
from server_support import CHAT, LONG_PROMPT, NAME, chat_ids, prompt_ids

TOLERANCE = 1e-4  # float32 logits from two runs of the same computation


def reference_steps(reference, ids: list[int], max_tokens: int, top: int):
    """[(token, logprob, [(token, logprob)] * top)] for each greedy token of ``model.generate``."""
    model, _ = reference
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    steps = []
    for token, logits in zip(out.sequences[0, len(ids):].tolist(), out.logits):
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)  # [vocab]
        best = logprobs.topk(top)
        steps.append((token, float(logprobs[token]), list(zip(best.indices.tolist(), best.values.tolist()))))
    return steps


def _byte_table() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


_BYTE_OF = _byte_table()


def piece(reference, token: int) -> bytes:
    """The bytes of one token of the tiny (GPT-2 style byte-level) tokenizer."""
    return bytes(_BYTE_OF[c] for c in reference[1].convert_ids_to_tokens(token))


def as_bytes(token: str) -> bytes:
    """Undo :func:`token_text`."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token.removeprefix("bytes:").split("\\x")[1:])
    return token.encode("utf-8")


def test_token_text_spells_partial_characters_as_bytes():
    assert token_text(b" Paris") == " Paris"
    assert token_text("\u00e9".encode()) == "\u00e9"
    assert token_text(b"\xe2\x80") == "bytes:\\xe2\\x80"
    assert as_bytes(token_text(b"\xe2\x80")) == b"\xe2\x80"


@pytest.mark.parametrize("top", [0, 3, 5])
def test_completion_logprobs_match_the_model(client, reference, top):
    ids = prompt_ids(reference, LONG_PROMPT)
    steps = reference_steps(reference, ids, 12, max(top, 1))
    r = client.completions.create(model=NAME, prompt=LONG_PROMPT, max_tokens=12, temperature=0, logprobs=top)
    choice = r.choices[0]
    lp = choice.logprobs
    eos = reference[1].eos_token_id
    steps = [s for s in steps if s[0] != eos]  # the end-of-sequence token is not part of the text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(steps)
    assert b"".join(as_bytes(t) for t in lp.tokens).decode("utf-8", "replace") == choice.text
    for i, (token, logprob, best) in enumerate(steps):
        assert as_bytes(lp.tokens[i]) == piece(reference, token)
        assert lp.token_logprobs[i] == pytest.approx(logprob, abs=TOLERANCE)
        expected = {token_text(piece(reference, t)): v for t, v in best[:top]} | {lp.tokens[i]: logprob}
        assert lp.top_logprobs[i].keys() == expected.keys()  # the top alternatives and the chosen token
        assert list(lp.top_logprobs[i].values()) == pytest.approx(list(expected.values()), abs=TOLERANCE)
    # offsets count characters from the start of the prompt
    assert lp.text_offset[0] == len(LONG_PROMPT)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(LONG_PROMPT) + len(choice.text)


def test_streamed_completion_logprobs_equal_the_whole_answer(client):
    args = dict(model=NAME, prompt=LONG_PROMPT, max_tokens=12, temperature=0, logprobs=2)
    whole = client.completions.create(**args).choices[0].logprobs
    tokens, logprobs, tops, offsets = [], [], [], []
    for chunk in client.completions.create(**args, stream=True):
        lp = chunk.choices[0].logprobs
        if lp is not None:
            tokens += lp.tokens
            logprobs += lp.token_logprobs
            tops += lp.top_logprobs
            offsets += lp.text_offset
    assert (tokens, logprobs, tops, offsets) == (whole.tokens, whole.token_logprobs, whole.top_logprobs,
                                                  whole.text_offset)


def test_chat_logprobs_match_the_model(client, reference):
    ids = chat_ids(reference, CHAT)
    steps = [s for s in reference_steps(reference, ids, 10, 3) if s[0] != reference[1].eos_token_id]
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(steps)
    assert bytes(b for entry in content for b in entry.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    for entry, (token, logprob, best) in zip(content, steps):
        assert bytes(entry.bytes) == piece(reference, token) and entry.token == token_text(bytes(entry.bytes))
        assert entry.logprob == pytest.approx(logprob, abs=TOLERANCE)
        assert [bytes(alt.bytes) for alt in entry.top_logprobs] == [piece(reference, t) for t, _ in best]
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx([v for _, v in best], abs=TOLERANCE)

    streamed = []
    for chunk in client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=10, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]


def test_logprobs_only_when_asked_for(client):
    chat = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4, temperature=0, logprobs=True)
    assert chat.choices[0].logprobs.content and all(e.top_logprobs == [] for e in chat.choices[0].logprobs.content)
    assert client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4).choices[0].logprobs is None
    assert client.completions.create(model=NAME, prompt=LONG_PROMPT, max_tokens=4).choices[0].logprobs is None


def test_logprobs_stop_where_a_stop_string_cuts_the_text(client):
    args = dict(model=NAME, prompt=LONG_PROMPT, max_tokens=16, temperature=0, logprobs=1)
    text = client.completions.create(**args).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(**args, stop=stop).choices[0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    joined = b"".join(as_bytes(t) for t in cut.logprobs.tokens).decode("utf-8", "replace")
    assert joined.startswith(cut.text) and len(joined) < len(text)
    assert all(o < len(LONG_PROMPT) + len(cut.text) for o in cut.logprobs.text_offset)


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
])
def test_logprobs_out_of_range(http, path, extra, param):
    body = {"model": NAME, "max_tokens": 2, **extra}
    body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT})
    r = http.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
