"""selfextend.generation, the one generation loop of the CLI, the evaluation, the server and the
benchmark: greedy tokens against ``model.generate`` (the independent reference), logprobs, sampling,
chat encoding, text streaming with stop strings, progress and cancellation, on the tiny checkpoint."""

from __future__ import annotations

import threading
from contextlib import closing

import pytest
import torch

import selfextend
from selfextend import generation
from selfextend.assets import load_model
from selfextend.generation import (
    GenerationCancelled, TextStream, decode_tokens, decoder_layers, encode_prompt, generate, make_sampler,
    stream_generate, token_logprobs,
)
from tiny_checkpoint import TINY_LENGTH

LONG_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 2  # past 64 tokens


@pytest.fixture
def extended(loaded):
    """(model, tokenizer, prompt ids longer than the trained length) with SelfExtend on (G = 2)."""
    model, tokenizer = loaded
    ids = encode_prompt(tokenizer, LONG_TEXT, chat=False)
    assert TINY_LENGTH < len(ids) <= 90  # the extended limit is (64 - 16) * 2 + 16 = 112
    with selfextend.enable(model, group_size=2):
        yield model, tokenizer, ids


def reference(model, ids: list[int], max_new_tokens: int):
    """Greedy new tokens of ``model.generate`` and the logits of each step."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [logits[0] for logits in out.logits]


def scripted(tokens: list[int]):
    """A sampler that ignores the logits and returns ``tokens`` in order."""
    it = iter(tokens)
    return lambda _logits: next(it)


# ------------------------------------------------------------------------------------------------
# tokens
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 32])
def test_greedy_tokens_equal_model_generate(extended, chunk_size):
    model, tokenizer, ids = extended
    expected, _ = reference(model, ids, 12)
    steps = list(stream_generate(model, tokenizer, ids, 12, chunk_size=chunk_size))
    assert [s.token for s in steps] == expected
    assert "".join(s.text for s in steps) == tokenizer.decode(expected, skip_special_tokens=True)
    assert steps[-1].finish == "length" and all(s.finish is None for s in steps[:-1])


def test_logprobs_are_the_model_log_softmax_with_its_top_tokens(extended):
    model, tokenizer, ids = extended
    expected, logits = reference(model, ids, 6)
    steps = list(decode_tokens(model, ids, 6, logprobs=3))
    assert [s.token for s in steps] == expected
    for step, step_logits in zip(steps, logits):
        logprobs = torch.log_softmax(step_logits.float(), dim=-1)
        assert step.logprob == pytest.approx(float(logprobs[step.token]), abs=1e-4)
        best = logprobs.topk(3)
        assert [t for t, _ in step.top] == best.indices.tolist()
        assert [lp for _, lp in step.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_logprobs_are_clamped_like_openai():
    logprob, top = token_logprobs(torch.tensor([0.0, -1e6, -1.0]), 1, 2)
    assert logprob == -9999.0
    assert [t for t, _ in top] == [0, 2]


def test_decode_tokens_times_each_forward_and_never_stops_early(loaded):
    """What the benchmark needs: the prefill, then one step per forward pass, whatever the tokens."""
    model, tokenizer = loaded
    eos = tokenizer.eos_token_id
    steps = list(decode_tokens(model, encode_prompt(tokenizer, "The sky", chat=False), 4, scripted([eos] * 4)))
    assert [s.token for s in steps] == [eos] * 4
    assert all(s.seconds > 0 for s in steps)


def test_an_empty_prompt_is_refused(loaded):
    with pytest.raises(ValueError, match="the prompt is empty"):
        next(decode_tokens(loaded[0], [], 4))


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    assert make_sampler(0.0)(logits) == 1


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-38, 2e-38, 1e-30])
@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature, top_p):
    """1e-40 or 1e-300 used to give inf / inf = nan probabilities (multinomial raised); just above
    float32's smallest normal number (2e-38) logits of 30 still overflowed when divided."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = 30 * torch.randn(1000, generator=generator)  # [vocab]
        sample = make_sampler(temperature, top_p=top_p, seed=1)
        assert [sample(logits) for _ in range(5)] == [int(logits.argmax())] * 5
    bfloat16 = torch.tensor([3.0, 2.0, 1e4, -1e4], dtype=torch.bfloat16)  # any dtype of logits
    assert make_sampler(temperature, top_p=top_p, seed=1)(bfloat16) == 2


@pytest.mark.parametrize("seed", [0, 2**64 - 1, -(2**63)])
def test_a_seed_makes_sampling_reproducible(seed):
    logits = torch.zeros(50)
    first, second = make_sampler(1.0, seed=seed), make_sampler(1.0, seed=seed)
    draws = [first(logits) for _ in range(20)]
    assert draws == [second(logits) for _ in range(20)]
    assert len(set(draws)) > 1  # it does sample


def test_sampling_follows_the_softmax_at_the_temperature():
    sample = make_sampler(2.0, seed=0)
    logits = torch.tensor([0.0, 2 * torch.log(torch.tensor(3.0))])  # at T = 2: probabilities 1/4 and 3/4
    ones = sum(sample(logits) for _ in range(4000))
    assert ones / 4000 == pytest.approx(0.75, abs=0.03)


def test_top_p_keeps_only_the_nucleus():
    sample = make_sampler(5.0, top_p=0.5, seed=0)
    logits = torch.tensor([0.0, 0.0, 0.0, 10.0])  # at T = 5 the most likely token alone holds 0.71
    assert {sample(logits) for _ in range(200)} == {3}
    sample = make_sampler(1.0, top_p=0.9, seed=0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # nucleus of 0.9: the first three
    assert {sample(logits) for _ in range(500)} == {0, 1, 2}


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------


def test_chat_encoding_is_the_template_tokenized_without_special_tokens(loaded):
    _, tokenizer = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the pass key?"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    assert encode_prompt(tokenizer, messages) == list(expected)
    one_turn = [{"role": "user", "content": "The sky is blue."}]
    assert encode_prompt(tokenizer, "The sky is blue.") == encode_prompt(tokenizer, one_turn)  # it has a template
    assert encode_prompt(tokenizer, "The sky is blue.", chat=False) == tokenizer("The sky is blue.").input_ids


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------


def test_text_stream_holds_back_partial_stops_and_characters():
    utf8 = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), stop=["<|end|>"])
    assert [utf8.push(b) for b in "a\u00e9<|x".encode()] == ["a", "", "\u00e9", "", "", "<|x"]
    stream = TextStream(lambda ids: bytes(ids).decode(), stop=["<|end|>", "STOP"])
    assert "".join(stream.push(b) for b in b"Hi <|end") == "Hi "  # "<|end" may still become a stop string
    assert stream.flush() == "<|end" and not stream.stopped  # ... unless the generation ends first
    stream = TextStream(lambda ids: bytes(ids).decode(), stop=["<|end|>"])
    assert "".join(stream.push(b) for b in b"Hi <|end|>") == "Hi " and stream.stopped
    assert stream.flush() == ""


def test_the_end_of_sequence_token_ends_the_stream(loaded):
    model, tokenizer = loaded
    words = tokenizer("The sky is", add_special_tokens=False).input_ids
    tokens = words + [tokenizer.eos_token_id, *words]
    steps = list(stream_generate(model, tokenizer, words, 20, scripted(tokens)))
    assert [s.token for s in steps] == words + [tokenizer.eos_token_id]
    assert "".join(s.text for s in steps) == "The sky is"
    assert steps[-1].finish == "end_of_sequence"


def test_a_stop_string_cuts_the_text_and_ends_the_stream(loaded):
    model, tokenizer = loaded
    tokens = tokenizer("The grass is green. The sky is blue.", add_special_tokens=False).input_ids
    steps = list(stream_generate(model, tokenizer, tokens[:2], 20, scripted(tokens), stop=["sky"]))
    assert "".join(s.text for s in steps) == "The grass is green. The "
    assert steps[-1].finish == "stop_string" and len(steps) < len(tokens)
    offsets = [s.offset for s in steps]
    assert offsets == sorted(offsets) and offsets[0] == 0  # where each token's text starts


def test_generate_collects_the_text_and_the_times(extended):
    model, tokenizer, ids = extended
    expected, _ = reference(model, ids, 5)
    pieces: list[str] = []
    result = generate(model, tokenizer, torch.tensor([ids]), 5, progress=False, on_text=pieces.append)
    assert result.text == "".join(pieces) == tokenizer.decode(expected, skip_special_tokens=True)
    assert (result.prompt_tokens, result.new_tokens) == (len(ids), 5)
    assert result.prefill_seconds > 0 and result.decode_seconds > 0


# ------------------------------------------------------------------------------------------------
# progress and cancellation
# ------------------------------------------------------------------------------------------------


def test_the_progress_bar_ticks_once_per_layer_and_chunk(loaded, monkeypatch):
    model, tokenizer = loaded
    bars = []

    class Bar(generation.tqdm):
        def close(self):
            if not self.disable:  # (tqdm closes a bar again when it is deleted)
                bars.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(generation, "tqdm", Bar)
    ids = encode_prompt(tokenizer, "The grass is green. The sky is blue.", chat=False)
    list(decode_tokens(model, ids, 3, chunk_size=4, progress=True, desc="reading"))
    passes = -(-len(ids) // 4)
    assert bars == [("reading", 2 * passes, 2 * passes)]  # two decoder layers; the bar covers the prefill only


def counting_layers(model) -> list[int]:
    """Indices of the decoder layers as they finish (a forward hook on each)."""
    ran = []
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_hook(lambda _m, _a, _o, i=i: ran.append(i))
    return ran


@pytest.fixture
def fresh(tiny):
    """A model of its own (the tests below add hooks to it)."""
    return load_model(tiny)


def test_cancelled_before_the_start_runs_nothing(fresh):
    model, tokenizer = fresh
    ran = counting_layers(model)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(GenerationCancelled):
        next(stream_generate(model, tokenizer, [5, 6, 7], 4, cancelled=cancelled))
    assert ran == []


def test_cancelling_during_the_prefill_stops_at_the_next_layer(fresh):
    model, tokenizer = fresh
    cancelled = threading.Event()
    decoder_layers(model)[0].register_forward_hook(lambda *_: cancelled.set())  # set while layer 0 runs
    ran = counting_layers(model)
    with pytest.raises(GenerationCancelled):
        next(decode_tokens(model, [5, 6, 7, 8], 4, cancelled=cancelled))
    assert ran == [0]  # layer 1 never ran


def test_cancelling_between_tokens_stops_before_the_next(fresh):
    model, tokenizer = fresh
    cancelled = threading.Event()
    steps = stream_generate(model, tokenizer, [5, 6, 7, 8], 10, cancelled=cancelled)
    next(steps), next(steps)
    cancelled.set()
    with pytest.raises(GenerationCancelled):
        next(steps)


def hooks(model) -> dict[str, int]:
    """Module name -> how many forward and forward pre-hooks the module has."""
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()}


def test_a_closed_generation_leaves_no_hook_behind(fresh):
    model, tokenizer = fresh
    before = hooks(model)
    cancelled = threading.Event()
    with closing(stream_generate(model, tokenizer, [5, 6, 7, 8], 10, cancelled=cancelled)) as steps:
        next(steps)
        running = hooks(model)
    assert sum(running.values()) > sum(before.values())  # a running generation hooks the decoder layers
    assert hooks(model) == before  # closed: every hook it added is gone
    cancelled.set()
    with torch.no_grad():
        model(torch.tensor([[5, 6]]))  # no GenerationCancelled either
