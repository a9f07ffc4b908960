"""Size limits of `selfextend serve`: the request body (413 before the body is read) and the prompt
(``max_input_tokens``, 400 before any generation), and the default prompt limit."""

from __future__ import annotations

import socket

import httpx
import pytest
from fastapi.testclient import TestClient

import selfextend
from selfextend.serve.app import create_app, default_max_input_tokens, default_max_output_tokens
from server_support import (
    LIMIT, NAME, SENTENCES, TINY_LENGTH, chat_ids, check_error, completion_body, greedy, load_extended)

MAX_INPUT = 80  # tokens, below the extended limit of 112


@pytest.mark.parametrize("group_size, mode, expected", [
    (None, "floor", 4 * 8192),  # automatic G: the extended limit (395264) is far above 4 x L
    (2, "floor", (8192 - 2048) * 2 + 2048),  # a fixed G whose limit (14336) is below 4 x L
    (None, "rerope", 4 * 8192),  # no extended limit at all
])
def test_default_max_input_tokens_is_4x_trained_length_within_the_limit(group_size, mode, expected):
    settings = selfextend.Settings(pretrained_length=8192, window=2048, group_size=group_size, mode=mode)
    assert default_max_input_tokens(settings) == expected


def test_max_input_tokens_above_the_extended_limit_is_refused(tiny):
    model, tokenizer, handle = load_extended(tiny)
    with pytest.raises(ValueError, match=f"above SelfExtend's extended limit of {LIMIT} tokens"):
        create_app(model, tokenizer, NAME, handle, max_input_tokens=LIMIT + 1)


@pytest.fixture(scope="module")
def limited(tiny):
    """A server that accepts at most MAX_INPUT prompt tokens: TestClient on the app."""
    model, tokenizer, handle = load_extended(tiny)
    with TestClient(create_app(model, tokenizer, NAME, handle, max_input_tokens=MAX_INPUT)) as client:
        yield client


def test_prompts_over_max_input_tokens_get_a_400_stating_the_limit(limited, reference):
    ids = reference[1](SENTENCES * 2).input_ids
    assert len(ids) > MAX_INPUT
    for path, body, param in [
        ("/v1/completions", completion_body(ids[: MAX_INPUT + 1]), "prompt"),
        ("/v1/completions", completion_body(list(range(5_000))), "prompt"),  # counted before the ids are checked
        ("/v1/completions", completion_body(SENTENCES * 2), "prompt"),
        ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": SENTENCES * 2}]},
         "messages"),
    ]:
        r = limited.post(path, json=body)
        assert f"accepts at most {MAX_INPUT} input tokens" in check_error(r, 400, param)
        assert r.json()["error"]["code"] == "context_length_exceeded"
    assert limited.post("/v1/completions", json=completion_body(ids[:MAX_INPUT], max_tokens=2)).status_code == 200
    assert limited.get("/v1/models").json()["data"][0]["max_input_tokens"] == MAX_INPUT


def test_default_limit_refuses_what_automatic_g_would_accept(tiny):
    """Automatic G extends the tiny model to 3088 tokens; by default the server takes 4 x 64 = 256."""
    model, tokenizer, _ = load_extended(tiny)
    selfextend.disable(model)
    handle = selfextend.enable(model)
    assert handle.max_length > 4 * TINY_LENGTH
    with TestClient(create_app(model, tokenizer, NAME, handle)) as client:
        r = client.post("/v1/completions", json=completion_body([5] * (4 * TINY_LENGTH + 1), max_tokens=1))
        assert f"accepts at most {4 * TINY_LENGTH} input tokens" in check_error(r, 400, "prompt")
        assert str(handle.max_length) in r.json()["error"]["message"]


def raw_request(base: str, head: bytes, body: bytes = b"") -> bytes:
    """Send ``head`` (and ``body``) on a fresh connection; return everything the server answers."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_an_oversized_body_is_refused_before_it_is_sent(url):
    """5 million token ids (10 MB) announced: 413 at once, without waiting for (or parsing) the body."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000029\r\nConnection: close\r\n\r\n")
    answer = raw_request(url, head)  # the body is never sent
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413")
    assert b"larger than this server's limit of 1048576 bytes" in body
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_chunked_body_over_the_limit_is_refused(url):
    limit = 1 << 20

    start = b'{"model": "tiny", "prompt": "'

    def chunks():  # no Content-Length: the server counts the bytes as they come
        yield start
        yield b"a" * (limit + 1 - len(start))  # one byte over the limit in all

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "larger than this server's limit" in check_error(r, 413)
    assert r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(f"{url}/v1/completions", json=completion_body(max_tokens=2)).status_code == 200


def test_health_answers_while_a_big_body_is_being_uploaded(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as upload:
        upload.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000000\r\n\r\n" + b'{"model": "tiny", "prompt": "' + b"a" * 500_000)
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"  # half the body is still to come


# ------------------------------------------------------------------------------------------------
# new tokens: max_output_tokens, and what an omitted or null max_tokens means
# ------------------------------------------------------------------------------------------------

MAX_OUTPUT = 20  # new tokens per request, below what fits after a short prompt (the limit is 112)
SHORT = "Dolores Park on a sunny day"
SHORT_CHAT = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("trained, expected", [(8192, 2048), (32768, 8192), (64, 16)])
def test_default_max_output_tokens_is_a_quarter_of_the_trained_length(trained, expected):
    settings = selfextend.Settings(pretrained_length=trained, window=trained // 4)
    assert default_max_output_tokens(settings) == expected


def test_max_output_tokens_above_the_extended_limit_is_refused(tiny):
    model, tokenizer, handle = load_extended(tiny)
    with pytest.raises(ValueError, match=f"above SelfExtend's extended limit of {LIMIT} tokens"):
        create_app(model, tokenizer, NAME, handle, max_output_tokens=LIMIT + 1)


@pytest.fixture(scope="module")
def capped(tiny):
    """A server that generates at most MAX_OUTPUT tokens per request: TestClient on the app."""
    model, tokenizer, handle = load_extended(tiny)
    with TestClient(create_app(model, tokenizer, NAME, handle, max_output_tokens=MAX_OUTPUT)) as client:
        yield client


def answer(r) -> tuple[str, int]:
    """(text, completion_tokens) of a 200 answer from either endpoint."""
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice.get("text", choice.get("message", {}).get("content")), r.json()["usage"]["completion_tokens"]


def test_null_max_tokens_in_completions_is_the_documented_default_of_16(capped, reference):
    """`"max_tokens": null` used to generate up to the extended limit (93 tokens here)."""
    ids = reference[1](SHORT).input_ids
    text, finish, n = greedy(reference, ids, 16)
    assert (finish, n) == ("length", 16)  # the model would go on: only the default stops it
    omitted = {k: v for k, v in completion_body(SHORT).items() if k != "max_tokens"}
    for body in (omitted, completion_body(SHORT, max_tokens=None)):
        assert answer(capped.post("/v1/completions", json=body)) == (text, 16)


def test_chat_without_max_tokens_stops_at_max_output_tokens(capped, reference):
    """Chat's default used to be "until the extended limit"; now it is the server's max_output_tokens."""
    ids = chat_ids(reference, SHORT_CHAT)
    text, finish, n = greedy(reference, ids, MAX_OUTPUT)
    assert (finish, n) == ("length", MAX_OUTPUT) and len(ids) + 2 * MAX_OUTPUT < LIMIT  # room for more
    base = {"model": NAME, "messages": SHORT_CHAT, "temperature": 0}
    for extra in ({}, {"max_tokens": None}, {"max_completion_tokens": None}, {"max_tokens": MAX_OUTPUT}):
        assert answer(capped.post("/v1/chat/completions", json={**base, **extra})) == (text, MAX_OUTPUT)


@pytest.mark.parametrize("path, field", [("/v1/completions", "max_tokens"), ("/v1/chat/completions", "max_tokens"),
                                         ("/v1/chat/completions", "max_completion_tokens")])
def test_asking_for_more_than_max_output_tokens_is_a_400(capped, path, field):
    body = completion_body(SHORT) if path == "/v1/completions" else {"model": NAME, "messages": SHORT_CHAT}
    r = capped.post(path, json={**body, field: MAX_OUTPUT + 1})
    message = check_error(r, 400, field)
    assert f"{field} is {MAX_OUTPUT + 1}" in message and f"at most {MAX_OUTPUT} tokens" in message
    assert r.json()["error"]["code"] == "invalid_value"
    assert capped.get("/v1/models").json()["data"][0]["max_output_tokens"] == MAX_OUTPUT
