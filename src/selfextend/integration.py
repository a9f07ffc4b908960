"""Switch SelfExtend on and off on a stock transformers model.

Integration uses transformers' public hooks only (no forward is replaced, no class is patched):

* ``AttentionInterface.register("selfextend", ...)`` receives q/k/v already rotated at their
  ordinary positions (k/v including the KV cache) plus ``position_ids``;
* ``AttentionMaskInterface.register("selfextend", ...)`` receives the mask arguments. It returns a
  small :class:`DeferredMask` instead of an L x L tensor; the original mask is built from it only
  when a layer takes the original attention path (sliding-window layers, inputs that fit);
* ``model.set_attn_implementation("selfextend")`` selects both; ``disable`` restores the original
  implementation. A forward pre-hook records which KV cache a forward uses, so grouped keys can be
  kept between decode steps.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import selfextend_row
from .settings import ContextLengthError, Settings
from .rope import inv_freq_for_layer

ATTENTION_NAME = "selfextend"  # must not contain "sdpa" or "flash": transformers keys behaviour off them
DECODE_ROWS = 64  # calls with at most this many queries keep their grouped keys for the next call

# model_type -> what was tested (tests/test_attention.py builds a tiny model of each)
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2/3, SmolLM, TinyLlama ...",
    "mistral": "Mistral (sliding-window layers keep their own attention)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "phi3": "Phi-3 / Phi-3.5",
    "gemma2": "Gemma 2 (local layers unchanged, logit softcapping)",
    "gemma3_text": "Gemma 3 text (local/global layers with their own rope theta)",
    "gpt_neox": "GPT-NeoX / Pythia (partial rotary)",
    "phi": "Phi-1/2 (partial rotary)",
}


class UnsupportedModelError(ValueError):
    """The model has no rotary position embedding (or cannot use transformers' attention hooks)."""


# ------------------------------------------------------------------------------------------------
# the mask and attention functions registered with transformers
# ------------------------------------------------------------------------------------------------


class DeferredMask:
    """The arguments of transformers' mask factory, kept instead of an ``[B, 1, Lq, Lk]`` tensor."""

    __slots__ = ("kwargs", "_built")

    def __init__(self, kwargs):
        self.kwargs = kwargs
        self._built = {}

    @property
    def local_size(self):
        return self.kwargs.get("local_size")

    @property
    def q_offset(self) -> int:
        return int(self.kwargs.get("q_offset") or 0)

    def build(self, implementation: str):
        """The mask the original attention implementation would have received."""
        if implementation not in self._built:
            self._built[implementation] = ALL_MASK_ATTENTION_FUNCTIONS[implementation](**self.kwargs)
        return self._built[implementation]


def selfextend_mask(**kwargs) -> DeferredMask:
    return DeferredMask(kwargs)


def selfextend_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function. query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]``
    (rotated at ordinary positions, cache included). Returns ``([B, Lq, Hq, D], None)``."""
    entry = _LAYERS.get(module)
    if entry is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation={ATTENTION_NAME!r} but was not set up "
            "by selfextend.enable(model); call selfextend.enable on the model that owns it"
        )
    handle, inv_freq = entry
    settings = handle.settings
    mask = attention_mask
    batch, _, lq, _ = query.shape
    q_offset = mask.q_offset if isinstance(mask, DeferredMask) else key.shape[2] - lq
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        last_positions = [q_offset + lq - 1] * batch
    else:
        last_positions = position_ids[:, -1].expand(batch).tolist()

    sliding = isinstance(mask, DeferredMask) and mask.local_size is not None
    if sliding and mask.local_size > settings.pretrained_length:
        handle.warn_once("sliding", f"sliding window {mask.local_size} exceeds the pretrained length "
                         f"{settings.pretrained_length}; this layer keeps its original attention")
    if sliding or all(settings.is_plain(p) for p in last_positions):
        # Nothing is grouped: take the original path, bit-identical to the plain model.
        original_mask = mask.build(handle.original_mask_impl) if isinstance(mask, DeferredMask) else mask
        return handle.original_attention(module)(
            module, query, key, value, original_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if mask is not None and not isinstance(mask, DeferredMask):
        raise NotImplementedError(
            "SelfExtend received a ready-made 4D attention mask; pass a 2D padding mask (or none) instead"
        )
    if position_ids is not None:
        padding = mask.kwargs.get("attention_mask") if isinstance(mask, DeferredMask) else None
        _check_contiguous(position_ids, last_positions, lq, padding, q_offset)
    if dropout and module.training:
        raise NotImplementedError("SelfExtend is an inference method: call model.eval() (attention dropout is on)")
    handle.warn_if_too_long(max(last_positions) + 1)

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q32, k32, v32 = query.float(), key.float(), value.float()
    out = torch.empty(batch, query.shape[1], lq, value.shape[-1], dtype=torch.float32, device=query.device)
    last_index = q_offset + lq - 1  # index of the last query inside the key tensor
    for b in range(batch):
        key_offset = last_index - last_positions[b]
        key_cache = handle.key_cache(module, b) if lq <= DECODE_ROWS else {}
        out[b] = selfextend_row(
            q32[b], k32[b], v32[b], last_positions[b] - (lq - 1), key_offset, settings, inv_freq, scale,
            softcap=kwargs.get("softcap"), key_cache=key_cache,
        )
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def _check_contiguous(position_ids, last_positions, lq, padding, q_offset):
    """SelfExtend derives key positions from the last query: each row's real tokens must have
    consecutive positions, and anything before them must be left padding (masked out)."""
    for b, last in enumerate(last_positions):
        m = min(lq, last + 1)
        tail = position_ids[b if position_ids.shape[0] > 1 else 0, lq - m :]
        consecutive = torch.equal(tail.cpu(), torch.arange(last - m + 1, last + 1))
        if consecutive and m < lq:  # earlier rows are taken as padding: the 2D mask must say so
            consecutive = padding is not None and not bool(padding[b, q_offset : q_offset + lq - m].any())
        if not consecutive:
            raise NotImplementedError(
                "SelfExtend needs consecutive position_ids per sequence (left padding is fine); "
                "packed sequences or custom position_ids are not supported"
            )


AttentionInterface.register(ATTENTION_NAME, selfextend_attention)
AttentionMaskInterface.register(ATTENTION_NAME, selfextend_mask)

# attention module -> (handle, inv_freq); weak so a deleted model leaves nothing behind
_LAYERS: "weakref.WeakKeyDictionary[nn.Module, tuple[SelfExtendHandle, torch.Tensor]]" = weakref.WeakKeyDictionary()
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, SelfExtendHandle]" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------
# the public handle
# ------------------------------------------------------------------------------------------------


class SelfExtendHandle:
    """SelfExtend switched on for one model. Also a context manager that switches it off."""

    def __init__(self, model, settings: Settings, original_impl: str, hook):
        self.model = model
        self.settings = settings
        self.original_impl = original_impl
        self.original_mask_impl = original_impl if original_impl in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
        self._hook = hook
        self._cache_ref = None
        self._key_caches = weakref.WeakKeyDictionary()  # KV cache object -> {(layer, row): {G: GroupedKeys}}
        self._warned = set()
        self._lock = threading.Lock()

    # -- what users read ------------------------------------------------------------------------
    @property
    def pretrained_length(self) -> int:
        return self.settings.pretrained_length

    @property
    def window(self) -> int:
        return self.settings.window

    @property
    def group_size(self) -> int | None:
        """The fixed G, or None when G is chosen per input length (and for rerope)."""
        g = self.settings.group_size
        return None if g is None or math.isinf(g) else g

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def max_length(self) -> int | None:
        """Longest input whose distances stay inside the trained range; None = unbounded (rerope).

        With ``group_size=None`` this is the limit at the largest automatic group size (64)."""
        return self.settings.max_length

    def group_size_for(self, length: int) -> float:
        """The group size SelfExtend uses for (the last token of) an input of ``length`` tokens."""
        return self.settings.group_size_for(length)

    def raise_if_too_long(self, length: int) -> None:
        """Raise :class:`ContextLengthError` if ``length`` tokens exceed the extended limit."""
        self.settings.raise_if_too_long(length)

    def warn_if_too_long(self, length: int) -> None:
        """Warn (once per handle), stating the limit, if ``length`` tokens exceed the extended limit."""
        try:
            self.settings.raise_if_too_long(length)
        except ContextLengthError as err:
            self.warn_once("limit", f"{err}; distances beyond the trained range will occur")

    def describe(self, length: int | None = None) -> str:
        return self.settings.describe(length)

    def __repr__(self):
        return f"<{self.describe()}>"

    # -- switching off --------------------------------------------------------------------------
    def disable(self) -> None:
        if _HANDLES.get(self.model) is not self:
            return
        for module in [m for m, (h, _) in list(_LAYERS.items()) if h is self]:
            del _LAYERS[module]
        self._hook.remove()
        self.model.set_attn_implementation(self.original_impl)
        del _HANDLES[self.model]
        self._key_caches = weakref.WeakKeyDictionary()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()
        return False

    # -- used by the attention function ---------------------------------------------------------
    def original_attention(self, module):
        fn = ALL_ATTENTION_FUNCTIONS.get(self.original_impl)
        if fn is None:  # "eager": the model file's own eager function (softcapping etc.)
            fn = sys.modules[type(module).__module__].eager_attention_forward
        return fn

    def key_cache(self, module, row: int) -> dict:
        cache = self._cache_ref() if self._cache_ref is not None else None
        if cache is None:
            return {}
        with self._lock:
            per_cache = self._key_caches.setdefault(cache, {})
            return per_cache.setdefault((id(module), row), {})

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _capture_cache(self, _module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is None:  # the name before transformers 5.24
            cache = kwargs.get("past_key_values")
        self._cache_ref = weakref.ref(cache) if cache is not None else None


# ------------------------------------------------------------------------------------------------
# enable / disable
# ------------------------------------------------------------------------------------------------


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")
            and "attention" in type(m).__name__.lower()]


def _unsupported(model, reason: str) -> UnsupportedModelError:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    families = ", ".join(SUPPORTED_MODEL_TYPES)
    return UnsupportedModelError(
        f"SelfExtend needs a transformers model with rotary position embeddings (RoPE); "
        f"{model_type!r} {reason}. Tested families (model_type): {families}"
    )


def enable(model: nn.Module, group_size: int | None = None, window: int | None = None,
           pretrained_length: int | None = None, mode: str = "floor", log_scale: bool = False,
           block_size: int | None = None) -> SelfExtendHandle:
    """Switch SelfExtend on for ``model`` and return a handle (also a context manager).

    Args:
        group_size: ``G``; None picks, for each query position ``p``, the smallest ``G`` with
            ``(L - w) * G + w >= p + 1`` -- so an input that fits the trained length is left exactly
            as the plain model computes it.
        window: neighbor window ``w`` (default ``L // 4``), ``1 <= w < L``.
        pretrained_length: ``L`` (default ``config.max_position_embeddings``).
        mode: "floor" (SelfExtend), "rerope" (G = infinity) or "leaky" (no floor).
        log_scale: multiply each query by ``max(1, log(p + 1) / log(L))`` (off by default).
        block_size: queries per block of the exact merge (default ``clamp(w, 128, 1024)``).

    An input longer than ``(L - w) * G + w`` gets a warning that states the limit (use
    ``handle.raise_if_too_long(n)`` to refuse it up front instead). Bad settings raise ValueError before
    anything changes.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise _unsupported(model, "is not a transformers PreTrainedModel")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    settings = Settings.from_config(text_config, group_size, window, pretrained_length, mode, log_scale, block_size)
    modules = _attention_modules(model)
    if not modules:
        raise _unsupported(model, "has no attention layers that transformers' attention interface drives")
    layer_types = getattr(text_config, "layer_types", None)
    freqs = {}
    for m in modules:
        layer_type = layer_types[m.layer_idx] if layer_types and m.layer_idx < len(layer_types) else None
        inv_freq = inv_freq_for_layer(model, text_config, layer_type)
        if inv_freq is None:
            raise _unsupported(model, "has no rotary position embedding")
        freqs[m] = inv_freq
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        warnings.warn(f"model_type {model_type!r} has RoPE but is not among the tested families "
                      f"({', '.join(SUPPORTED_MODEL_TYPES)}); check its outputs", stacklevel=2)

    if model in _HANDLES:  # re-enable with new settings
        _HANDLES[model].disable()
    original_impl = config._attn_implementation or "sdpa"
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except Exception as err:  # the model class does not accept custom attention functions
        model.set_attn_implementation(original_impl)
        raise _unsupported(model, f"cannot use a custom attention implementation ({err})") from err

    handle = SelfExtendHandle(model, settings, original_impl, hook=None)
    handle._hook = model.register_forward_pre_hook(handle._capture_cache, with_kwargs=True)
    for m in modules:
        _LAYERS[m] = (handle, freqs[m])
    _HANDLES[model] = handle
    return handle


def disable(model: nn.Module) -> None:
    """Switch SelfExtend off: the model computes exactly as it did before ``enable``."""
    handle = _HANDLES.get(model)
    if handle is not None:
        handle.disable()


def is_enabled(model: nn.Module) -> bool:
    return model in _HANDLES


def get_handle(model: nn.Module) -> SelfExtendHandle | None:
    return _HANDLES.get(model)
