"""`selfextend serve`: an OpenAI-compatible HTTP server for a model with SelfExtend switched on.

    selfextend serve --model smollm2-135m --port 8000 [-G G] [-w W] [--mode M] [--max-input-tokens N]

Endpoints: ``GET /health``, ``GET /v1/models`` (each model also reports its trained and extended
context length), ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming or not, with
``logprobs``). Errors use OpenAI's format ``{"error": {"message", "type", "param", "code"}}``.

SelfExtend keeps per-KV-cache state between decode steps, so one worker thread runs every
generation, token by token with a KV cache. Requests wait in a bounded queue; when it is full the
server answers 503. A request whose client disconnects is cancelled between two decoder layers or
two tokens; so is every request when the server is told to stop (SIGTERM, Ctrl-C).
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
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from transformers import DynamicCache

from .commands.common import positive_int
from .integration import SelfExtendHandle
from .runtime import decoder_layers
from .settings import Settings

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
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bounds for completions' `logprobs` and chat's `top_logprobs`
MAX_CHAT_TOP_LOGPROBS = 20
LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a token with (numerically) zero probability
INPUT_TOKENS_PER_TRAINED_LENGTH = 4  # default --max-input-tokens: 4 x the trained length ...
BODY_BYTES_PER_INPUT_TOKEN = 64  # ... and a request body of at most 64 bytes per allowed input token,
MIN_BODY_BYTES = 1 << 20  # but never less than 1 MiB


# ------------------------------------------------------------------------------------------------
# requests
# ------------------------------------------------------------------------------------------------


def _valid_unicode(text: str) -> str:
    """JSON may carry a lone surrogate (``"\\ud800"``), which no tokenizer can encode: refuse it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"contains a lone surrogate ({text[err.start]!r} at character {err.start}); "
                         "send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values (``true`` is not ``1``, ``0.0`` is ``0``)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool | None = False


class GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions.

    Types are strict (``max_tokens: "5"`` or ``true`` is refused). Fields this server does not
    implement are refused when their value would change the result (see :meth:`check_supported`)."""

    model_config = ConfigDict(strict=True, extra="allow")

    # OpenAI fields that do not change the generated text: accepted and ignored
    NO_EFFECT: ClassVar[frozenset[str]] = frozenset({"user", "metadata", "store", "service_tier",
                                                     "safety_identifier", "prompt_cache_key"})
    # OpenAI fields not implemented here -> the values that mean "off" (anything else is refused)
    OFF_VALUES: ClassVar[dict[str, tuple[Any, ...]]] = {
        "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {})}

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1)  # one choice per request
    stop: list[Annotated[Text, Field(min_length=1)]] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: Any) -> Any:
        """OpenAI accepts one stop string, a list of them, or null."""
        return [stop] if isinstance(stop, str) else [] if stop is None else stop

    def check_supported(self) -> None:
        """Refuse (400) a field this server does not know, or one it does not implement set to a
        value that would change the result."""
        for field, value in (self.model_extra or {}).items():
            if field in self.NO_EFFECT:
                continue
            if field not in self.OFF_VALUES:
                raise APIError(400, f"unrecognized request argument supplied: {field}", param=field,
                               code="unknown_parameter")
            if not any(_same_json(value, off) for off in self.OFF_VALUES[field]):
                raise APIError(400, f"{field}={json.dumps(value)[:80]} is not supported by this server",
                               param=field, code="unsupported_parameter")

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def wanted_logprobs(self) -> int | None:
        """How many alternatives to report per token; None = no logprobs."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    OFF_VALUES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationRequest.OFF_VALUES, "echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}

    prompt: Text | list[Annotated[int, Field(ge=0)]]
    max_tokens: int | None = Field(COMPLETION_DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Text
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(GenerationRequest):
    OFF_VALUES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationRequest.OFF_VALUES, "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
        "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
        "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
        "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,), "web_search_options": (None,)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogates
        return {"error": {"message": message, "type": kind, "param": self.param, "code": self.code}}

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
    logprobs: int | None = None  # alternatives to report per token; None = no logprobs


@dataclass(frozen=True)
class Step:
    """One generated token and, when asked for, its log-probability and the most likely tokens."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # (token, log-probability), most likely first


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token as the API reports it: its bytes, log-probability and alternatives."""

    piece: bytes  # UTF-8, possibly part of a character
    logprob: float
    top: tuple[tuple[bytes, float], ...]
    offset: int  # where its text starts in the completion text (characters)


@dataclass(frozen=True)
class Delta:
    """Text that became safe to send, with the logprobs of the tokens it came from (if asked for)."""

    text: str
    tokens: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last event of a generation."""

    reason: str  # "stop" (end of sequence token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class GenerationCancelled(Exception):
    """Raised inside the generation loop once its job is cancelled."""


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


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of ``token`` (before temperature and top_p) and the ``top`` most
    likely tokens with theirs; ``logits`` is ``[vocab]``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOWEST_LOGPROB)  # [vocab]
    best = logprobs.topk(top)
    return float(logprobs[token]), tuple(zip(best.indices.tolist(), best.values.tolist()))


@contextmanager
def stop_between_layers(model, cancelled: threading.Event) -> Iterator[None]:
    """While active, a forward pass of ``model`` raises :class:`GenerationCancelled` at its next decoder
    layer once ``cancelled`` is set (a long prefill stops in seconds, not minutes)."""

    def check(_layer, _args) -> None:
        if cancelled.is_set():
            raise GenerationCancelled()

    hooks = [layer.register_forward_pre_hook(check) for layer in decoder_layers(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def generate_tokens(model, prompt_ids: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[Step]:
    """Prefill ``prompt_ids``, then sample up to ``sampling.max_tokens`` tokens, one forward pass per
    token with a KV cache. The caller stops early (end of sequence, stop string) by closing the
    iterator. Raises :class:`GenerationCancelled` once ``cancelled`` is set: between two decoder
    layers during a forward pass, or before the next token."""
    generator = torch.Generator()
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    cache = DynamicCache(config=model.config)
    inputs = torch.tensor([prompt_ids], device=model.device)  # [1, prompt tokens], then [1, 1]
    with stop_between_layers(model, cancelled):
        for _ in range(sampling.max_tokens):
            if cancelled.is_set():
                raise GenerationCancelled()
            with torch.no_grad():
                logits = model(inputs, cache=cache, logits_to_keep=1).logits[0, -1]  # [vocab]
            token = pick_token(logits, sampling.temperature, sampling.top_p, generator)
            if sampling.logprobs is None:
                yield Step(token)
            else:
                yield Step(token, *token_logprobs(logits, token, sampling.logprobs))
            inputs = torch.tensor([[token]], device=model.device)


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
        self.sent = 0  # characters sent so far
        self.stopped = False

    @property
    def offset(self) -> int:
        """Where the next token's text starts: after the last complete character so far."""
        return len(self._text.rstrip("\ufffd"))

    def push(self, token: int) -> str:
        """Add a token; return the text that became safe to send."""
        self._ids.append(token)
        self._text = self._decode(self._ids)
        hits = [i for i in (self._text.find(s, self.sent) for s in self._stop) if i >= 0]
        if hits:
            self._text, self.stopped = self._text[: min(hits)], True
            return self.flush()
        safe = min(len(self._text.rstrip("\ufffd")), len(self._text) - _stop_prefix_length(self._text, self._stop))
        delta = self._text[self.sent : safe]
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """Everything not sent yet (at the end of the generation)."""
        delta, self.sent = self._text[self.sent :], len(self._text)
        return delta


_CANCELLED = object()  # put in a job's event queue by Job.cancel


class Job:
    """One request for the worker: prompt, sampling, and a channel back to the event loop.

    The worker calls :meth:`send` with :class:`Delta` events, then a :class:`Finished` (or an
    exception); the request handler awaits :meth:`next_event`. :meth:`cancel` stops the generation at
    the next decoder layer or token.
    """

    def __init__(self, prompt_ids: list[int], sampling: Sampling, loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()

    def send(self, item: Delta | Finished | Exception) -> None:
        """Worker side: pass ``item`` to the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Event-loop side: stop generating and wake up whoever awaits :meth:`next_event`."""
        self.cancelled.set()
        self._events.put_nowait(_CANCELLED)

    async def next_event(self) -> Delta | Finished:
        item = await self._events.get()
        if item is _CANCELLED:
            raise ClientDisconnected()
        if isinstance(item, APIError):
            raise item
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {type(item).__name__}: {item}")
        return item


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another instance", code="shutting_down")


class Engine:
    """Runs every generation on one worker thread; requests wait in a queue of ``max_queue``."""

    def __init__(self, model, tokenizer, max_queue: int = DEFAULT_MAX_QUEUE):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.running: Job | None = None  # the job the worker is generating, None when idle
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        # fast tokenizers may fail with "Already borrowed" when two threads use one at once
        self._tokenizer_lock = threading.Lock()
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self._eos = frozenset(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
        self._token_bytes = TokenBytes(tokenizer)

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

    def token_bytes(self, token: int) -> bytes:
        with self._tokenizer_lock:
            return self._token_bytes(token)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    # -- the queue ------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, prompt_ids: list[int], sampling: Sampling) -> Job:
        """Queue a generation (call from the event loop); 503 when the queue is full or the server stops."""
        if self._closing.is_set():
            raise _shutting_down()
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

    def close(self) -> None:
        """Stop generating (safe from any thread and from a signal handler): the running job stops at
        its next decoder layer or token, and it and every waiting job get a 503."""
        self._closing.set()
        job = self.running
        if job is not None:
            job.cancelled.set()

    def stop(self) -> None:
        """:meth:`close`, then wait for the worker to finish."""
        self.close()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.running = job
            if self._closing.is_set():  # close() came before this job started: it ends at once
                job.cancelled.set()
            try:
                for item in self._run(job):
                    job.send(item)
            except GenerationCancelled:
                if self._closing.is_set():
                    job.send(_shutting_down())
            except Exception as err:  # one failing request must not stop the worker
                log.exception("generation failed")
                job.send(err)
            finally:
                self.running = None

    def _run(self, job: Job) -> Iterator[Delta | Finished]:
        """Text deltas (with the logprobs of their tokens) of one generation, then :class:`Finished`."""
        text = TextStream(self.decode, job.sampling.stop)
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not sent yet
        reason, count = "length", 0
        with closing(generate_tokens(self.model, job.prompt_ids, job.sampling, job.cancelled)) as steps:
            for count, step in enumerate(steps, 1):
                if step.token in self._eos:
                    reason = "stop"
                    break
                if step.logprob is not None:
                    pending.append(self._describe(step, text.offset))
                if delta := text.push(step.token):
                    ready = [t for t in pending if t.offset < text.sent]
                    pending = pending[len(ready):]
                    yield Delta(delta, tuple(ready))
                if text.stopped:
                    reason = "stop"
                    break
        rest = text.flush()
        ready = [t for t in pending if t.offset < text.sent] if text.stopped else pending  # none past a stop
        if rest or ready:
            yield Delta(rest, tuple(ready))
        yield Finished(reason, len(job.prompt_ids), count)

    def _describe(self, step: Step, offset: int) -> TokenLogprob:
        top = tuple((self.token_bytes(t), lp) for t, lp in step.top)
        return TokenLogprob(self.token_bytes(step.token), step.logprob, top, offset)


class TokenBytes:
    """Token id -> the bytes it stands for (a token may hold part of a UTF-8 character)."""

    def __init__(self, tokenizer):
        from tokenizers import decoders
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        # GPT-2 style vocabularies spell each byte as one printable character
        self._byte_of = {c: b for b, c in bytes_to_unicode().items()} if byte_level else {}

    def __call__(self, token: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if self._byte_of and all(c in self._byte_of for c in piece):
            return bytes(self._byte_of[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece spells a space as U+2581


# ------------------------------------------------------------------------------------------------
# responses
# ------------------------------------------------------------------------------------------------


def token_text(piece: bytes) -> str:
    """A token as OpenAI writes it: its text, or ``bytes:\\xe2\\x80`` when it is not whole UTF-8."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def completion_logprobs(tokens: Sequence[TokenLogprob], start: int) -> dict[str, Any]:
    """Completions' ``logprobs``: ``top_logprobs`` holds the alternatives plus the chosen token;
    ``text_offset`` counts characters from the start of the prompt (``start`` = its length)."""
    return {"tokens": [token_text(t.piece) for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{**{token_text(p): lp for p, lp in t.top}, token_text(t.piece): t.logprob}
                             for t in tokens],
            "text_offset": [start + t.offset for t in tokens]}


def _chat_token(piece: bytes, logprob: float) -> dict[str, Any]:
    return {"token": token_text(piece), "logprob": logprob, "bytes": list(piece)}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``logprobs``: one entry per token with its ``top_logprobs`` alternatives."""
    return {"content": [{**_chat_token(t.piece, t.logprob), "top_logprobs": [_chat_token(p, lp) for p, lp in t.top]}
                        for t in tokens],
            "refusal": None}


# ------------------------------------------------------------------------------------------------
# the app
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


def _token_budget(handle: SelfExtendHandle, prompt_tokens: int, wanted: int | None) -> int:
    """``wanted`` capped so no forward pass exceeds the extended limit (the last sampled token is
    never fed back, hence ``+ 1``); ``None`` = as many as fit."""
    limit = handle.max_length
    if limit is None:
        return wanted or UNBOUNDED_DEFAULT_MAX_TOKENS
    room = limit - prompt_tokens + 1
    return room if wanted is None else min(wanted, room)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})  # pydantic names a union's members in `loc`


def _field_path(loc: Sequence[Any]) -> list[str]:
    """``("body", "messages", 0, "content", "list[TextPart]", 0, "text")`` -> ``messages.0.content.0.text``."""
    return [str(part) for part in loc[1:] if not (isinstance(part, str) and ("[" in part or part in _UNION_TAGS))]


def _validation_error(err: RequestValidationError) -> APIError:
    """The most specific problem (for a union, the member that got furthest) as a 400."""
    first = max(err.errors(), key=lambda e: (len(e["loc"]), e["type"] == "value_error"))
    loc = _field_path(first["loc"])
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['ctx']['error']}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object sent as application/json: {first['msg']}")
    if first["type"] == "missing":
        return APIError(400, f"missing required field {'.'.join(loc)!r}", param=loc[0])
    return APIError(400, f"invalid {'.'.join(loc)}: {first['msg']}", param=loc[0])


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


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client closes the connection (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(job: Job, request: Request) -> tuple[str, list[TokenLogprob], Finished]:
    """The whole completion; cancels the job if the client leaves while waiting."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    parts, tokens = [], []
    try:
        while not isinstance(event := await job.next_event(), Finished):
            parts.append(event.text)
            tokens.extend(event.tokens)
        return "".join(parts), tokens, event
    finally:
        watcher.cancel()
        job.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _stream(job: Job, base: dict[str, Any], choice: Callable[[Delta | None, str | None], dict],
            first: dict[str, Any] | None, include_usage: bool) -> StreamingResponse:
    """Server-sent events: ``first`` choice, one chunk per delta, a chunk with the finish reason,
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


def create_app(model, tokenizer, name: str, handle: SelfExtendHandle, max_queue: int = DEFAULT_MAX_QUEUE,
               max_input_tokens: int | None = None, max_body_bytes: int | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (with SelfExtend ``handle`` on) as ``name``.

    ``max_input_tokens`` (default :func:`default_max_input_tokens`) bounds the prompt, and
    ``max_body_bytes`` (default 64 bytes per input token, at least 1 MiB) the request body.
    The worker thread starts and stops with the app's lifespan (uvicorn runs it)."""
    if handle.model is not model:
        raise ValueError("handle must be the SelfExtend handle of model (selfextend.enable(model))")
    if max_input_tokens is None:
        max_input_tokens = default_max_input_tokens(handle.settings)
    check_max_input_tokens(handle.settings, max_input_tokens)
    if max_body_bytes is None:
        max_body_bytes = max(MIN_BODY_BYTES, BODY_BYTES_PER_INPUT_TOKEN * max_input_tokens)
    engine = Engine(model, tokenizer, max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="selfextend", description=__doc__.splitlines()[0], lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.engine, app.state.handle = engine, handle
    app.state.max_input_tokens, app.state.max_body_bytes = max_input_tokens, max_body_bytes

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

    @app.exception_handler(Exception)
    async def _bug(_request: Request, err: Exception) -> Response:
        return APIError(500, f"internal error: {type(err).__name__}: {err}").response()

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "selfextend",
                "trained_context_length": handle.pretrained_length,
                "extended_context_length": handle.max_length, "max_input_tokens": max_input_tokens,
                "window": handle.window, "group_size": handle.group_size}

    def check_request(req: GenerationRequest) -> None:
        if req.model != name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        req.check_supported()

    def check_length(n: int, param: str) -> None:
        if n == 0:
            raise APIError(400, "the prompt is empty", param=param)
        if n > max_input_tokens:
            raise APIError(400, f"the prompt has {n} tokens but this server accepts at most {max_input_tokens} "
                           f"input tokens (SelfExtend's extended limit for this model is {handle.max_length})",
                           param=param, code="context_length_exceeded")

    def submit(prompt_ids: list[int], req: GenerationRequest) -> Job:
        sampling = Sampling(
            max_tokens=_token_budget(handle, len(prompt_ids), req.wanted_tokens()),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=tuple(req.stop), seed=req.seed, logprobs=req.wanted_logprobs())
        return engine.submit(prompt_ids, sampling)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "queued": engine.queued, "max_queue": engine.max_queue}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        check_request(req)
        if isinstance(req.prompt, str):
            prompt_ids = await asyncio.to_thread(engine.encode, req.prompt)
            check_length(len(prompt_ids), "prompt")
            prompt_chars = len(req.prompt)
        else:
            prompt_ids = req.prompt
            check_length(len(prompt_ids), "prompt")  # before looking at the ids one by one
            if max(prompt_ids) >= engine.vocab_size:
                raise APIError(400, f"token ids must be in [0, {engine.vocab_size})", param="prompt")
            prompt_chars = len(await asyncio.to_thread(engine.decode, prompt_ids)) if req.logprobs is not None else 0
        job = submit(prompt_ids, req)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}

        def choice(delta: Delta | None, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": delta.text if delta else "", "finish_reason": finish,
                    "logprobs": completion_logprobs(delta.tokens, prompt_chars)
                    if delta and req.logprobs is not None else None}

        if req.stream:
            return _stream(job, base, choice, None, req.include_usage)
        text, tokens, done = await _collect(job, request)
        return {**base, "choices": [choice(Delta(text, tuple(tokens)), done.reason)], "usage": done.usage()}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatRequest, request: Request) -> Response | dict[str, Any]:
        check_request(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt_ids = await asyncio.to_thread(engine.encode_chat, messages)
        except Exception as err:  # no template, or the template refuses the messages (jinja2 errors)
            raise APIError(400, f"cannot apply the chat template: {err}", param="messages") from None
        check_length(len(prompt_ids), "messages")
        job = submit(prompt_ids, req)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}

        def logprobs(delta: Delta | None) -> dict[str, Any] | None:
            return chat_logprobs(delta.tokens) if delta and req.logprobs else None

        if req.stream:
            def chunk(delta: Delta | None, finish: str | None) -> dict[str, Any]:
                return {"index": 0, "delta": {} if delta is None else {"content": delta.text},
                        "logprobs": logprobs(delta), "finish_reason": finish}

            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            return _stream(job, {**base, "object": "chat.completion.chunk"}, chunk, first, req.include_usage)
        text, tokens, done = await _collect(job, request)
        message = {"role": "assistant", "content": text}
        return {**base, "object": "chat.completion", "usage": done.usage(),
                "choices": [{"index": 0, "message": message, "logprobs": logprobs(Delta(text, tuple(tokens))),
                             "finish_reason": done.reason}]}

    return app


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .commands.common import add_model_argument, add_selfextend_arguments

    add_model_argument(parser)
    add_selfextend_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--max-input-tokens", type=positive_int, default=None,
                        help="longest prompt accepted, in tokens (default: 4 x the trained length, at most "
                             "SelfExtend's extended limit); longer prompts get a 400")
    parser.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                        help="requests that may wait for the model; more are answered 503 (default: %(default)s)")
    parser.add_argument("--served-name", default=None,
                        help="model id clients send in requests (default: the model's short name)")


def check_settings(args: argparse.Namespace) -> Settings:
    """SelfExtend's settings from the model's config alone, checked before any weights load: a bad
    setting or a --max-input-tokens above the extended limit is a CommandError (one line, status 2)."""
    from .assets import load_config
    from .commands.common import bad_input, settings_from_args

    settings = settings_from_args(args, load_config(args.model))
    if args.max_input_tokens is not None:
        with bad_input():
            check_max_input_tokens(settings, args.max_input_tokens)
    return settings


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run ``app`` with uvicorn until SIGTERM or Ctrl-C, which stop the running generation at its next
    decoder layer or token (a long prefill would otherwise hold the shutdown for minutes)."""
    import uvicorn

    engine: Engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.close()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has shut down, so the process would die of it;
            # the shutdown was orderly, so exit normally (status 0) instead
            self._captured_signals.clear()

    Server(uvicorn.Config(app, host=host, port=port)).run()


def run(args: argparse.Namespace) -> int:
    from .assets import model_name
    from .commands.common import enable_from_args, load_or_exit

    check_settings(args)
    model, tokenizer = load_or_exit(args.model)
    handle = enable_from_args(model, args)
    name = args.served_name or model_name(args.model)
    app = create_app(model, tokenizer, name, handle, max_queue=args.max_queue, max_input_tokens=args.max_input_tokens)
    print(f"[selfextend] serving {name!r} at http://{args.host}:{args.port}/v1 ({handle.describe()}; "
          f"prompts up to {app.state.max_input_tokens} tokens)", file=sys.stderr, flush=True)
    serve(app, args.host, args.port)
    return 0
