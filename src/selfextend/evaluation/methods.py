"""The methods compared in every experiment, each applied to a loaded model for one input length.

    plain       the model as trained
    linear      position interpolation      } transformers' own RoPE scaling: the rotary embedding
    dynamic     dynamic NTK                 } modules are rebuilt from a copy of the config with
    yarn        YaRN                        } ``rope_parameters`` set; factor = length / L (>= 1)
    selfextend  SelfExtend as ``selfextend.enable`` runs it: G chosen by a rule from the input's length
                (``selfextend@f=0.5``, ``selfextend@cover``; a bare ``selfextend`` is the library's default
                rule and is recorded under its name) or fixed (``selfextend:4:1024``)
    rerope      SelfExtend with G = infinity (every far key at distance w)
    leaky       SelfExtend without the floor (positions divided by G, not floored)
    string      STRING (An et al. 2024, arXiv 2410.18745): distances >= S = 0.33 L scored at d - S + W, W = 128
    dca         dual chunk attention (ChunkLlama, An et al. 2024, arXiv 2402.17463): chunk_size = 3L/4, w = L/8
                (both in ``selfextend.peers``, with their papers' default parameters)
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import selfextend

from .. import peers
from ..assets import trained_length
from ..positions import DEFAULT_RULE, rule_name
from ..schedule import Schedule
from ..settings import Settings

ROPE_SCALING = {"linear": "linear", "dynamic": "dynamic", "yarn": "yarn"}
SELFEXTEND_MODES = {"selfextend": "floor", "rerope": "rerope", "leaky": "leaky"}
PEERS = ("string", "dca")
ALL_METHODS = ("plain", *ROPE_SCALING, *SELFEXTEND_MODES, *PEERS)
DEFAULT_METHODS = ("plain", *ROPE_SCALING, *SELFEXTEND_MODES)  # what --methods means when not given


@dataclass(frozen=True)
class Method:
    name: str                      # one of ALL_METHODS
    group_size: int | None = None  # SelfExtend modes only: fixed G (None = chosen from the length)
    window: int | None = None      # SelfExtend modes only: w (None = the rule's, L // 4 for rerope/leaky)
    rule: str | None = None        # selfextend only: the rule that picks G from the input length

    @property
    def spec(self) -> str:
        """``name``, ``name@rule``, and ``:G:w`` after it if set (``-`` for a default): how trials and
        tables name the method, e.g. ``selfextend:4:1024``, ``selfextend@f=0.5``, ``selfextend@cover:-:1024``."""
        head = self.name if self.rule is None else f"{self.name}@{self.rule}"
        if self.group_size is None and self.window is None:
            return head
        return ":".join([head] + ["-" if x is None else str(x) for x in (self.group_size, self.window)])


def selfextend_method(group_size: int | None = None, window: int | None = None, mode: str = "floor",
                      rule: str | None = None) -> Method:
    """The method that -G/--rule/-w/--mode describe: what a bare ``selfextend`` in ``--methods`` stands
    for, with the rule written out (default :data:`DEFAULT_RULE`) so a record names what it ran."""
    name = {mode_: name for name, mode_ in SELFEXTEND_MODES.items()}[mode]
    if rule is not None and (mode != "floor" or group_size is not None):
        raise ValueError("--rule chooses G for --mode floor; it cannot go with -G or another mode")
    if mode == "floor" and group_size is None:
        return Method(name, None, window, rule_name(rule or DEFAULT_RULE))
    return Method(name, group_size, window)


def parse_method(spec: str, names: tuple[str, ...] = ALL_METHODS) -> Method:
    """``plain``, ``yarn``, ``selfextend``, ``selfextend:4:1024`` (G=4, w=1024), ``leaky:-:512``,
    ``selfextend@f=0.5`` (a rule of ``positions.choose_settings``; ``:-:w`` fixes its window) ...
    (``names``: the method names the caller runs). Syntax only: :func:`check_method` checks the values."""
    head, *params = spec.strip().split(":")
    name, at, rule = head.partition("@")
    if name not in names:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(names)}")
    if params and (name not in SELFEXTEND_MODES or len(params) != 2):
        raise ValueError(f"method {spec!r}: only {', '.join(SELFEXTEND_MODES)} take ':G:w'")
    try:
        g, w = (None if x == "-" else int(x) for x in params) if params else (None, None)
    except ValueError:
        raise ValueError(f"method {spec!r}: G and w must be integers or '-'") from None
    if not at:
        return selfextend_method(g, w) if name == "selfextend" else Method(name, g, w)
    if name != "selfextend":
        raise ValueError(f"method {spec!r}: only selfextend takes a rule (selfextend@RULE)")
    if g is not None:
        raise ValueError(f"method {spec!r}: a rule chooses G; write selfextend@RULE:-:w to fix only the window")
    try:
        return Method(name, None, w, rule_name(rule))
    except ValueError as e:
        raise ValueError(f"method {spec!r}: {e}") from None


def parse_methods(specs: str, selfextend: Method | None = None, names: tuple[str, ...] = ALL_METHODS) -> list[Method]:
    """A comma-separated list of methods, each once; a bare ``selfextend`` becomes ``selfextend`` (the
    method of the command's -G/-w/--mode, see :func:`selfextend_method`) when given."""
    methods = []
    for spec in specs.split(","):
        if spec.strip():
            method = parse_method(spec, names)
            if selfextend is not None and spec.strip() == "selfextend":
                method = selfextend
            if method not in methods:
                methods.append(method)
    if not methods:
        raise ValueError(f"no methods given; choose from {', '.join(names)}")
    return methods


def resolve_methods(specs: str, selfextend: Method, names: tuple[str, ...] = ALL_METHODS) -> list[Method]:
    """``--methods`` of a command, a bare ``selfextend`` standing for ``selfextend`` (the method of the
    command's -G/-w/--mode); ValueError if those options are set but no bare ``selfextend`` uses them."""
    methods = parse_methods(specs, selfextend, names)
    if selfextend != selfextend_method() and "selfextend" not in [s.strip() for s in specs.split(",")]:
        raise ValueError(f"-G/-w/--mode set what the method 'selfextend' means, and --methods has no bare "
                         f"'selfextend'; add it, or write the settings into a method, e.g. {selfextend.spec}")
    return methods


def check_method(method: Method, config) -> None:
    """Raise ValueError (naming the method) if ``method`` cannot run on a model with ``config``."""
    try:
        if method.name in SELFEXTEND_MODES:
            selfextend_settings(method, config)
        elif method.name in ROPE_SCALING:
            scaled_rope_parameters(config.get_text_config(), method.name, 1.0, trained_length(config))
        elif method.name in PEERS:
            peers.peer_settings(method.name, trained_length(config))
    except ValueError as e:
        raise ValueError(f"method {method.spec!r}: {e}") from None


def selfextend_settings(method: Method, config=None, pretrained_length: int | None = None) -> Settings:
    """The Settings of a SelfExtend method (selfextend, rerope, leaky) on a model with ``config``, or
    trained on ``pretrained_length`` tokens."""
    return Settings.from_config(config, pretrained_length=pretrained_length, **_enable_arguments(method))


def _enable_arguments(method: Method) -> dict:
    return dict(group_size=method.group_size, window=method.window, mode=SELFEXTEND_MODES[method.name],
                rule=method.rule)


def computation(method: Method, pretrained_length: int, length: int, generated: int = 0) -> tuple | None:
    """What ``method`` computes on an input of ``length`` tokens followed by at most ``generated`` decoded
    ones, as a tuple that equal computations share: ``("plain",)`` for the plain model and for a rule
    whose sequence stays within L (G = 1: exactly the plain model), ``(mode, G, w)`` for a fixed G and for
    a rule on a longer input (its G is chosen once from the input and serves the whole sequence while it
    stays within that G's limit: exactly the fixed G); None for everything else (the rope scalings)."""
    if method.name == "plain":
        return ("plain",)
    if method.name not in SELFEXTEND_MODES:
        return None
    settings = selfextend_settings(method, pretrained_length=pretrained_length)
    last = length + generated - 1
    if settings.group_size is None and settings.mode != "rerope":
        schedule = Schedule.for_sequence(settings, length)  # leaky: G per position
        if last < pretrained_length and schedule.group_for(last + 1) == 1:
            return ("plain",)
        g = schedule.chosen
        if g is None or schedule.group_for(last + 1) != g:  # G per position, or the sequence outgrows its G
            return None
        return settings.mode, g, settings.window
    return settings.mode, math.inf if settings.mode == "rerope" else settings.group_size, settings.window


def recorded_settings(method: Method, pretrained_length: int, length: int) -> dict:
    """What a trial of ``method`` records as its settings, without running it (for a copied result)."""
    if method.name not in SELFEXTEND_MODES:
        return {}
    return settings_record(selfextend_settings(method, pretrained_length=pretrained_length), length)


def settings_record(settings: Settings, length: int) -> dict:
    """G and w used for an input of ``length`` tokens, as results record them (rerope's infinite G is
    written "inf", so the JSON stays strict)."""
    g = settings.group_size_for(length)
    rule = {"rule": settings.rule} if settings.group_size is None and settings.mode != "rerope" else {}
    return {"G": g if math.isfinite(g) else "inf", "w": settings.window, **rule}


def peer_record(settings, length: int) -> dict:
    """What a STRING or DCA trial records as its settings for an input of ``length`` tokens."""
    if isinstance(settings, peers.StringSettings):
        return {"S": settings.shift, "W": settings.local, "largest_position": settings.largest_position(length)}
    return {"chunk": settings.chunk, "w": settings.local, "logit_scale": round(settings.logit_scale(length), 4)}


FULL_ATTENTION = "full_attention"  # the layer type whose rope a model with per-layer-type sets scales


def scaled_rope_parameters(config, name: str, factor: float, L: int) -> dict:
    """``config``'s rope parameters with the scaling baseline ``name`` (linear, dynamic, yarn) at ``factor``.

    A model with one set (Llama, Qwen, ...) gets it scaled. A model with a set per layer type (Gemma 3:
    sliding-window layers and full-attention layers) gets its full-attention set scaled and keeps the
    others: a sliding layer attends within its window, so no distance there leaves the trained range (as
    Gemma 3's own long-context checkpoints scale only their global layers)."""
    params = dict(getattr(config, "rope_parameters", None) or {})

    def scaled(base: dict) -> dict:
        return {"rope_type": ROPE_SCALING[name], "rope_theta": base["rope_theta"], "factor": factor,
                "original_max_position_embeddings": L,
                **({"partial_rotary_factor": base["partial_rotary_factor"]} if "partial_rotary_factor" in base
                   else {})}

    if "rope_type" in params:
        return scaled(params)
    if not isinstance(params.get(FULL_ATTENTION), dict):
        raise ValueError(f"the model's rope parameters have no single set and no {FULL_ATTENTION!r} set "
                         f"(it has {sorted(params)}); the rope scaling baselines need one of them")
    return {**params, FULL_ATTENTION: scaled(params[FULL_ATTENTION])}


def _rotary_modules(model):
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child).__name__.endswith("RotaryEmbedding")]


@contextmanager
def applied(model, method: Method, length: int):
    """Within the block, ``model`` computes with ``method`` for inputs of ``length`` tokens."""
    if method.name == "plain":
        yield {}
        return
    if method.name in SELFEXTEND_MODES:
        with selfextend.enable(model, **_enable_arguments(method)) as handle:
            yield settings_record(handle.settings, length)
        return
    if method.name in PEERS:
        settings = peers.enable_peer(model, method.name)
        try:
            yield peer_record(settings, length)
        finally:
            peers.disable_peer(model)
        return
    config = model.config.get_text_config()
    L = trained_length(model)
    factor = max(1.0, length / L)
    scaled = copy.deepcopy(config)
    scaled.rope_parameters = scaled_rope_parameters(config, method.name, factor, L)
    originals = _rotary_modules(model)
    try:
        for parent, name, child in originals:
            new = type(child)(config=scaled)
            setattr(parent, name, new.to(next(child.buffers()).device))
        yield {"factor": round(factor, 4)}
    finally:
        for parent, name, child in originals:
            setattr(parent, name, child)


@torch.inference_mode()
def log_likelihoods(model, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood of ``ids[1:]`` given the prefix: shape [n - 1], float64.

    The hidden states come from one forward pass; the vocabulary projection runs ``chunk`` rows
    at a time so no [n, vocab] logits tensor is ever held."""
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    hidden = decoder(input_ids=ids.reshape(1, -1), use_cache=False).last_hidden_state[0]  # [n, d]
    targets = ids.reshape(-1)[1:]
    out = []
    for s in range(0, hidden.shape[0] - 1, chunk):
        logits = head(hidden[s:s + chunk][: targets.shape[0] - s]).float()  # [c, vocab]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        out.append(torch.nn.functional.cross_entropy(logits, targets[s:s + chunk], reduction="none").double())
    return torch.cat(out)
