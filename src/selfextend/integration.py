"""Switch SelfExtend on and off on a stock transformers model.

Integration uses transformers' public hooks only (no forward is replaced, no class is patched):

* ``AttentionInterface.register("selfextend", ...)`` receives q/k/v already rotated at their
  ordinary positions (k/v including the KV cache) plus ``position_ids``;
* ``AttentionMaskInterface.register("selfextend", ...)`` receives the mask arguments. It returns a
  small :class:`~selfextend.call.DeferredMask` instead of an L x L tensor; the original mask is built
  from it only when a layer takes the original attention path (inputs that fit);
* ``model.set_attn_implementation("selfextend")`` selects both; ``disable`` restores the original
  implementation.

Importing this module registers the name ``"selfextend"`` with transformers, process-wide (it changes
nothing for models that do not select it).

Where the state lives, so that copies, threads and caches behave:

* the settings of an enabled model live on the model: ``model._selfextend`` (a :class:`ModelSetup`)
  and one :class:`LayerSetup` per attention module (``module._selfextend``). ``copy.deepcopy``,
  ``pickle`` and ``torch.save`` of an enabled model therefore give an enabled copy;
* the state of one forward call (the cache it uses, positions per row) lives in the call's
  :class:`~selfextend.call.DeferredMask`, the object every attention layer of the call receives as
  its mask; a forward pre-hook on each attention module hands it the call's KV cache;
* what a sequence keeps between calls (its schedule of G, its grouped keys) lives with the KV cache it
  belongs to (:mod:`selfextend.sequence`), checked against it at every call.
"""

from __future__ import annotations

import sys
import uuid
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import output_capturing

from .attention import DECODE_ROWS, Row, needs_grad, selfextend_row, sliding_window_row
from .call import DeferredMask, hand_over_cache, remove_hand_over, row_layouts, selfextend_mask
from .rope import Rotary, RotaryError, layer_rotary
from .sequence import SequenceState, new_call, prompt_length, state_for
from .settings import ContextLengthError, Settings

ATTENTION_NAME = "selfextend"  # must not contain "sdpa" or "flash": transformers keys behaviour off them

# model_type -> what was tested (tests/test_attention.py builds a tiny model of each)
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2/3, SmolLM, TinyLlama ...",
    "mistral": "Mistral, with and without sliding window (window layers: no grouping)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "phi3": "Phi-3 / Phi-3.5",
    "gemma2": "Gemma 2 (local layers unchanged, logit softcapping)",
    "gemma3_text": "Gemma 3 text (local/global layers with their own rope theta)",
    "gpt_neox": "GPT-NeoX / Pythia (partial rotary)",
    "phi": "Phi-1/2 (partial rotary)",
    "cohere": "Command-R (interleaved rotary pairs)",
    "cohere2": "Command-R7B / Command A (interleaved rotary pairs; local layers unchanged)",
    "glm": "GLM (interleaved, partial rotary)",
    "glm4": "GLM-4 (interleaved, partial rotary)",
}


class UnsupportedModelError(ValueError):
    """The model has no rotary position embedding (or cannot use transformers' attention hooks)."""


# ------------------------------------------------------------------------------------------------
# what enable() leaves on the model (plain, picklable data)
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelSetup:
    """``model._selfextend``: what ``disable`` needs to put the model back."""

    settings: Settings
    original_impl: str  # attn_implementation before enable
    owner: str  # unique per enable() call: state kept for an earlier call is not trusted
    records_keys_layer: int  # the deepest SelfExtend layer: decoding state is checked against its keys
    warned: set = field(default_factory=set)


@dataclass
class LayerSetup:
    """``module._selfextend`` on each attention module of an enabled model."""

    model: ModelSetup
    rotary: Rotary  # how this layer rotates (frequencies in float64 on its device, pair layout)


# ------------------------------------------------------------------------------------------------
# the attention function
# ------------------------------------------------------------------------------------------------


@torch.compiler.disable
def selfextend_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function. query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]``
    (rotated at ordinary positions, cache included). Returns ``([B, Lq, Hq, D], None)``.

    ``torch.compile`` of an enabled model compiles around this function (a graph break): it decides
    per call, in Python, which keys are grouped, so it runs as it is, between compiled regions."""
    setup: LayerSetup | None = getattr(module, "_selfextend", None)
    if setup is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation={ATTENTION_NAME!r} but was not set up "
            "by selfextend.enable(model); call selfextend.enable on the model that owns it"
        )
    settings = setup.model.settings
    call = attention_mask
    if call is not None and not isinstance(call, DeferredMask):
        raise NotImplementedError(
            "SelfExtend received a ready-made 4D attention mask; pass a 2D padding mask (or none) instead")
    batch, _, lq, _ = query.shape
    window = call.local_size if call is not None else None  # a sliding-window layer's window
    if window is not None and window > settings.pretrained_length:
        _warn_once(setup.model, "sliding", f"sliding window {window} exceeds the pretrained length "
                   f"{settings.pretrained_length}; this layer keeps its original attention (an [L, L] mask)")
    q_offset = call.q_offset if call is not None else key.shape[2] - lq
    position_ids = kwargs.get("position_ids")
    layouts = (call.layouts(position_ids, batch, lq) if call is not None
               else row_layouts(None, position_ids, q_offset, batch, lq))
    state = _sequence_state(setup.model, call, batch)
    starts = [(row.last_position - (lq - 1) <= 0, row.length) for row in layouts]  # (holds position 0, length)
    schedules = state.begin_call(call.serial if call is not None else new_call(), call.cache if call else None,
                                 settings, starts, q_offset, setup.model.records_keys_layer)

    plain = all(s.is_plain(row.last_position) for s, row in zip(schedules, layouts))
    if plain or (window is not None and window > settings.pretrained_length):
        # Nothing is grouped: take the original path, bit-identical to the plain model.
        original_mask = call.build(_mask_impl(setup.model.original_impl)) if call is not None else None
        out = _original_attention(module, setup.model.original_impl)(
            module, query, key, value, original_mask, dropout=dropout, scaling=scaling, **kwargs)
    else:
        if dropout and module.training:
            raise NotImplementedError("SelfExtend is an inference method: call model.eval() (attention dropout is on)")
        if _attentions_requested():
            _warn_once(setup.model, "attentions", "output_attentions=True: SelfExtend never builds the attention "
                       "weights of inputs it groups (longer than its window), so layers that group return none; "
                       "inputs that fit return them as the model's own attention does")
        if window is None:
            limit_error = _limit_error(settings, max(row.last_position for row in layouts) + 1)
            if limit_error:
                _warn_once(setup.model, "limit", limit_error)
        out = _rows(module, setup, query, key, value, layouts, schedules, call.kv_offset if call else 0, scaling,
                    kwargs.get("softcap"), state, window)
    if window is None and module.layer_idx == setup.model.records_keys_layer:
        state.end_call(key, q_offset + lq)
    return out


def _sequence_state(setup: ModelSetup, call: DeferredMask | None, batch: int) -> SequenceState:
    """The state of the call's sequences: kept with its KV cache, or (no cache) with the call itself."""
    cache = call.cache if call is not None else None
    if cache is not None:
        return state_for(cache, setup.owner, batch, setup.records_keys_layer)
    if call is None:
        return SequenceState(setup.owner, batch, keeps_keys=False)
    if call.transient is None:
        call.transient = SequenceState(setup.owner, batch, keeps_keys=False)
    return call.transient


def _rows(module, setup, query, key, value, layouts, schedules, kv_offset, scaling, softcap, state, window):
    """SelfExtend (or, with a sliding ``window``, windowed attention) for every batch row, in the model's
    dtype. ``key`` index ``j`` is absolute key index ``kv_offset + j``. Returns ``([B, Lq, Hq, D], None)``."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch, hq, lq, _ = query.shape
    out = torch.empty(batch, lq, hq, value.shape[-1], dtype=query.dtype, device=query.device)
    keep = lq <= DECODE_ROWS and not needs_grad(query, key, value)  # decoding keeps grouped keys; autograd never
    for b, layout in enumerate(layouts):
        row = Row(query[b], key[b], value[b], layout.last_position - (lq - 1), layout.first_key - kv_offset, scale,
                  softcap, layout.shift)
        target = out[b].transpose(0, 1)  # [Hq, Lq, D] view
        if window is not None:
            sliding_window_row(row, window, out=target)
            continue
        grouped = state.grouped_keys(module.layer_idx, b, key[b], row.first_key, row.first_key_position, row.shift,
                                     schedules[b].settings, setup.rotary, keep)
        selfextend_row(row, schedules[b], setup.rotary, grouped, out=target)
    return out, None


def _attentions_requested() -> bool:
    """Whether the running forward call collects attention weights (``output_attentions=True``)."""
    collector = output_capturing._active_collector.get()
    return isinstance(collector, dict) and "attentions" in collector


def _limit_error(settings: Settings, length: int) -> str | None:
    try:
        settings.raise_if_too_long(length)
    except ContextLengthError as err:
        return f"{err}; distances beyond the trained range will occur"
    return None


def _warn_once(setup: ModelSetup, key: str, message: str) -> None:
    if key not in setup.warned:
        setup.warned.add(key)
        warnings.warn(message, stacklevel=4)


def _mask_impl(original_impl: str) -> str:
    return original_impl if original_impl in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"


def _original_attention(module, original_impl: str):
    fn = ALL_ATTENTION_FUNCTIONS.get(original_impl)
    if fn is None:  # "eager": the model file's own eager function (softcapping etc.)
        fn = sys.modules[type(module).__module__].eager_attention_forward
    return fn


AttentionInterface.register(ATTENTION_NAME, selfextend_attention)
AttentionMaskInterface.register(ATTENTION_NAME, selfextend_mask)


# ------------------------------------------------------------------------------------------------
# the public handle: a view of what enable() left on the model
# ------------------------------------------------------------------------------------------------


class SelfExtendHandle:
    """SelfExtend switched on for one model. Also a context manager that switches it off."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def _setup(self) -> ModelSetup:
        setup = getattr(self.model, "_selfextend", None)
        if setup is None:
            raise RuntimeError("SelfExtend is not enabled on this model (it was disabled)")
        return setup

    @property
    def settings(self) -> Settings:
        return self._setup.settings

    @property
    def pretrained_length(self) -> int:
        return self.settings.pretrained_length

    @property
    def window(self) -> int:
        return self.settings.window

    @property
    def group_size(self) -> int | None:
        """The fixed G, or None when G is chosen per input length (and for rerope)."""
        return self.settings.group_size

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def rule(self) -> str | None:
        """The rule that chooses G for each sequence; None when G is fixed (or infinite: rerope)."""
        return self.settings.rule if self.group_size is None and self.mode != "rerope" else None

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
        """Warn (once per enable), stating the limit, if ``length`` tokens exceed the extended limit."""
        message = _limit_error(self.settings, length)
        if message:
            _warn_once(self._setup, "limit", message)

    def describe(self, length: int | None = None) -> str:
        return self.settings.describe(length)

    def __repr__(self):
        setup = getattr(self.model, "_selfextend", None)
        return f"<{setup.settings.describe() if setup else 'SelfExtend (disabled)'}>"

    def disable(self) -> None:
        disable(self.model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()
        return False


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
        f"SelfExtend cannot run on model_type {model_type!r}: {reason}. It needs a transformers model with rotary "
        f"position embeddings (RoPE); tested families (model_type): {families}")


def enable(model: nn.Module, group_size: int | None = None, window: int | None = None,
           pretrained_length: int | None = None, mode: str = "floor", log_scale: bool = False,
           block_size: int | None = None, rule: str | None = None) -> SelfExtendHandle:
    """Switch SelfExtend on for ``model`` and return a handle (also a context manager).

    Args:
        group_size: ``G``; None lets ``rule`` choose it once per sequence, from the length of the
            sequence's first forward call (the prompt; ``generation.prefill`` announces a prompt that
            comes in chunks), for every position up to that G's limit; past it (decoding far beyond the
            prompt) G follows the rule per position. A prompt that fits the trained length gets G = 1:
            it is computed exactly as the plain model computes it.
        rule: how an automatic G is chosen (not with ``group_size``). Default
            :data:`~selfextend.positions.DEFAULT_RULE` ``"cover"``, the paper's: w = L // 4 and the
            smallest G with ``(L - w) * G + w >= n`` (kept by measurement, see the README's Study).
            ``"f=F"``: w = L // 8 and the smallest G with ``(F * L - w) * G + w >= n``, every grouped
            distance below ``F * L``, for models that retrieve only well inside their trained length
            (``selfextend calibrate`` recommends F).
        window: neighbor window ``w`` (default: the rule's, ``L // 4`` for "cover"), ``1 <= w < L``.
        pretrained_length: ``L`` (default ``config.max_position_embeddings``).
        mode: "floor" (SelfExtend), "rerope" (G = infinity) or "leaky" (no floor).
        log_scale: multiply each query by ``max(1, log(p + 1) / log(L))`` (off by default).
        block_size: queries per block of the exact merge (default about 4096, a multiple of ``w - 1``).

    An input longer than ``(L - w) * G + w`` gets a warning that states the limit (use
    ``handle.raise_if_too_long(n)`` to refuse it up front instead). Bad settings raise ValueError
    before anything changes. The settings live on the model: a ``copy.deepcopy``, ``pickle`` or
    ``torch.save`` of an enabled model is enabled too.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise _unsupported(model, "it is not a transformers PreTrainedModel")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    settings = Settings.from_config(text_config, group_size, window, pretrained_length, mode, log_scale, block_size,
                                    rule)
    modules = _attention_modules(model)
    if not modules:
        raise _unsupported(model, "it has no attention layers that transformers' attention interface drives")
    layer_types = getattr(text_config, "layer_types", None)
    freqs, global_layers, rotaries = {}, [], {}
    for m in modules:
        layer_type = layer_types[m.layer_idx] if layer_types and m.layer_idx < len(layer_types) else None
        if layer_type not in rotaries:
            try:
                rotaries[layer_type] = layer_rotary(model, m, text_config, layer_type)
            except RotaryError as err:
                raise _unsupported(model, str(err)) from None
        freqs[m] = rotaries[layer_type]
        if layer_type != "sliding_attention":
            global_layers.append(m.layer_idx)
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        warnings.warn(f"model_type {model_type!r} has RoPE but is not among the tested families "
                      f"({', '.join(SUPPORTED_MODEL_TYPES)}); check its outputs", stacklevel=2)

    if is_enabled(model):  # re-enable with new settings
        disable(model)
    original_impl = config._attn_implementation or "sdpa"
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except Exception as err:  # the model class does not accept custom attention functions
        model.set_attn_implementation(original_impl)
        raise _unsupported(model, f"it cannot use a custom attention implementation ({err})") from err

    setup = ModelSetup(settings, original_impl, owner=uuid.uuid4().hex, records_keys_layer=max(global_layers, default=-1))
    model._selfextend = setup
    if settings.chooses_per_sequence and callable(getattr(type(model), "generate", None)):
        model.generate = _GenerateForWholePrompts(model)
    for m in modules:
        m._selfextend = LayerSetup(setup, freqs[m].to(_device_of(m)))
        m.register_forward_pre_hook(hand_over_cache, with_kwargs=True)
    return SelfExtendHandle(model)


class _GenerateForWholePrompts:
    """``model.generate`` of an enabled model (an attribute of the model object, removed by ``disable``):
    the class's own generate, with each prompt's length announced (``sequence.prompt_length``), so
    the G chosen per sequence is chosen for the whole prompt even when generate feeds it in chunks
    (``prefill_chunk_size``), and stays the prompt's for a generation without a KV cache
    (``use_cache=False``), as with one. Holds the model itself, so copies of the model (deepcopy,
    pickle) get a generate of their own."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args, **kwargs):
        lengths = _prompt_lengths(args, kwargs)
        if lengths is None:
            return type(self.model).generate(self.model, *args, **kwargs)
        with prompt_length(lengths):
            return type(self.model).generate(self.model, *args, **kwargs)


def _prompt_lengths(args, kwargs) -> list[int] | None:
    """Tokens of each prompt given to ``generate``: its 2D attention mask summed per row (left padding
    does not count), else the width of ``input_ids`` / ``inputs_embeds``; None when there is no prompt."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return [max(1, int(n)) for n in mask.sum(dim=1).tolist()]
    prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids", kwargs.get("inputs_embeds")))
    if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 and prompt.shape[1] > 0:
        return [int(prompt.shape[1])]
    return None


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def disable(model: nn.Module) -> None:
    """Switch SelfExtend off: the model computes exactly as it did before ``enable``."""
    setup = getattr(model, "_selfextend", None)
    if setup is None:
        return
    for m in model.modules():
        if "_selfextend" in m.__dict__ and m is not model:
            del m._selfextend
    remove_hand_over(model)
    if isinstance(model.__dict__.get("generate"), _GenerateForWholePrompts):
        del model.generate
    model.set_attn_implementation(setup.original_impl)
    del model._selfextend


def is_enabled(model: nn.Module) -> bool:
    return getattr(model, "_selfextend", None) is not None


def get_handle(model: nn.Module) -> SelfExtendHandle | None:
    return SelfExtendHandle(model) if is_enabled(model) else None
