"""Running a model on one long input: prefill with a progress bar, then decode with the KV cache.

Used by the CLI commands and the evaluation. The prefill feeds all but the last token (in one pass,
or in chunks of ``chunk_size``) into a ``DynamicCache`` with a tqdm bar that ticks per decoder layer;
``model.generate`` then continues from that cache, so decoding is the library's ordinary path.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder layers (the ModuleList with ``num_hidden_layers`` entries)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


@contextmanager
def layer_progress(model, total_passes: int, desc: str, enabled: bool = True):
    """A tqdm bar that advances once per decoder layer forward, for ``total_passes`` passes."""
    layers = decoder_layers(model)
    bar = tqdm(total=len(layers) * total_passes, desc=desc, unit="layer", leave=False, disable=not enabled)

    def tick(*_):  # a forward hook must return None, or it replaces the layer's output
        bar.update(1)

    hooks = [layer.register_forward_hook(tick) for layer in layers]
    try:
        yield bar
    finally:
        for h in hooks:
            h.remove()
        bar.close()


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, chunk_size: int | None = None, desc: str = "prefill",
            progress: bool = True, attention_mask: torch.Tensor | None = None) -> DynamicCache:
    """Run ``input_ids[:, :-1]`` through the model into a fresh KV cache; return the cache."""
    n = input_ids.shape[1] - 1
    chunk = chunk_size or max(n, 1)
    starts = list(range(0, n, chunk))
    cache = DynamicCache(config=model.config)
    with layer_progress(model, len(starts), desc, progress):
        for s in starts:
            e = min(s + chunk, n)
            kwargs = {}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask[:, :e]
            model(input_ids=input_ids[:, s:e], cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
    return cache


@dataclass
class Generation:
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
        return self.new_tokens / max(self.decode_seconds, 1e-9)


@torch.inference_mode()
def generate(model, tokenizer, input_ids: list[int] | torch.Tensor, max_new_tokens: int = 32, streamer=None,
             chunk_size: int | None = None, progress: bool = True, desc: str = "prefill",
             **generate_kwargs) -> Generation:
    """Prefill (with progress) then ``model.generate`` from the cache; greedy unless told otherwise."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    t0 = time.perf_counter()
    cache = prefill(model, ids, chunk_size, desc, progress)
    t1 = time.perf_counter()
    generate_kwargs.setdefault("do_sample", False)
    if not generate_kwargs["do_sample"]:
        generate_kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache,
                         max_new_tokens=max_new_tokens, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **generate_kwargs)
    t2 = time.perf_counter()
    new = out[0, ids.shape[1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), len(new), ids.shape[1], t1 - t0, t2 - t1)


def chat_or_plain_ids(tokenizer, text: str, chat: bool | None = None) -> list[int]:
    """Token ids of ``text`` as one user turn of the chat template when the tokenizer has one."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer(text)["input_ids"])
