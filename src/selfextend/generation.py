"""Generation, the one way from a prompt to new tokens and text: the CLI commands, the evaluation,
the server and the benchmark all run it.

    ids = encode_prompt(tokenizer, "What is the pass key?")   # one user turn of the chat template
    for step in stream_generate(model, tokenizer, ids, 64, make_sampler(0.7, top_p=0.9, seed=1)):
        print(step.text, end="", flush=True)

One function per job, each built on the one before:

    encode_prompt    text, or chat messages, -> token ids (the chat template rendered as text, then
                     tokenized without special tokens)
    make_sampler     temperature, top_p, seed -> a function from logits to a token (greedy at 0)
    prefill          the whole prompt into a KV cache (in chunks if asked), a progress bar that
                     ticks per decoder layer; the logits of its last token
    decode_tokens    prefill, then one token per forward pass (``logits_to_keep=1``) into the same
                     ``DynamicCache``: a :class:`Step` per token, with its logprobs and the time of
                     the forward pass that produced it
    stream_generate  decode_tokens with text: each step carries the text that became safe to show;
                     ends at the end-of-sequence token, a stop string or ``max_new_tokens``
    generate         stream_generate collected: the text and the prefill and decode times

Stopping early: close the iterator (``contextlib.closing``). Cancelling from another thread: pass a
``threading.Event`` as ``cancelled``; once it is set, the iterator raises :class:`GenerationCancelled`
at the next decoder layer of a forward pass or before the next token (a long prefill stops in
seconds, not minutes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a token with (numerically) zero probability

Sampler = Callable[[torch.Tensor], int]  # logits [vocab] -> token id
# temperatures below float32's smallest normal number are greedy: dividing by them (1e-40 is a float32
# subnormal, 1e-46 rounds to 0) overflows to inf and nan, and sampling there is greedy anyway
GREEDY_BELOW_TEMPERATURE = torch.finfo(torch.float32).tiny


class GenerationCancelled(Exception):
    """Raised by the generation iterators once their ``cancelled`` event is set."""


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]], chat: bool | None = None) -> list[int]:
    """Token ids of ``prompt``: a list of chat messages goes through the chat template; a text is one
    user turn of it when ``chat`` is true (``None``: when the tokenizer has a template), else it is
    tokenized as it is (with the tokenizer's special tokens, e.g. BOS). A template is rendered as
    text and tokenized without special tokens: the template writes its own."""
    if isinstance(prompt, str):
        if chat is None:
            chat = bool(getattr(tokenizer, "chat_template", None))
        if not chat:
            return list(tokenizer(prompt).input_ids)
        prompt = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def end_of_sequence_tokens(model, tokenizer) -> frozenset[int]:
    """The tokens that end a generation: the model's generation config's and the tokenizer's EOS."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return frozenset(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    """A function from logits ``[vocab]`` to a token: greedy (argmax) for ``temperature == 0``, else a
    sample at ``temperature`` from the nucleus of mass ``top_p`` (the most likely token is always in
    it). Temperatures below :data:`GREEDY_BELOW_TEMPERATURE`, too small to divide float32 logits by,
    are greedy too (the limit of sampling as the temperature goes to 0). ``seed`` (anything
    ``torch.Generator.manual_seed`` takes, i.e. 64 bits) makes the samples reproducible; ``None``
    seeds from the system."""
    if temperature < GREEDY_BELOW_TEMPERATURE:
        return lambda logits: int(logits.argmax())
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def sample(logits: torch.Tensor) -> int:
        logits = logits.float()
        # minus the largest logit first: every scaled value is <= 0 and the largest exactly 0, so a
        # tiny temperature sends the others to -inf (probability 0), never to inf / inf = nan
        probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)  # [vocab]
        if top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the most likely token is always kept
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    return sample


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of ``token`` (before temperature and top_p, at least
    :data:`LOWEST_LOGPROB`) and the ``top`` most likely tokens with theirs; ``logits`` is ``[vocab]``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOWEST_LOGPROB)  # [vocab]
    best = logprobs.topk(top)
    return float(logprobs[token]), tuple(zip(best.indices.tolist(), best.values.tolist()))


# ------------------------------------------------------------------------------------------------
# hooks on the decoder layers: progress and cancellation
# ------------------------------------------------------------------------------------------------


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder layers (the ModuleList with ``num_hidden_layers`` entries)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


@contextmanager
def layer_progress(model, total_passes: int, desc: str, enabled: bool = True) -> Iterator[None]:
    """A tqdm bar that advances once per decoder layer forward, for ``total_passes`` passes."""
    if not enabled:
        yield
        return
    layers = decoder_layers(model)
    bar = tqdm(total=len(layers) * total_passes, desc=desc, unit="layer", leave=False)

    def tick(*_) -> None:  # a forward hook must return None, or it replaces the layer's output
        bar.update(1)

    hooks = [layer.register_forward_hook(tick) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()


@contextmanager
def stop_between_layers(model, cancelled: threading.Event | None) -> Iterator[None]:
    """While active, a forward pass of ``model`` raises :class:`GenerationCancelled` at its next decoder
    layer once ``cancelled`` is set (nothing is hooked for ``None``)."""
    if cancelled is None:
        yield
        return

    def check(_layer, _args) -> None:
        if cancelled.is_set():
            raise GenerationCancelled()

    hooks = [layer.register_forward_pre_hook(check) for layer in decoder_layers(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------------------------------------
# tokens
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One generated token.

    ``seconds`` is the time of the forward pass that produced it (the prefill, for the first token)
    and of its sampling.
    ``logprob`` and ``top`` are filled when logprobs were asked for. The text fields are filled by
    :func:`stream_generate`: ``text`` is what became safe to show with this token (possibly empty),
    ``offset`` where the token's own text starts in the completion, and ``finish`` says, on the last
    step only, why the generation ended: ``"end_of_sequence"``, ``"stop_string"`` or ``"length"``.
    """

    token: int
    seconds: float
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # (token, log-probability), most likely first
    text: str = ""
    offset: int = 0
    finish: str | None = None


def _forward(model, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Logits ``[vocab]`` of the last of ``input_ids`` ``[1, tokens]``, appending them to ``cache``."""
    with torch.inference_mode():
        return model(input_ids, cache=cache, logits_to_keep=1).logits[0, -1]


def prefill(model, input_ids: torch.Tensor, cache: DynamicCache, chunk_size: int | None = None,
            progress: bool = False, desc: str = "prefill") -> torch.Tensor:
    """Run the prompt ``input_ids`` ``[1, n]`` into ``cache`` in one pass, or in passes of
    ``chunk_size`` tokens, with a per-layer progress bar when ``progress``; return the logits
    ``[vocab]`` of its last token. In chunks, SelfExtend is told the prompt's length first, so it
    chooses G for the whole prompt, as one pass would (``sequence.prompt_length``)."""
    from .sequence import prompt_length

    n = input_ids.shape[1]
    chunk = chunk_size or n
    starts = range(0, n, chunk)
    with prompt_length(n), layer_progress(model, len(starts), desc, progress):
        for start in starts:
            logits = _forward(model, input_ids[:, start : start + chunk], cache)
    return logits


def decode_tokens(model, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                  sampler: Sampler | None = None, *, logprobs: int | None = None, chunk_size: int | None = None,
                  progress: bool = False, desc: str = "prefill",
                  cancelled: threading.Event | None = None, cache: DynamicCache | None = None) -> Iterator[Step]:
    """Prefill ``prompt_ids``, then generate up to ``max_new_tokens`` tokens, one forward pass per
    token with a ``DynamicCache`` (the last token is never fed back; pass ``cache``, empty, to keep
    it). ``sampler`` defaults to greedy; ``logprobs`` asks for each token's log-probability and that
    many alternatives. The caller stops early by closing the iterator; once ``cancelled`` is set it
    raises :class:`GenerationCancelled`."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.device).reshape(1, -1)  # [1, prompt]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    sampler = sampler or make_sampler()
    cache = DynamicCache(config=model.config) if cache is None else cache
    with stop_between_layers(model, cancelled):
        for i in range(max_new_tokens):
            if cancelled is not None and cancelled.is_set():
                raise GenerationCancelled()
            start = time.perf_counter()
            if i == 0:
                logits = prefill(model, ids, cache, chunk_size, progress, desc)  # [vocab]
            else:
                logits = _forward(model, ids, cache)  # [vocab]
            token = sampler(logits)  # (reading the token waits for an asynchronous device)
            seconds = time.perf_counter() - start
            if logprobs is None:
                yield Step(token, seconds)
            else:
                yield Step(token, seconds, *token_logprobs(logits, token, logprobs))
            ids = torch.tensor([[token]], device=model.device)  # [1, 1]


# ------------------------------------------------------------------------------------------------
# tokens -> text
# ------------------------------------------------------------------------------------------------


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


def stream_generate(model, tokenizer, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                    sampler: Sampler | None = None, *, stop: Sequence[str] = (), logprobs: int | None = None,
                    chunk_size: int | None = None, progress: bool = False, desc: str = "prefill",
                    cancelled: threading.Event | None = None,
                    tokenizer_lock: threading.Lock | None = None) -> Iterator[Step]:
    """:func:`decode_tokens` with text: each :class:`Step` carries the text that became safe to show
    (special tokens skipped). Ends after an end-of-sequence token (:func:`end_of_sequence_tokens`),
    when a stop string appears (the text is cut before it) or after ``max_new_tokens``; the last
    step's ``finish`` says which, and its text includes everything held back. ``tokenizer_lock`` is
    held while the tokenizer decodes (a fast tokenizer must not be used by two threads at once)."""
    eos = end_of_sequence_tokens(model, tokenizer)
    lock = tokenizer_lock or nullcontext()

    def decode(ids: list[int]) -> str:
        with lock:
            return tokenizer.decode(ids, skip_special_tokens=True)

    text = TextStream(decode, stop)
    steps = decode_tokens(model, prompt_ids, max_new_tokens, sampler, logprobs=logprobs, chunk_size=chunk_size,
                          progress=progress, desc=desc, cancelled=cancelled)
    with closing(steps):
        for count, step in enumerate(steps, 1):
            offset = text.offset
            if step.token in eos:
                yield replace(step, text=text.flush(), offset=offset, finish="end_of_sequence")
                return
            delta = text.push(step.token)
            if text.stopped:
                yield replace(step, text=delta, offset=offset, finish="stop_string")
                return
            if count == max_new_tokens:
                yield replace(step, text=delta + text.flush(), offset=offset, finish="length")
                return
            yield replace(step, text=delta, offset=offset)


# ------------------------------------------------------------------------------------------------
# the whole answer
# ------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """A finished generation: the text, token counts, and where the time went (``prefill_seconds``
    up to the first new token, ``decode_seconds`` for the others)."""

    text: str
    new_tokens: int
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the forward passes after the prefill (one token each)."""
        return max(self.new_tokens - 1, 0) / max(self.decode_seconds, 1e-9)


def generate(model, tokenizer, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
             sampler: Sampler | None = None, *, chunk_size: int | None = None, progress: bool = True,
             desc: str = "prefill", on_text: Callable[[str], None] | None = None) -> Generation:
    """:func:`stream_generate` (greedy unless ``sampler`` says otherwise, with a prefill progress bar
    unless ``progress=False``) run to its end; ``on_text`` receives each piece of text as it comes."""
    parts: list[str] = []
    seconds: list[float] = []
    for step in stream_generate(model, tokenizer, prompt_ids, max_new_tokens, sampler, chunk_size=chunk_size,
                                progress=progress, desc=desc):
        seconds.append(step.seconds)
        parts.append(step.text)
        if on_text is not None and step.text:
            on_text(step.text)
    prompt_tokens = torch.as_tensor(prompt_ids).numel()
    return Generation("".join(parts), len(seconds), prompt_tokens, sum(seconds[:1]), sum(seconds[1:]))
