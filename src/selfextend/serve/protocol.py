"""OpenAI's wire format: request models, the error type, and the builders of responses and chunks.

Requests are validated strictly (``max_tokens: "5"`` or ``true`` is refused, not converted). Fields
this server does not implement are refused when their value would change the result. Errors have
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from .engine import Delta, Finished, TokenLogprob

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's is the server's --max-output-tokens
MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bounds for completions' `logprobs` and chat's `top_logprobs`
MAX_CHAT_TOP_LOGPROBS = 20


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

    # max_tokens when the request leaves it out or sends null; None = the server's --max-output-tokens
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None

    def wanted_tokens(self) -> tuple[str, int | None]:
        """(the field that sets the number of new tokens, its value); None when omitted or null."""
        return "max_tokens", self.max_tokens

    def wanted_logprobs(self) -> int | None:
        """How many alternatives to report per token; None = no logprobs."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    OFF_VALUES: ClassVar[dict[str, tuple[Any, ...]]] = {
        **GenerationRequest.OFF_VALUES, "echo": (None, False), "best_of": (None, 1), "suffix": (None, "")}

    DEFAULT_MAX_TOKENS: ClassVar[int | None] = COMPLETION_DEFAULT_MAX_TOKENS

    prompt: Text | list[Annotated[int, Field(ge=0)]]
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

    def wanted_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:  # OpenAI's name now; max_tokens is the older one
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none"})  # pydantic names a union's members in `loc`


def _field_path(loc: Sequence[Any]) -> list[str]:
    """``("body", "messages", 0, "content", "list[TextPart]", 0, "text")`` -> ``messages.0.content.0.text``."""
    return [str(part) for part in loc[1:] if not (isinstance(part, str) and ("[" in part or part in _UNION_TAGS))]


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """pydantic's errors for a request body as one 400: the most specific problem (for a union, the
    member that got furthest)."""
    first = max(errors, key=lambda e: (len(e["loc"]), e["type"] == "value_error"))
    loc = _field_path(first["loc"])
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['ctx']['error']}")
    if not loc:
        return APIError(400, f"the request body must be a JSON object sent as application/json: {first['msg']}")
    if first["type"] == "missing":
        return APIError(400, f"missing required field {'.'.join(loc)!r}", param=loc[0])
    return APIError(400, f"invalid {'.'.join(loc)}: {first['msg']}", param=loc[0])


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


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Wire:
    """The responses and stream chunks of one request; subclasses fill in the choices."""

    ID_PREFIX = OBJECT = CHUNK_OBJECT = ""

    def __init__(self, model: str):
        self.base = {"id": f"{self.ID_PREFIX}{uuid.uuid4().hex}", "created": int(time.time()), "model": model}

    def first_chunk(self) -> dict[str, Any] | None:
        """The chunk a stream starts with, if any."""
        return None

    def chunk(self, delta: Delta | None, finish: str | None) -> dict[str, Any]:
        """A stream chunk with ``delta``'s text, or (``delta`` None) the one with the finish reason."""
        return {**self.base, "object": self.CHUNK_OBJECT, "choices": [self._chunk_choice(delta, finish)]}

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        return {**self.base, "object": self.CHUNK_OBJECT, "choices": [], "usage": done.usage()}

    def response(self, answer: Delta, done: Finished) -> dict[str, Any]:
        """The whole answer."""
        return {**self.base, "object": self.OBJECT, "choices": [self._choice(answer, done.reason)],
                "usage": done.usage()}

    def _chunk_choice(self, delta: Delta | None, finish: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _choice(self, answer: Delta, finish: str) -> dict[str, Any]:
        raise NotImplementedError


class CompletionWire(Wire):
    """``/v1/completions``; ``logprobs_start`` is the prompt's length in characters (the origin of
    ``text_offset``), None when the request asked for no logprobs."""

    ID_PREFIX, OBJECT, CHUNK_OBJECT = "cmpl-", "text_completion", "text_completion"

    def __init__(self, model: str, logprobs_start: int | None):
        super().__init__(model)
        self.logprobs_start = logprobs_start

    def _chunk_choice(self, delta: Delta | None, finish: str | None) -> dict[str, Any]:
        logprobs = None
        if delta is not None and self.logprobs_start is not None:
            logprobs = completion_logprobs(delta.tokens, self.logprobs_start)
        return {"index": 0, "text": delta.text if delta else "", "finish_reason": finish, "logprobs": logprobs}

    _choice = _chunk_choice


class ChatWire(Wire):
    """``/v1/chat/completions``; ``logprobs``: whether the request asked for them."""

    ID_PREFIX, OBJECT, CHUNK_OBJECT = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, logprobs: bool):
        super().__init__(model)
        self.logprobs = logprobs

    def first_chunk(self) -> dict[str, Any]:
        return {**self.base, "object": self.CHUNK_OBJECT, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}

    def _logprobs(self, delta: Delta | None) -> dict[str, Any] | None:
        return chat_logprobs(delta.tokens) if delta is not None and self.logprobs else None

    def _chunk_choice(self, delta: Delta | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": {} if delta is None else {"content": delta.text},
                "logprobs": self._logprobs(delta), "finish_reason": finish}

    def _choice(self, answer: Delta, finish: str) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": answer.text},
                "logprobs": self._logprobs(answer), "finish_reason": finish}
