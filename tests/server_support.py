"""Fixtures and helpers shared by the server tests (a plugin of ``conftest.py``: its fixtures need no
import): a real uvicorn server on a free port serving the tiny checkpoint (``tiny``), the official
openai client, a gate that can hold or fail the worker, and greedy references from ``model.generate``
on an independently loaded copy of the same checkpoint."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import selfextend
from selfextend.assets import load_model
from selfextend.serve import create_app
from tiny_checkpoint import TINY_LENGTH

NAME = "tiny"
GROUP_SIZE = 2
WINDOW = TINY_LENGTH // 4  # the paper's window, the default rule's
LIMIT = (TINY_LENGTH - WINDOW) * GROUP_SIZE + WINDOW  # 112 tokens
SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
LONG_PROMPT = SENTENCES * 2  # longer than the trained 64 tokens: SelfExtend groups positions
PROMPTS = [LONG_PROMPT, "The pass key is 12345. Remember it.", "Dolores Park on a sunny day", SENTENCES]
CHAT = [{"role": "system", "content": SENTENCES + "The pass key is 12345. Remember it."},
        {"role": "user", "content": "What is the pass key?"}]  # 93 tokens with the template


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


def load_extended(folder: Path):
    model, tokenizer = load_model(folder)
    handle = selfextend.enable(model, group_size=GROUP_SIZE, window=WINDOW)
    return model, tokenizer, handle


@pytest.fixture(scope="module")
def reference(tiny):
    """Our own copy of the model: expected outputs come from ``model.generate`` on it."""
    model, tokenizer, _ = load_extended(tiny)
    return model, tokenizer


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` on uvicorn in a background thread, on a free port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def url(tiny) -> Iterator[str]:
    model, tokenizer, handle = load_extended(tiny)
    with serving(create_app(model, tokenizer, NAME, handle, max_queue=16, max_output_tokens=LIMIT)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


class Gate:
    """A forward pre-hook that can hold the server's worker inside a forward pass, or fail it."""

    def __init__(self, model):
        self.forwards = 0
        self._hold_at = self._fail_at = None
        self.holding, self.release = threading.Event(), threading.Event()
        model.register_forward_pre_hook(self._hook)

    def hold(self, nth: int) -> None:
        """The ``nth`` forward pass from now waits for :meth:`open`."""
        self.holding.clear()
        self.release.clear()
        self._hold_at = self.forwards + nth

    def fail(self, nth: int) -> None:
        """The ``nth`` forward pass from now raises."""
        self._fail_at = self.forwards + nth

    def open(self) -> None:
        self.release.set()

    def _hook(self, _module, _args):
        self.forwards += 1
        if self.forwards == self._fail_at:
            raise RuntimeError("injected failure")
        if self.forwards == self._hold_at:
            self.holding.set()
            assert self.release.wait(30), "the test never opened the gate"


@pytest.fixture(scope="module")
def gated_server(tiny):
    model, tokenizer, handle = load_extended(tiny)
    gate = Gate(model)
    app = create_app(model, tokenizer, NAME, handle, max_queue=1, max_output_tokens=LIMIT)
    with serving(app) as base:
        yield base, app, gate


@pytest.fixture
def gated(gated_server):
    """A second server (queue of one) whose worker the test can hold: (url, app, gate)."""
    yield gated_server
    gated_server[2].open()  # never leave the worker held, even when the test failed


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def greedy(reference, prompt_ids: list[int], max_tokens: int) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of ``model.generate`` with greedy decoding."""
    model, tokenizer = reference
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False)
    new = out[0, len(prompt_ids):].tolist()
    finish = "stop" if new[-1] == tokenizer.eos_token_id else "length"
    return tokenizer.decode(new, skip_special_tokens=True), finish, len(new)


def prompt_ids(reference, prompt: str) -> list[int]:
    return reference[1](prompt).input_ids


def chat_ids(reference, messages) -> list[int]:
    tokenizer = reference[1]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def stream_text(stream) -> tuple[str, str, list[str]]:
    """(text, finish_reason, deltas) of an openai client stream (completion or chat)."""
    deltas, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            text = choice.text if hasattr(choice, "text") else choice.delta.content
            if text:
                deltas.append(text)
            finish = choice.finish_reason or finish
    return "".join(deltas), finish, deltas


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line]


def completion_body(prompt=LONG_PROMPT, **extra) -> dict:
    return {"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}


def check_error(r: httpx.Response, status: int, param=None) -> str:
    """``r`` is an OpenAI-format error with ``status`` and ``param``; return its message."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error["message"]
