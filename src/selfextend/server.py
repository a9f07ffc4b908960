"""`selfextend serve`: an OpenAI-compatible HTTP server for a model with SelfExtend switched on.

    selfextend serve --model smollm2-135m --port 8000 [--group-size G] [--window W] [--max-queue N]

Endpoints: ``GET /health``, ``GET /v1/models`` (each model also reports its trained and extended
context length), ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming or not).
Errors use OpenAI's format ``{"error": {"message", "type", "param", "code"}}``.

SelfExtend keeps per-KV-cache state between decode steps, so one worker thread runs every
generation, token by token with a KV cache. Requests wait in a bounded queue; when it is full the
server answers 503. A request whose client disconnects is cancelled between two tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator
from transformers import DynamicCache

from .commands.common import positive_int
from .integration import ContextLengthError, SelfExtendHandle

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as err:  # an optional dependency
    raise ImportError("`selfextend serve` needs fastapi and uvicorn: pip install 'selfextend[serve]'") from err

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 16
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to "until the limit"
UNBOUNDED_DEFAULT_MAX_TOKENS = 4096  # chat default when SelfExtend has no length limit (mode="rerope")
MAX_STOP_STRINGS = 4


# ------------------------------------------------------------------------------------------------
# requests
# ------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions (unknown fields are ignored)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1)  # one choice per request
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: Any) -> Any:
        """OpenAI accepts one stop string, a list of them, or null."""
        return [stop] if isinstance(stop, str) else [] if stop is None else stop

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]
    max_tokens: int | None = Field(COMPLETION_DEFAULT_MAX_TOKENS, ge=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ClientDisconnected(Exception):
    """The client left before its answer was ready; nothing is sent."""


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    max_tokens: int  # already capped to the extended limit
    temperature: float  # 0 = greedy
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    reason: str  # "stop" (end of sequence token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy for ``temperature == 0``, else a sample from the nucleus of mass ``top_p``."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the most likely token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that a stop string starts with."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class TextStream:
    """Generated tokens -> text deltas.

    Decodes the whole completion at every token (so characters spanning tokens come out right) and
    holds back a trailing incomplete character and anything that may be the start of a stop string.
    When a stop string appears, the text is cut before it and :attr:`stopped` is set.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self._decode, self._stop = decode, stop
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that became safe to send."""
        self._ids.append(token)
        self._text = self._decode(self._ids)
        hits = [i for i in (self._text.find(s, self._sent) for s in self._stop) if i >= 0]
        if hits:
            self._text, self.stopped = self._text[: min(hits)], True
            return self.flush()
        safe = min(len(self._text.rstrip("\ufffd")), len(self._text) - _stop_prefix_length(self._text, self._stop))
        delta = self._text[self._sent : safe]
        self._sent = max(self._sent, safe)
        return delta

    def flush(self) -> str:
        """Everything not sent yet (at the end of the generation)."""
        delta, self._sent = self._text[self._sent :], len(self._text)
        return delta


_CANCELLED = object()  # put in a job's event queue by Job.cancel


class Job:
    """One request for the worker: prompt, sampling, and a channel back to the event loop.

    The worker calls :meth:`send` with text deltas, then a :class:`Finished` (or an exception); the
    request handler awaits :meth:`next_event`. :meth:`cancel` stops the generation at the next token.
    """

    def __init__(self, prompt_ids: list[int], sampling: Sampling, loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()

    def send(self, item: str | Finished | Exception) -> None:
        """Worker side: pass ``item`` to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Event-loop side: stop generating and wake up whoever awaits :meth:`next_event`."""
        self.cancelled.set()
        self._events.put_nowait(_CANCELLED)

    async def next_event(self) -> str | Finished:
        item = await self._events.get()
        if item is _CANCELLED:
            raise ClientDisconnected()
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {type(item).__name__}: {item}")
        return item


class Engine:
    """Runs every generation on one worker thread; requests wait in a queue of ``max_queue``."""

    def __init__(self, model, tokenizer, max_queue: int = DEFAULT_MAX_QUEUE):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.running: Job | None = None  # the job the worker is generating, None when idle
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        # fast tokenizers may fail with "Already borrowed" when two threads use one at once
        self._tokenizer_lock = threading.Lock()
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._eos = frozenset(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))

    # -- tokens ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(text).input_ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        with self._tokenizer_lock:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    # -- the queue ------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, prompt_ids: list[int], sampling: Sampling) -> Job:
        """Queue a generation (call from the event loop); 503 when the queue is full."""
        job = Job(prompt_ids, sampling, asyncio.get_running_loop())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.max_queue} requests are already waiting "
                           "for the model; retry later", code="queue_full") from None
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="selfextend-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.running = job
            try:
                for item in self._generate(job):
                    job.send(item)
            except Exception as err:  # one failing request must not stop the worker
                log.exception("generation failed")
                job.send(err)
            finally:
                self.running = None

    def _generate(self, job: Job) -> Iterator[str | Finished]:
        """Token by token with a KV cache; checks for cancellation before every forward pass."""
        s = job.sampling
        generator = torch.Generator()
        if s.seed is None:
            generator.seed()
        else:
            generator.manual_seed(s.seed)
        text = TextStream(self.decode, s.stop)
        cache = DynamicCache(config=self.model.config)
        inputs = torch.tensor([job.prompt_ids], device=self.model.device)
        reason = "length"
        for count in range(1, s.max_tokens + 1):
            if job.cancelled.is_set():
                return
            with torch.no_grad():
                logits = self.model(inputs, cache=cache, logits_to_keep=1).logits[0, -1]
            token = pick_token(logits, s.temperature, s.top_p, generator)
            if token in self._eos:
                reason = "stop"
                break
            if delta := text.push(token):
                yield delta
            if text.stopped:
                reason = "stop"
                break
            inputs = torch.tensor([[token]], device=self.model.device)
        if rest := text.flush():
            yield rest
        yield Finished(reason, len(job.prompt_ids), count)


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------


def _token_budget(handle: SelfExtendHandle, prompt_tokens: int, wanted: int | None) -> int:
    """``wanted`` capped so no forward pass exceeds the extended limit (the last sampled token is
    never fed back, hence ``+ 1``); ``None`` = as many as fit."""
    limit = handle.max_length
    if limit is None:
        return wanted or UNBOUNDED_DEFAULT_MAX_TOKENS
    room = limit - prompt_tokens + 1
    return room if wanted is None else min(wanted, room)


def _validation_error(err: RequestValidationError) -> APIError:
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"] if part != "body"]
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['ctx']['error']}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object sent as application/json: {first['msg']}")
    if first["type"] == "missing":
        return APIError(400, f"missing required field {'.'.join(loc)!r}", param=loc[0])
    return APIError(400, f"invalid {'.'.join(loc)}: {first['msg']}", param=loc[0])


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client closes the connection (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(job: Job, request: Request) -> tuple[str, Finished]:
    """The whole completion; cancels the job if the client leaves while waiting."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    parts = []
    try:
        while not isinstance(event := await job.next_event(), Finished):
            parts.append(event)
        return "".join(parts), event
    finally:
        watcher.cancel()
        job.cancel()


def _stream(job: Job, base: dict[str, Any], choice: Callable[[str | None, str | None], dict],
            first: dict[str, Any] | None, include_usage: bool) -> StreamingResponse:
    """Server-sent events: ``first`` choice, one chunk per text delta, a chunk with the finish reason,
    optionally a usage chunk, then ``[DONE]``. A client that disconnects cancels ``job``."""

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse({**base, "choices": [first]})
            while not isinstance(event := await job.next_event(), Finished):
                yield _sse({**base, "choices": [choice(event, None)]})
            yield _sse({**base, "choices": [choice(None, event.reason)]})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": event.usage()})
        except APIError as err:
            yield _sse(err.body())
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(model, tokenizer, name: str, handle: SelfExtendHandle,
               max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    """The FastAPI app serving ``model`` (with SelfExtend ``handle`` on) as ``name``.

    The worker thread starts and stops with the app's lifespan (uvicorn runs it)."""
    if handle.model is not model:
        raise ValueError("handle must be the SelfExtend handle of model (selfextend.enable(model))")
    engine = Engine(model, tokenizer, max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="selfextend", description=__doc__.splitlines()[0], lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError) -> Response:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> Response:
        return _validation_error(err).response()

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> Response:
        return APIError(err.status_code, str(err.detail)).response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(_request: Request, _err: ClientDisconnected) -> Response:
        return Response(status_code=499)  # never delivered: the client is gone

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "selfextend",
                "trained_context_length": handle.pretrained_length,
                "extended_context_length": handle.max_length,
                "window": handle.window, "group_size": handle.group_size}

    def check_model(requested: str) -> None:
        if requested != name:
            raise APIError(404, f"model {requested!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")

    def submit(prompt_ids: list[int], req: GenerationRequest, param: str) -> Job:
        """Check the prompt length and queue the generation."""
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param=param)
        try:
            handle.raise_if_too_long(len(prompt_ids))
        except ContextLengthError as err:
            raise APIError(400, str(err), param=param, code="context_length_exceeded") from None
        sampling = Sampling(
            max_tokens=_token_budget(handle, len(prompt_ids), req.wanted_tokens()),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=tuple(req.stop), seed=req.seed)
        return engine.submit(prompt_ids, sampling)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "queued": engine.queued, "max_queue": engine.max_queue}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        check_model(req.model)
        if isinstance(req.prompt, str):
            prompt_ids = await asyncio.to_thread(engine.encode, req.prompt)
        elif any(not 0 <= t < engine.vocab_size for t in req.prompt):
            raise APIError(400, f"token ids must be in [0, {engine.vocab_size})", param="prompt")
        else:
            prompt_ids = req.prompt
        job = submit(prompt_ids, req, "prompt")
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}

        def choice(text: str | None, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if req.stream:
            return _stream(job, base, choice, None, req.include_usage)
        text, done = await _collect(job, request)
        return {**base, "choices": [choice(text, done.reason)], "usage": done.usage()}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest, request: Request) -> Response | dict[str, Any]:
        check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = await asyncio.to_thread(engine.encode_chat, messages)
        except Exception as err:  # no template, or the template refuses the messages (jinja2 errors)
            raise APIError(400, f"cannot apply the chat template: {err}", param="messages") from None
        job = submit(prompt_ids, req, "messages")
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}

        if req.stream:
            def delta(text: str | None, finish: str | None) -> dict[str, Any]:
                return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                        "finish_reason": finish}

            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            return _stream(job, {**base, "object": "chat.completion.chunk"}, delta, first, req.include_usage)
        text, done = await _collect(job, request)
        message = {"role": "assistant", "content": text}
        return {**base, "object": "chat.completion", "usage": done.usage(),
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": done.reason}]}

    return app


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, Hugging Face folder or .gguf file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--group-size", type=positive_int, default=None,
                        help="SelfExtend group size G (default: chosen per input length)")
    parser.add_argument("--window", type=positive_int, default=None,
                        help="SelfExtend neighbor window w (default: trained length // 4)")
    parser.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for the model; more are answered 503 (default: %(default)s)")
    parser.add_argument("--served-name", default=None,
                        help="model id clients send in requests (default: the model's short name)")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .assets import model_name
    from .commands.common import load_or_exit
    from .integration import enable

    model, tokenizer = load_or_exit(args.model)
    try:
        handle = enable(model, group_size=args.group_size, window=args.window)
    except ValueError as err:  # bad --group-size / --window, or a model without RoPE
        print(err, file=sys.stderr)
        return 2
    name = args.served_name or model_name(args.model)
    app = create_app(model, tokenizer, name, handle, max_queue=args.max_queue)
    print(f"[selfextend] serving {name!r} at http://{args.host}:{args.port}/v1 ({handle.describe()})",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0
