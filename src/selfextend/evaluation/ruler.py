"""RULER's synthetic tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", github.com/NVIDIA/RULER, ``scripts/data/synthetic/*.py`` and ``constants.py``),
generated offline: the haystacks are the bundled essays, RULER's noise sentence or generated needles;
keys and words are wonderwords' lists (as RULER's), numbers, uuids and coded words are drawn from a
seeded generator. Every task is built in the model's own tokens to a target length, inside the model's
chat template when it has one, and is deterministic given (task, length, haystack index, seed).

A *haystack* is one prompt prefix (the chat template's head, the task's instruction and the context);
its *questions* are suffixes (the question, the template's tail and RULER's answer prefix) asked from
copies of the KV cache after one prefill. Where the task names what it asks for (every needle task and
variable tracking), a haystack holds ``questions`` needle sets at RULER's random depths, each asked
separately; the other sets are extra distractors with other keys (RULER's multi-key task has 3 such).
Common- and frequent-words extraction have one question per haystack (the list is the task).

Scoring is RULER's ``string_match_all``: the fraction of the expected values found (case-insensitive
substring) in the answer; a question is fully correct when the fraction is 1.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from dataclasses import dataclass, field

# RULER's templates (scripts/data/synthetic/constants.py); {type_needle_v} etc. filled per task
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.")
NIAH_QUESTION = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
NIAH_ANSWER = "The special magic {type_needle_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_TEMPLATE = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER = ("Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are:")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER = "Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words.")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_ANSWER = "Answer: According to the coded text above, the three most frequently appeared words are:"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))


@dataclass(frozen=True)
class TaskSpec:
    """One RULER task (scripts/synthetic.yaml) and how many tokens RULER lets it generate."""
    kind: str  # niah, vt, cwe, fwe
    family: str  # the summary's task family
    haystack: str = "essay"  # essay, noise or needle
    key: str = "words"
    value: str = "numbers"
    keys: int = 1  # needle keys per set (num_needle_k)
    values: int = 1  # values per key (num_needle_v)
    asked: int = 1  # keys asked per question (num_needle_q)
    new_tokens: int = 32


TASKS = {
    "niah_single_1": TaskSpec("niah", "single needle", haystack="noise", new_tokens=24),
    "niah_single_2": TaskSpec("niah", "single needle", new_tokens=24),
    "niah_single_3": TaskSpec("niah", "single needle", value="uuids", new_tokens=48),
    "niah_multikey_1": TaskSpec("niah", "multi-key", keys=4, new_tokens=24),
    "niah_multikey_2": TaskSpec("niah", "multi-key", haystack="needle", new_tokens=24),
    "niah_multikey_3": TaskSpec("niah", "multi-key", haystack="needle", key="uuids", value="uuids", new_tokens=48),
    "niah_multivalue": TaskSpec("niah", "multi-value", values=4, new_tokens=64),
    "niah_multiquery": TaskSpec("niah", "multi-query", keys=4, asked=4, new_tokens=64),
    "vt": TaskSpec("vt", "variable tracking", haystack="noise", new_tokens=30),
    "cwe": TaskSpec("cwe", "common words", new_tokens=120),
    "fwe": TaskSpec("fwe", "frequent words", new_tokens=50),
}


@dataclass
class Question:
    suffix_ids: list[int]  # question + template tail + answer prefix
    answers: list[str]  # every value the answer must contain
    depths: list[float] = field(default_factory=list)  # depth (0..1) of each needle the question asks about


@dataclass
class Haystack:
    task: str
    prefix_ids: list[int]  # template head + instruction + context: prefilled once
    questions: list[Question]

    @property
    def length(self) -> int:
        """The longest prompt (prefix + question) of this haystack, in tokens."""
        return len(self.prefix_ids) + max(len(q.suffix_ids) for q in self.questions)


def score(answer: str, expected: list[str]) -> float:
    """RULER's string_match_all for one answer: the fraction of ``expected`` found in it (lowercase),
    after RULER's postprocessing (control characters become newlines)."""
    text = re.sub(r"[\x00-\x1f]", "\n", answer.strip()).strip().lower()
    return sum(e.lower() in text for e in expected) / len(expected)


# ------------------------------------------------------------------------------------------------
# words, numbers, uuids (RULER's generators, on a seeded random.Random)
# ------------------------------------------------------------------------------------------------
_WORDS = {}


def word_lists() -> dict[str, list[str]]:
    """wonderwords' nouns, adjectives and verbs, as RULER reads them."""
    if not _WORDS:
        from wonderwords import random_word

        for name in ("noun", "adjective", "verb"):
            _WORDS[name] = random_word._get_words_from_text_file(f"{name}list.txt")
    return _WORDS


def _key_words() -> tuple[list[str], list[str]]:
    """RULER's keys are "adjective-noun" (a uniform pick from all pairs: an adjective, then a noun)."""
    lists = word_lists()
    return sorted(set(lists["adjective"])), sorted(set(lists["noun"]))


def _random(rng: random.Random, kind: str, words: tuple[list[str], list[str]]) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(words[0])}-{rng.choice(words[1])}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _singular(text: str) -> str:
    """RULER's rewording when a question asks for one value."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


# ------------------------------------------------------------------------------------------------
# prompts in tokens
# ------------------------------------------------------------------------------------------------
class Builder:
    """Token ids of texts in one model's tokenizer, and its chat template split around the user text."""

    MARK = "\u0000USER\u0000"

    def __init__(self, tokenizer, chat: bool | None = None):
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        if chat is None:
            chat = bool(template)
        if chat:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": self.MARK}],
                                                     add_generation_prompt=True, tokenize=False)
            self.head, self.tail = rendered.split(self.MARK)
            self.bos = []
        else:
            self.head, self.tail = "", "\n"
            bos = getattr(tokenizer, "bos_token_id", None)
            self.bos = [bos] if bos is not None and getattr(tokenizer, "add_bos_token", True) else []
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def many(self, texts: list[str]) -> list[list[int]]:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            for t, ids in zip(todo, self.tokenizer(todo, add_special_tokens=False)["input_ids"]):
                self._cache[t] = ids
        return [self._cache[t] for t in texts]

    def prefix(self, instruction: str) -> list[int]:
        return self.bos + self.ids(self.head + instruction)

    def suffix(self, question: str, answer_prefix: str) -> list[int]:
        return self.ids(question + self.tail + answer_prefix)


def fill(units: list[list[int]], budget: int, needles: list[tuple[float, list[int]]]) -> tuple[list[int], list[int]]:
    """Filler units (token lists, used in order, cycling) up to exactly ``budget`` tokens in all, with
    each needle (depth in [0, 1], ids) inserted between units at that depth. Returns (ids, the index of
    each needle's first token in ids)."""
    room = budget - sum(len(ids) for _, ids in needles)
    if room < 0:
        raise ValueError(f"{budget} tokens are too few for the needles ({budget - room} tokens)")
    chosen, used, i = [], 0, 0
    while used < room:
        unit = units[i % len(units)][: room - used]
        chosen.append(unit)
        used += len(unit)
        i += 1
    order = sorted(range(len(needles)), key=lambda n: needles[n][0])
    slots = {}
    for n in order:  # needle n goes before unit `slot` (several at one slot keep depth order)
        slots.setdefault(min(len(chosen), round(needles[n][0] * len(chosen))), []).append(n)
    ids, starts = [], [0] * len(needles)
    for s in range(len(chosen) + 1):
        for n in slots.get(s, []):
            starts[n] = len(ids)
            ids += needles[n][1]
        if s < len(chosen):
            ids += chosen[s]
    return ids, starts


def _essay_units(builder: Builder, essays: str) -> list[list[int]]:
    """The essays as sentences (RULER joins its essays and splits them with NLTK; here a regex on the
    whitespace-normalised text), each with its leading space, in tokens."""
    if "essay_units" not in builder._cache:
        text = re.sub(r"\s+", " ", essays).strip()
        sentences = re.split(r"(?<=[.!?])\s+", text)
        builder._cache["essay_units"] = builder.many([" " + s for s in sentences])
    return builder._cache["essay_units"]


def _haystack_units(builder, spec: TaskSpec, essays: str | None, rng, words) -> tuple[list[list[int]], str]:
    """(filler units, separator before a needle): essay sentences, RULER's noise sentence as lines, or
    lines of random needles (multi-key 2/3)."""
    if spec.haystack == "essay":
        return _essay_units(builder, essays), " "
    if spec.haystack == "noise":
        return [builder.ids("\n" + NOISE)], "\n"
    lines = ["\n" + NEEDLE.format(type_needle_v=spec.value, key=_random(rng, spec.key, words),
                                  value=_random(rng, spec.value, words)) for _ in range(4000)]
    return builder.many(lines), "\n"


def niah(builder: Builder, task: str, length: int, questions: int, rng: random.Random, essays: str | None) -> Haystack:
    """A needle-in-a-haystack haystack of RULER ``task`` with ``questions`` needle sets."""
    spec = TASKS[task]
    words = _key_words()
    one = spec.asked * spec.values == 1
    fix = _singular if one else (lambda t: t)
    value_word = spec.value[:-1] if one else spec.value
    sets, used_keys = [], set()
    for _ in range(questions):
        keys, values = [], []
        while len(keys) < spec.keys:
            key = _random(rng, spec.key, words)
            if key not in used_keys:
                used_keys.add(key)
                keys.append(key)
                values.append([_random(rng, spec.value, words) for _ in range(spec.values)])
        asked = rng.sample(range(spec.keys), spec.asked)
        sets.append((keys, values, asked))
    units, sep = _haystack_units(builder, spec, essays, rng, words)
    needle_texts = [(s, k) for s, (keys, values, _) in enumerate(sets) for k in range(len(keys)) for _ in values[k]]
    depth_pool = DEPTHS * math.ceil(len(needle_texts) / len(DEPTHS))
    depths = [d / 100 for d in rng.sample(depth_pool, len(needle_texts))]
    needles, owner = [], []
    counters = {}
    for (s, k), depth in zip(needle_texts, depths):
        v = counters.get((s, k), 0)
        counters[(s, k)] = v + 1
        text = NEEDLE.format(type_needle_v=spec.value, key=sets[s][0][k], value=sets[s][1][k][v])
        needles.append((depth, builder.ids(sep + text)))
        owner.append((s, k, depth))
    prefix = builder.prefix(fix(NIAH_TEMPLATE).format(type_needle_v=value_word) + "\n")
    qs = []
    for s, (keys, values, asked) in enumerate(sets):
        names = [keys[a] for a in asked]
        query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
        question = "\n" + fix(NIAH_QUESTION).format(type_needle_v=value_word, query=query)
        answer = fix(NIAH_ANSWER).format(type_needle_v=value_word, query=query)
        qs.append(Question(builder.suffix(question, answer), [v for a in asked for v in values[a]],
                           [d for (s2, k, d) in owner if s2 == s and k in asked]))
    budget = length - len(prefix) - max(len(q.suffix_ids) for q in qs)
    context, _ = fill(units, budget, needles)
    return Haystack(task, prefix + context, qs)


def _chain(rng: random.Random, hops: int, taken: set[str]) -> tuple[list[str], str]:
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names, str(rng.randint(10000, 99999))


def _vt_example(builder: Builder, rng: random.Random) -> str:
    """RULER's in-context example for variable tracking: one chain in a short noise text, answered."""
    names, value = _chain(rng, 4, set())
    lines = [NOISE] * 12
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(4)]
    for pos, j in zip(sorted(rng.sample(range(len(lines)), 5)), range(5)):
        lines.insert(pos + j, statements[j])
    context = "\n".join(lines).replace(". \n", ".\n")
    return (VT_TEMPLATE + "\n\n" + context + "\n" + VT_QUESTION.format(query=value) + " "
            + VT_ANSWER.format(num_v=5, query=value) + " " + " ".join(names) + "\n")


def vt(builder: Builder, task: str, length: int, questions: int, rng: random.Random, essays=None) -> Haystack:
    """Variable tracking (1 chain of 4 hops per question, RULER's default) in the noise haystack, with
    RULER's in-context example before the instruction."""
    taken = set()
    chains = [_chain(rng, 4, taken) for _ in range(questions)]
    example = _vt_example(builder, rng)
    statements = [(c, f"VAR {names[0]} = {value}" if j == 0 else f"VAR {names[j]} = VAR {names[j - 1]} ")
                  for c, (names, value) in enumerate(chains) for j in range(5)]
    # RULER inserts each chain's statements in order at sorted random line positions
    depths = []
    for c in range(questions):
        depths += sorted(rng.random() for _ in range(5))
    needles = [(d, builder.ids("\n" + text)) for d, (_, text) in zip(depths, statements)]
    prefix = builder.prefix(example + VT_TEMPLATE + "\n\n")
    qs = [Question(builder.suffix("\n" + VT_QUESTION.format(query=value), VT_ANSWER.format(num_v=5, query=value)),
                   names, depths[5 * c : 5 * c + 5]) for c, (names, value) in enumerate(chains)]
    budget = length - len(prefix) - max(len(q.suffix_ids) for q in qs)
    context, _ = fill([builder.ids("\n" + NOISE)], budget, needles)
    return Haystack(task, prefix + context, qs)


def _fit(build, length: int, low: int, high: int):
    """The largest count in [low, high] whose ``build(count)`` prompt has at most ``length`` tokens
    (RULER's binary search), and that prompt."""
    best = None
    while low <= high:
        mid = (low + high) // 2
        made = build(mid)
        if made.length <= length:
            best, low = made, mid + 1
        else:
            high = mid - 1
    if best is None:
        raise ValueError(f"{length} tokens are too few for this task")
    return best


def cwe(builder: Builder, task: str, length: int, questions: int, rng: random.Random, essays=None) -> Haystack:
    """Common words extraction: a numbered list where 10 words appear 30 times and the others 3 times
    (RULER's settings for 4096 tokens and more), after one solved example (40 words, 10 / 3 times)."""
    lists = word_lists()
    pool = sorted(set(lists["noun"] + lists["adjective"] + lists["verb"]))
    random.Random(rng.random()).shuffle(pool)
    shuffle_seed = rng.random()
    example_words = rng.sample(pool, 40)
    sample_words = rng.sample(pool, min(len(pool), length // 3))

    def numbered(words, common, repeats, rare):
        items = words[:common] * repeats + words[common:] * rare
        random.Random(shuffle_seed).shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    example = (CWE_TEMPLATE + "\n" + numbered(example_words, 10, 10, 3) + "\n" + CWE_QUESTION + " "
               + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example_words[:10])))

    def build(count):
        words = sample_words[:count]
        prefix = builder.prefix(example + "\n" + CWE_TEMPLATE + "\n" + numbered(words, 10, 30, 3))
        return Haystack(task, prefix, [Question(builder.suffix("\n" + CWE_QUESTION, CWE_ANSWER), words[:10])])

    return _fit(build, length, 11, len(sample_words))


def fwe(builder: Builder, task: str, length: int, questions: int, rng: random.Random, essays=None) -> Haystack:
    """Frequent words extraction: coded 6-letter words drawn from a Zipf distribution (alpha 2), the
    most frequent one written as '...'; the answer is the next three."""
    vocab_size = max(10, (length - 50) // 50)
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."
    shuffle_seed = rng.random()
    zeta = math.pi ** 2 / 6  # zeta(2)

    def build(count):
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(count * k ** -2.0 / zeta))]
        random.Random(shuffle_seed).shuffle(words)
        prefix = builder.prefix(FWE_TEMPLATE + " " + " ".join(words))
        return Haystack(task, prefix, [Question(builder.suffix("\n" + FWE_QUESTION, FWE_ANSWER), vocab[1:4])])

    return _fit(build, length, 10, length)


GENERATORS = {"niah": niah, "vt": vt, "cwe": cwe, "fwe": fwe}


def questions_per_haystack(task: str, questions: int) -> int:
    """How many questions a haystack of ``task`` holds when ``questions`` are asked for."""
    return 1 if TASKS[task].kind in ("cwe", "fwe") else questions


def make_haystack(builder: Builder, task: str, length: int, index: int, questions: int, seed: int = 0,
                  essays: str | None = None) -> Haystack:
    """Haystack number ``index`` of ``task`` at ``length`` tokens: the same for the same arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    spec = TASKS[task]
    return GENERATORS[spec.kind](builder, task, length, questions_per_haystack(task, questions), rng, essays)
