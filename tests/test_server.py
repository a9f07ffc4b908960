"""`selfextend serve` end to end: a real uvicorn server on a free port, the official openai client
and raw HTTP. Every greedy answer is checked against ``model.generate`` on an independently loaded
copy of the same checkpoint with the same SelfExtend settings.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from selfextend import cli
from server_support import (
    CHAT, GROUP_SIZE, LIMIT, LONG_PROMPT, NAME, PROMPTS, SENTENCES, TINY_LENGTH, WINDOW, Gate, chat_ids, check_error,
    completion_body, greedy, prompt_ids, sse_events, stream_text, wait_until)


def test_health_and_models_report_context_lengths(client, http):
    assert http.get("/health").json()["status"] == "ok"
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    card = models[0]
    assert (card.trained_context_length, card.extended_context_length) == (TINY_LENGTH, LIMIT)
    assert (card.window, card.group_size) == (WINDOW, GROUP_SIZE)
    assert client.models.retrieve(NAME).extended_context_length == LIMIT
    assert card.max_output_tokens == LIMIT  # as the fixture set it
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("prompt", [LONG_PROMPT, "Dolores Park on a sunny day"])
def test_greedy_completion_equals_generate(client, reference, prompt):
    ids = prompt_ids(reference, prompt)
    text, finish, n = greedy(reference, ids, 24)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    assert len(prompt_ids(reference, LONG_PROMPT)) > TINY_LENGTH  # the long prompt needs SelfExtend


def test_greedy_chat_equals_generate(client, reference):
    ids = chat_ids(reference, CHAT)
    assert len(ids) > TINY_LENGTH
    text, finish, n = greedy(reference, ids, 16)
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)


def test_token_id_prompt_equals_text_prompt(client, reference):
    ids = prompt_ids(reference, LONG_PROMPT)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == greedy(reference, ids, 10)[0]


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streaming_text_equals_non_streaming(client, kind):
    if kind == "completion":
        create = client.completions.create
        args = dict(model=NAME, prompt=LONG_PROMPT, max_tokens=24, temperature=0)
    else:
        create = client.chat.completions.create
        args = dict(model=NAME, messages=CHAT, max_tokens=16, temperature=0)
    whole = create(**args)
    text, finish, deltas = stream_text(create(**args, stream=True, stream_options={"include_usage": True}))
    choice = whole.choices[0]
    assert text == (choice.text if kind == "completion" else choice.message.content)
    assert finish == choice.finish_reason
    assert len(deltas) > 1  # it really streamed


def test_stream_wire_format(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "model": NAME, "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == NAME for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 6


def test_stop_strings_cut_the_text(client, reference):
    base, _, n = greedy(reference, prompt_ids(reference, LONG_PROMPT), 24)
    k = next(i for i in range(len(base) // 2, len(base) - 2) if "\ufffd" not in base[i : i + 2])
    stop = base[k : k + 2]
    expected = base[: base.find(stop)]
    assert len(expected) < len(base)
    args = dict(model=NAME, prompt=LONG_PROMPT, max_tokens=24, temperature=0)
    for stops in (stop, ["never-appears", stop]):
        r = client.completions.create(**args, stop=stops)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
        assert r.usage.completion_tokens < n
        text, finish, _ = stream_text(client.completions.create(**args, stop=stops, stream=True))
        assert (text, finish) == (expected, "stop")


def test_seed_makes_sampling_reproducible(client):
    args = dict(model=NAME, prompt=LONG_PROMPT, max_tokens=12, temperature=1.0, top_p=0.9)
    texts = [client.completions.create(**args, seed=s).choices[0].text for s in (7, 7, 8, 9)]
    assert texts[0] == texts[1]
    assert len(set(texts)) > 1  # the seed matters
    streamed, _, _ = stream_text(client.completions.create(**args, seed=7, stream=True))
    assert streamed == texts[0]


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_temperatures_too_small_to_divide_by_are_greedy(http, reference, temperature):
    """They used to be answered 500 ("probability tensor contains either inf, nan or element < 0")."""
    ids = prompt_ids(reference, LONG_PROMPT)
    r = http.post("/v1/completions", json=completion_body(ids, temperature=temperature, seed=1))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy(reference, ids, 8)[0]
    r = http.post("/v1/chat/completions", json={"model": NAME, "messages": CHAT, "max_tokens": 8,
                                                 "temperature": temperature, "top_p": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy(reference, chat_ids(reference, CHAT), 8)[0]


def test_generation_stops_at_the_extended_limit(http, reference):
    ids = prompt_ids(reference, LONG_PROMPT * 2)[: LIMIT - 5]
    room = LIMIT - len(ids) + 1  # the last token is sampled, never fed back
    text, finish, n = greedy(reference, ids, room)
    r = http.post("/v1/completions", json=completion_body(ids, max_tokens=50))
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["text"] == text
    assert (body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]) == (finish, n)


BAD_REQUESTS = [  # (path, body, expected param)
    ("/v1/completions", {"model": NAME}, "prompt"),
    ("/v1/chat/completions", {"model": NAME}, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"content": "hi"}]}, "messages"),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", completion_body(max_tokens=0), "max_tokens"),
    ("/v1/completions", completion_body(temperature=-0.1), "temperature"),
    ("/v1/completions", completion_body(temperature=2.5), "temperature"),
    ("/v1/completions", completion_body(top_p=0), "top_p"),
    ("/v1/completions", completion_body(top_p=1.5), "top_p"),
    ("/v1/completions", completion_body(n=2), "n"),
    ("/v1/completions", completion_body(stop=""), "stop"),
    ("/v1/completions", completion_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("/v1/completions", completion_body(max_tokens="many"), "max_tokens"),
    ("/v1/completions", completion_body(prompt=""), "prompt"),
    ("/v1/completions", completion_body(prompt=[10**6]), "prompt"),
    ("/v1/completions", [1, 2], None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(http, client, reference):
    malformed = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ',
                          headers={"content-type": "application/json"})
    assert "JSON" in check_error(malformed, 400)
    for path, body, param in BAD_REQUESTS:
        check_error(http.post(path, json=body), 400, param)
    check_error(http.post("/v1/completions", json=completion_body(model="gpt-4")), 404, "model")
    check_error(http.get("/v1/nothing"), 404)

    too_long = SENTENCES * 3
    assert len(prompt_ids(reference, too_long)) > LIMIT
    assert str(LIMIT) in check_error(http.post("/v1/completions", json=completion_body(too_long)), 400, "prompt")
    long_chat = [{"role": "user", "content": too_long}]
    with pytest.raises(openai.BadRequestError, match=f"accepts at most {LIMIT} input tokens"):
        client.chat.completions.create(model=NAME, messages=long_chat, max_tokens=4)

    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/completions", json=completion_body())
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy(reference, prompt_ids(reference, LONG_PROMPT), 8)[0]


STRICT_TYPES = [  # (field, value): a wrong JSON type is refused, never converted
    ("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 5.0), ("temperature", "0"), ("top_p", True),
    ("n", True), ("seed", "7"), ("seed", 1.5), ("stream", "yes"), ("stream", 1), ("logprobs", True),
    ("logprobs", "2"), ("stop", 5), ("stop", [5]), ("model", 5),
]


@pytest.mark.parametrize("field, value", STRICT_TYPES)
def test_request_types_are_strict(http, field, value):
    assert field in check_error(http.post("/v1/completions", json=completion_body(**{field: value})), 400, field)


@pytest.mark.parametrize("seed", [10**30, 2**64, -(2**63) - 1])
def test_seed_out_of_range_is_a_400_not_a_500(http, seed):
    assert "seed" in check_error(http.post("/v1/completions", json=completion_body(seed=seed)), 400, "seed")


def test_seeds_that_fit_64_bits_work(http):
    for seed in (-(2**63), 2**64 - 1):
        assert http.post("/v1/completions", json=completion_body(seed=seed, temperature=1)).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "abc \\ud800 def"}', "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
    ("/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\ud800"}]}]}',
     "messages"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "ok", "stop": ["\\ud800"]}', "stop"),
])
def test_lone_surrogates_get_a_clear_400(http, path, body, param):
    message = check_error(http.post(path, content=body, headers={"content-type": "application/json"}), 400, param)
    assert "lone surrogate" in message


UNSUPPORTED = [  # (path, field, value): OpenAI fields this server does not implement
    ("/v1/completions", "echo", True), ("/v1/completions", "best_of", 2), ("/v1/completions", "suffix", "end"),
    ("/v1/completions", "presence_penalty", 0.5), ("/v1/completions", "frequency_penalty", -1),
    ("/v1/completions", "logit_bias", {"5": 10}), ("/v1/completions", "top_k", 5),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "required"), ("/v1/chat/completions", "presence_penalty", 1),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "echo", False),  # not a chat field at all
]
NO_EFFECT = [  # (path, field, value): accepted because they leave the result unchanged
    ("/v1/completions", "echo", False), ("/v1/completions", "best_of", 1), ("/v1/completions", "suffix", None),
    ("/v1/completions", "presence_penalty", 0.0), ("/v1/completions", "logit_bias", {}),
    ("/v1/completions", "user", "someone"), ("/v1/chat/completions", "tools", []),
    ("/v1/chat/completions", "response_format", {"type": "text"}), ("/v1/chat/completions", "frequency_penalty", 0),
]


def request_with(path: str, field: str, value) -> dict:
    if path == "/v1/completions":
        return completion_body(max_tokens=2, **{field: value})
    return {"model": NAME, "messages": CHAT, "max_tokens": 2, "temperature": 0, field: value}


@pytest.mark.parametrize("path, field, value", UNSUPPORTED)
def test_unsupported_fields_are_refused(http, path, field, value):
    message = check_error(http.post(path, json=request_with(path, field, value)), 400, field)
    assert field in message and ("not supported" in message or "unrecognized" in message)


@pytest.mark.parametrize("path, field, value", NO_EFFECT)
def test_fields_without_effect_are_accepted(http, path, field, value):
    assert http.post(path, json=request_with(path, field, value)).status_code == 200


def test_an_unexpected_error_is_a_json_500(gated, monkeypatch):
    base, app, _ = gated

    def broken(_text):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(app.state.service.engine, "encode", broken)
    r = httpx.post(f"{base}/v1/completions", json=completion_body(), timeout=30)
    assert "tokenizer exploded" in check_error(r, 500)
    assert r.json()["error"]["type"] == "server_error"


def test_failing_generation_does_not_stop_the_worker(gated, reference):
    base, _, gate = gated
    gate.fail(1)
    r = httpx.post(f"{base}/v1/completions", json=completion_body(), timeout=30)
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    gate.fail(2)  # after the first token: the error arrives inside the stream
    with httpx.stream("POST", f"{base}/v1/completions", json=completion_body(stream=True), timeout=30) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and "injected failure" in json.loads(events[-2])["error"]["message"]
    r = httpx.post(f"{base}/v1/completions", json=completion_body(), timeout=30)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy(reference, prompt_ids(reference, LONG_PROMPT), 8)[0]


def test_full_queue_answers_503(gated):
    base, _, gate = gated
    post = lambda: httpx.post(f"{base}/v1/completions", json=completion_body(), timeout=30)  # noqa: E731
    gate.hold(1)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post)
        assert gate.holding.wait(10)  # the worker is inside the first request; the queue is empty
        waiting = pool.submit(post)
        wait_until(lambda: httpx.get(f"{base}/health").json()["queued"] == 1)  # the queue (of one) is full
        refused = post()
        assert refused.status_code == 503
        assert "busy" in refused.json()["error"]["message"]
        gate.open()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert post().status_code == 200


def abandon_stream(base: str, gate: Gate) -> None:
    """Read the first event of a streamed chat answer, wait until the worker is held, disconnect."""
    body = {"model": NAME, "messages": CHAT, "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.Client(base_url=base, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()  # (dropping the iterator would close the connection)
            assert '"role": "assistant"' in next(lines)
            assert gate.holding.wait(10)
    # leaving the blocks closed the connection in the middle of the stream


def abandon_wait(base: str, gate: Gate) -> None:
    """Ask for a whole answer and give up (read timeout) while the worker is held."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=completion_body(max_tokens=20),
                   timeout=httpx.Timeout(30, read=0.5))
    assert gate.holding.wait(10)


@pytest.mark.parametrize("abandon, held_forward", [(abandon_stream, 3), (abandon_wait, 1)])
def test_client_disconnect_cancels_generation(gated, reference, abandon, held_forward):
    base, app, gate = gated
    before = gate.forwards
    gate.hold(held_forward)
    abandon(base, gate)
    job = app.state.service.engine.running  # the worker is held inside this job's forward pass
    assert job.cancelled.wait(10)
    gate.open()
    r = httpx.post(f"{base}/v1/completions", json=completion_body(), timeout=30)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy(reference, prompt_ids(reference, LONG_PROMPT), 8)[0]
    # the abandoned answer stopped after the held forward pass instead of running to the end
    assert gate.forwards - before - r.json()["usage"]["completion_tokens"] == held_forward


def test_load_40_requests_from_4_threads(url, reference):
    expected = [greedy(reference, prompt_ids(reference, p), 8)[0] for p in PROMPTS]

    def ask(i: int) -> tuple[int, str]:
        body = completion_body(PROMPTS[i % len(PROMPTS)], stream=i % 2 == 1)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            if not body["stream"]:
                r.read()
                return r.status_code, r.json()["choices"][0]["text"]
            chunks = [json.loads(e) for e in sse_events(r)[:-1]]
            return r.status_code, "".join(c["choices"][0]["text"] for c in chunks)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(40)))
    assert [status for status, _ in results] == [200] * 40
    assert [text for _, text in results] == [expected[i % len(PROMPTS)] for i in range(40)]


def test_serve_command_reports_a_missing_model(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert cli.main(["serve", "--model", str(missing)]) == 2
    assert f"model {str(missing)!r} not found" in capsys.readouterr().err
