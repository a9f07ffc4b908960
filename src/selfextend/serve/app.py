"""The FastAPI app (routes, limits, error handlers) and :func:`serve`, which runs it with uvicorn
(``selfextend serve``, in ``selfextend.commands.serve``).

Limits: a request body over ``max_body_bytes`` is answered 413 before it is read (:class:`BodyLimit`);
a prompt over ``max_input_tokens`` (default 4 x the trained length, never above SelfExtend's
extended limit) is answered 400 before any generation, and so is a ``max_tokens`` over
``max_output_tokens`` (default a quarter of the trained length), which is also chat's default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..integration import SelfExtendHandle
from ..settings import Settings
from .engine import (
    DEFAULT_MAX_QUEUE, ClientDisconnected, Delta, Engine, EngineError, Finished, Job, QueueFull, Sampling,
    ShuttingDown, TokenLogprob,
)
from .protocol import (
    SSE_DONE, APIError, ChatRequest, ChatWire, CompletionRequest, CompletionWire, GenerationRequest, Wire, sse,
    validation_error,
)

INPUT_TOKENS_PER_TRAINED_LENGTH = 4  # default max_input_tokens: 4 x the trained length ...
TRAINED_LENGTH_PER_OUTPUT_TOKEN = 4  # default max_output_tokens: a quarter of the trained length
BODY_BYTES_PER_INPUT_TOKEN = 64  # ... and a request body of at most 64 bytes per allowed input token,
MIN_BODY_BYTES = 1 << 20  # but never less than 1 MiB


# ------------------------------------------------------------------------------------------------
# limits
# ------------------------------------------------------------------------------------------------


def default_max_input_tokens(settings: Settings) -> int:
    """4 x the trained length, never above SelfExtend's extended limit."""
    budget = INPUT_TOKENS_PER_TRAINED_LENGTH * settings.pretrained_length
    return budget if settings.max_length is None else min(budget, settings.max_length)


def check_max_input_tokens(settings: Settings, max_input_tokens: int) -> None:
    """ValueError if ``max_input_tokens`` is not a positive integer within the extended limit."""
    if isinstance(max_input_tokens, bool) or not isinstance(max_input_tokens, int) or max_input_tokens < 1:
        raise ValueError(f"max_input_tokens must be a positive integer, got {max_input_tokens!r}")
    if settings.max_length is not None and max_input_tokens > settings.max_length:
        raise ValueError(f"--max-input-tokens {max_input_tokens} is above SelfExtend's extended limit of "
                         f"{settings.max_length} tokens for {settings.describe()}; lower it or use a larger -G")


def default_max_output_tokens(settings: Settings) -> int:
    """A quarter of the trained length (2048 for a model trained on 8192 tokens). It is the paper's
    neighbor window w = L // 4, so with the default settings every token of an answer sees the whole
    answer at ordinary, ungrouped positions; and it bounds how long one request holds the one worker
    (2048 tokens are 3 to 14 minutes of decoding for the bundled model on a 2-core CPU, at 4k to 32k
    tokens of context: ``results/bench``)."""
    return max(1, settings.pretrained_length // TRAINED_LENGTH_PER_OUTPUT_TOKEN)


def check_max_output_tokens(settings: Settings, max_output_tokens: int) -> None:
    """ValueError if ``max_output_tokens`` is not a positive integer within the extended limit."""
    if isinstance(max_output_tokens, bool) or not isinstance(max_output_tokens, int) or max_output_tokens < 1:
        raise ValueError(f"max_output_tokens must be a positive integer, got {max_output_tokens!r}")
    if settings.max_length is not None and max_output_tokens > settings.max_length:
        raise ValueError(f"--max-output-tokens {max_output_tokens} is above SelfExtend's extended limit of "
                         f"{settings.max_length} tokens for {settings.describe()}; lower it or use a larger -G")


class BodyLimit:
    """ASGI middleware: answer 413 to a request whose body exceeds ``max_bytes``, before anything
    reads (or parses) the rest of it; the body of a request within the limit is passed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:  # after the body: disconnect notices
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                         code="request_too_large")
        await error.response()(scope, receive, send)


# ------------------------------------------------------------------------------------------------
# what the routes serve
# ------------------------------------------------------------------------------------------------


@dataclass
class Service:
    """The engine, the served model's name and SelfExtend handle, and the prompt and answer limits."""

    engine: Engine
    handle: SelfExtendHandle
    name: str
    max_input_tokens: int
    max_output_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def model_card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "selfextend",
                "trained_context_length": self.handle.pretrained_length,
                "extended_context_length": self.handle.max_length, "max_input_tokens": self.max_input_tokens,
                "max_output_tokens": self.max_output_tokens, "window": self.handle.window,
                "group_size": self.handle.group_size}

    def check_request(self, req: GenerationRequest) -> None:
        """404 for another model's name; 400 for a field this server does not implement or for more
        new tokens than ``max_output_tokens``."""
        self.check_model(req.model)
        req.check_supported()
        param, wanted = req.wanted_tokens()
        if wanted is not None and wanted > self.max_output_tokens:
            raise APIError(400, f"{param} is {wanted} but this server generates at most {self.max_output_tokens} "
                           f"tokens per request (its --max-output-tokens); ask for at most {self.max_output_tokens}",
                           param=param, code="invalid_value")

    def check_model(self, requested: str) -> None:
        if requested != self.name:
            raise APIError(404, f"model {requested!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def check_length(self, n: int, param: str) -> None:
        if n == 0:
            raise APIError(400, "the prompt is empty", param=param)
        if n > self.max_input_tokens:
            raise APIError(400, f"the prompt has {n} tokens but this server accepts at most {self.max_input_tokens} "
                           f"input tokens (SelfExtend's extended limit for this model is {self.handle.max_length})",
                           param=param, code="context_length_exceeded")

    def token_budget(self, prompt_tokens: int, req: GenerationRequest) -> int:
        """The new tokens ``req`` asks for (omitted or null: its endpoint's default, at most
        ``max_output_tokens``), capped so no forward pass exceeds the extended limit (the last sampled
        token is never fed back, hence ``+ 1``)."""
        _, wanted = req.wanted_tokens()
        if wanted is None:
            wanted = min(req.DEFAULT_MAX_TOKENS or self.max_output_tokens, self.max_output_tokens)
        limit = self.handle.max_length
        return wanted if limit is None else min(wanted, limit - prompt_tokens + 1)

    async def answer(self, req: GenerationRequest, request: Request, prompt_ids: list[int],
                     wire: Wire) -> Response | dict[str, Any]:
        """Queue the generation; stream its chunks or return the whole answer."""
        sampling = Sampling(
            max_tokens=self.token_budget(len(prompt_ids), req),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=tuple(req.stop), seed=req.seed, logprobs=req.wanted_logprobs())
        job = self.engine.submit(prompt_ids, sampling)
        if req.stream:
            return StreamingResponse(_events(job, wire, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        answer, done = await _collect(job, request)
        return wire.response(answer, done)


def engine_error(err: EngineError) -> APIError:
    if isinstance(err, QueueFull):
        return APIError(503, str(err), code="queue_full")
    if isinstance(err, ShuttingDown):
        return APIError(503, str(err), code="shutting_down")
    return APIError(500, str(err))


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client closes the connection (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(job: Job, request: Request) -> tuple[Delta, Finished]:
    """The whole completion; cancels the job if the client leaves while waiting."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    parts: list[str] = []
    tokens: list[TokenLogprob] = []
    try:
        while not isinstance(event := await job.next_event(), Finished):
            parts.append(event.text)
            tokens.extend(event.tokens)
        return Delta("".join(parts), tuple(tokens)), event
    finally:
        watcher.cancel()
        job.cancel()


async def _events(job: Job, wire: Wire, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the first chunk, one chunk per delta, a chunk with the finish reason,
    optionally a usage chunk, then ``[DONE]``. A client that disconnects cancels ``job``."""
    try:
        if (first := wire.first_chunk()) is not None:
            yield sse(first)
        while not isinstance(event := await job.next_event(), Finished):
            yield sse(wire.chunk(event, None))
        yield sse(wire.chunk(None, event.reason))
        if include_usage:
            yield sse(wire.usage_chunk(event))
    except EngineError as err:
        yield sse(engine_error(err).body())
    finally:
        job.cancel()
    yield SSE_DONE


# ------------------------------------------------------------------------------------------------
# routes
# ------------------------------------------------------------------------------------------------

router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    service = _service(request)
    return {"status": "ok", "model": service.name, "queued": service.engine.queued,
            "max_queue": service.engine.max_queue}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_service(request).model_card()]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    service = _service(request)
    service.check_model(model_id)
    return service.model_card()


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
    service = _service(request)
    service.check_request(req)
    engine = service.engine
    if isinstance(req.prompt, str):
        prompt_ids = await asyncio.to_thread(engine.encode, req.prompt)
        service.check_length(len(prompt_ids), "prompt")
    else:
        prompt_ids = req.prompt
        service.check_length(len(prompt_ids), "prompt")  # before looking at the ids one by one
        if max(prompt_ids) >= engine.vocab_size:
            raise APIError(400, f"token ids must be in [0, {engine.vocab_size})", param="prompt")
    logprobs_start = None  # text_offset counts from the start of the prompt text
    if req.logprobs is not None:
        prompt_text = req.prompt if isinstance(req.prompt, str) else await asyncio.to_thread(engine.decode, prompt_ids)
        logprobs_start = len(prompt_text)
    return await service.answer(req, request, prompt_ids, CompletionWire(service.name, logprobs_start))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatRequest, request: Request) -> Response | dict[str, Any]:
    service = _service(request)
    service.check_request(req)
    try:
        prompt_ids = await asyncio.to_thread(service.engine.encode_chat, req.chat())
    except Exception as err:  # no template, or the template refuses the messages (jinja2 errors)
        raise APIError(400, f"cannot apply the chat template: {err}", param="messages") from None
    service.check_length(len(prompt_ids), "messages")
    return await service.answer(req, request, prompt_ids, ChatWire(service.name, bool(req.logprobs)))


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------


async def _on_api_error(_request: Request, err: APIError) -> Response:
    return err.response()


async def _on_engine_error(_request: Request, err: EngineError) -> Response:
    return engine_error(err).response()


async def _on_invalid(_request: Request, err: RequestValidationError) -> Response:
    return validation_error(err.errors()).response()


async def _on_http_error(_request: Request, err: HTTPException) -> Response:
    return APIError(err.status_code, str(err.detail)).response()


async def _on_client_gone(_request: Request, _err: ClientDisconnected) -> Response:
    return Response(status_code=499)  # never delivered: the client is gone


async def _on_bug(_request: Request, err: Exception) -> Response:
    return APIError(500, f"internal error: {type(err).__name__}: {err}").response()


ERROR_HANDLERS = {APIError: _on_api_error, EngineError: _on_engine_error, RequestValidationError: _on_invalid,
                  HTTPException: _on_http_error, ClientDisconnected: _on_client_gone, Exception: _on_bug}


def create_app(model, tokenizer, name: str, handle: SelfExtendHandle, max_queue: int = DEFAULT_MAX_QUEUE,
               max_input_tokens: int | None = None, max_body_bytes: int | None = None,
               max_output_tokens: int | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (with SelfExtend ``handle`` on) as ``name``.

    ``max_input_tokens`` (default :func:`default_max_input_tokens`) bounds the prompt,
    ``max_output_tokens`` (default :func:`default_max_output_tokens`) the new tokens of one request
    (and is chat's default), ``max_body_bytes`` (default 64 bytes per input token, at least 1 MiB) the
    request body. The worker thread starts and stops with the app's lifespan (uvicorn runs it)."""
    if handle.model is not model:
        raise ValueError("handle must be the SelfExtend handle of model (selfextend.enable(model))")
    if max_input_tokens is None:
        max_input_tokens = default_max_input_tokens(handle.settings)
    check_max_input_tokens(handle.settings, max_input_tokens)
    if max_output_tokens is None:
        max_output_tokens = default_max_output_tokens(handle.settings)
    check_max_output_tokens(handle.settings, max_output_tokens)
    if max_body_bytes is None:
        max_body_bytes = max(MIN_BODY_BYTES, BODY_BYTES_PER_INPUT_TOKEN * max_input_tokens)
    service = Service(Engine(model, tokenizer, max_queue), handle, name, max_input_tokens, max_output_tokens)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="selfextend", description="OpenAI-compatible server for a model with SelfExtend",
                  lifespan=lifespan, exception_handlers=ERROR_HANDLERS)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.include_router(router)
    app.state.service = service
    return app


# ------------------------------------------------------------------------------------------------
# running it
# ------------------------------------------------------------------------------------------------


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until SIGTERM or Ctrl-C, which stop the running generation at its next
    decoder layer or token (a long prefill would otherwise hold the shutdown for minutes)."""
    import uvicorn

    engine: Engine = app.state.service.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.close()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has shut down, so the process would die of it;
            # the shutdown was orderly, so exit normally (status 0) instead
            self._captured_signals.clear()

    Server(uvicorn.Config(app, host=host, port=port)).run()
