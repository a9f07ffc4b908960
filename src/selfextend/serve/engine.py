"""The server's engine: one worker thread runs every generation; requests wait in a bounded queue.

SelfExtend keeps per-KV-cache state between decode steps, so generations run one at a time, each
through the library's one generation loop (:func:`selfextend.generation.stream_generate`). A
request handler submits a :class:`Job` and awaits its events: :class:`Delta` (text that became safe
to send, with the logprobs of its tokens) then :class:`Finished`. A job is cancelled between two
decoder layers or two tokens when its client leaves (:meth:`Job.cancel`) or the server stops
(:meth:`Engine.close`).

Nothing here knows HTTP: errors are the exceptions below, which the app turns into responses.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from ..generation import GenerationCancelled, Step, encode_prompt, make_sampler, stream_generate

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 16


# ------------------------------------------------------------------------------------------------
# what goes in and out
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


class EngineError(Exception):
    """A job that cannot be (or was not) generated; the message says why."""


class QueueFull(EngineError):
    pass


class ShuttingDown(EngineError):
    pass


class GenerationFailed(EngineError):
    pass


class ClientDisconnected(Exception):
    """The client left before its answer was ready; nothing is sent."""


# ------------------------------------------------------------------------------------------------
# token bytes (for logprobs)
# ------------------------------------------------------------------------------------------------


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
# jobs and the worker
# ------------------------------------------------------------------------------------------------

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
        """The next event; raises :class:`ClientDisconnected` after :meth:`cancel`, and the
        :class:`EngineError` of a job that failed or was stopped."""
        item = await self._events.get()
        if item is _CANCELLED:
            raise ClientDisconnected()
        if isinstance(item, EngineError):
            raise item
        if isinstance(item, Exception):
            raise GenerationFailed(f"generation failed: {type(item).__name__}: {item}")
        return item


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("the server is shutting down; retry on another instance")


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
        self._token_bytes = TokenBytes(tokenizer)

    # -- tokens ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return encode_prompt(self.tokenizer, text, chat=False)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        with self._tokenizer_lock:
            return encode_prompt(self.tokenizer, messages)

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
        """Queue a generation (call from the event loop); :class:`QueueFull` or :class:`ShuttingDown`."""
        if self._closing.is_set():
            raise _shutting_down()
        job = Job(prompt_ids, sampling, asyncio.get_running_loop())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the server is busy: {self.max_queue} requests are already waiting "
                            "for the model; retry later") from None
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="selfextend-worker", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop generating (safe from any thread and from a signal handler): the running job stops at
        its next decoder layer or token, and it and every waiting job get :class:`ShuttingDown`."""
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
        sampling = job.sampling
        steps = stream_generate(self.model, self.tokenizer, job.prompt_ids, sampling.max_tokens,
                                make_sampler(sampling.temperature, sampling.top_p, sampling.seed),
                                stop=sampling.stop, logprobs=sampling.logprobs, cancelled=job.cancelled,
                                tokenizer_lock=self._tokenizer_lock)
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not sent yet
        sent, reason, count = 0, "length", 0  # characters sent so far
        with closing(steps):
            for count, step in enumerate(steps, 1):
                if step.logprob is not None and step.finish != "end_of_sequence":
                    pending.append(self._describe(step))
                sent += len(step.text)
                if step.finish in ("end_of_sequence", "length"):  # all the text is out: so are its logprobs
                    ready = pending
                else:  # none past the text sent (a stop string cuts it)
                    ready = [t for t in pending if t.offset < sent]
                pending = pending[len(ready):]
                if step.text or ready:
                    yield Delta(step.text, tuple(ready))
                if step.finish in ("end_of_sequence", "stop_string"):
                    reason = "stop"
        yield Finished(reason, len(job.prompt_ids), count)

    def _describe(self, step: Step) -> TokenLogprob:
        top = tuple((self.token_bytes(t), lp) for t, lp in step.top)
        return TokenLogprob(self.token_bytes(step.token), step.logprob, top, step.offset)
