"""Long prompts with a known answer: passkey retrieval and needle in a haystack.

Both are built to a target length in *tokens* of the model's own tokenizer, with the fact inserted
at a chosen depth (0 = start of the filler, 1 = end). Every builder is deterministic given its
arguments, so every method in an evaluation sees exactly the same input ids.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# The Landmark-attention passkey prompt (Mohtashami & Jaggi 2023), as used in the SelfExtend paper.
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_FACT = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

# Needle in a haystack (Kamradt 2023) on the Paul Graham essays.
NEEDLE_FACT = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_QUESTION = "What is the best thing to do in San Francisco? Answer: The best thing to do in San Francisco is"
NEEDLE_ANSWER_WORDS = ("sandwich", "dolores")


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    answer: str        # what a correct continuation must contain
    depth: float       # requested depth of the fact in the filler
    fact_token: int    # index of the first token of the fact in input_ids


def random_key(rng: random.Random, digits: int = 5) -> str:
    """A key of ``digits`` decimal digits with no leading zero."""
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(digits - 1))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix_ids(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", True) else []


def _assemble(tokenizer, length: int, head: str, filler_ids: list[int], fact: str, tail: str, depth: float,
              answer: str) -> Prompt:
    """head + filler[:k] + fact + filler[k:n] + tail, with n chosen so the total is ``length``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    prefix = _prefix_ids(tokenizer)
    head_ids, fact_ids, tail_ids = (_encode(tokenizer, t) for t in (head, fact, tail))
    budget = length - len(prefix) - len(head_ids) - len(fact_ids) - len(tail_ids)
    if budget < 0:
        raise ValueError(f"length {length} is too short for this prompt (needs at least {length - budget})")
    if budget > len(filler_ids):
        raise ValueError(f"not enough filler text for {length} tokens ({len(filler_ids)} available)")
    filler = filler_ids[:budget]
    cut = round(depth * budget)
    ids = prefix + head_ids + filler[:cut] + fact_ids + filler[cut:] + tail_ids
    return Prompt(ids, answer, depth, len(prefix) + len(head_ids) + cut)


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> Prompt:
    """The Landmark passkey prompt of ``length`` tokens with ``key`` at ``depth``."""
    unit = _encode(tokenizer, " " + PASSKEY_FILLER)
    filler = unit * (length // max(1, len(unit)) + 1)
    return _assemble(tokenizer, length, PASSKEY_TASK, filler, " " + PASSKEY_FACT.format(key=key) + " ",
                     " " + PASSKEY_QUESTION, depth, key)


def needle_prompt(tokenizer, haystack_ids: list[int], length: int, depth: float) -> Prompt:
    """The needle sentence at ``depth`` in the first tokens of the essays, then the question."""
    return _assemble(tokenizer, length, "", haystack_ids, " " + NEEDLE_FACT + " ",
                     "\n\n" + NEEDLE_QUESTION, depth, NEEDLE_ANSWER_WORDS[0])


def passkey_correct(answer: str, key: str) -> bool:
    """The first number in the answer is the key."""
    found = re.findall(r"\d+", answer)
    return bool(found) and found[0] == key


def needle_score(answer: str) -> float:
    """Fraction of the needle's key words found in the answer (0, 0.5 or 1)."""
    text = answer.lower()
    return sum(w in text for w in NEEDLE_ANSWER_WORDS) / len(NEEDLE_ANSWER_WORDS)
