"""SelfExtend's settings in vLLM, and the group size of each request (read in every vLLM process).

The settings travel inside the model's Hugging Face config through vLLM's ``hf_overrides``, which the
engine hands to every process (the engine core, each worker, tensor-parallel ranks included)::

    hf_overrides = {"selfextend": {"pretrained_length": L, "window": w, "group_size": G or None,
                                   "rule": "cover"},
                    "max_position_embeddings": max_model_len}

``max_position_embeddings`` is raised so that vLLM builds its RoPE table for every position the
engine may see; SelfExtend reads the trained length ``L`` from its own entry, never from there. The
entry holds the library's own :class:`~selfextend.settings.Settings` (SelfExtend's floor mode), so
every check and message is the library's.

**G per request.** vLLM caches keys at the positions attention reads them at, so a request's ``G`` is
fixed for its whole life (preemption and recompute included) and chosen before its first token is
computed, from what it may grow to -- its prompt plus ``max_tokens``:

    prompt + max_tokens <= L      G = 1: vLLM's stock attention, keys at their own positions
    longer                        the G the engine fixes (``group_size``), else the G the rule picks
                                  for that length (as ``selfextend.enable(model)`` picks it for a
                                  sequence of that length)
    ``extra_args``                ``SamplingParams(extra_args={"selfextend_group_size": G})`` (``vllm_xargs``
                                  through the OpenAI server) fixes G for one request

Requests with different G store different keys for the same tokens, so their cached blocks are never
shared: the front end salts the prefix-cache hash of every request with G > 1 (``frontend``).

Nothing here imports vLLM.
"""

from __future__ import annotations

from ..positions import DEFAULT_MAX_GROUP_SIZE, choose_settings
from ..settings import Settings

SETTINGS_KEY = "selfextend"  # the key in hf_overrides / the model config
TABLE_KEY = "max_position_embeddings"  # raised in hf_overrides so that vLLM's RoPE table reaches max_model_len
GROUP_SIZE_ARG = "selfextend_group_size"  # SamplingParams.extra_args key that fixes one request's G
_FIELDS = ("pretrained_length", "window", "group_size", "rule")


class UnsupportedConfigError(ValueError):
    """The model or the engine options ask for something SelfExtend in vLLM does not support."""


def to_dict(settings: Settings) -> dict:
    """The ``selfextend`` entry of the model config for ``settings``."""
    return {name: getattr(settings, name) for name in _FIELDS}


def from_dict(data) -> Settings:
    """Settings from the ``selfextend`` entry of a model config; ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"the model config's {SETTINGS_KEY!r} entry must be a dict, got {type(data).__name__}")
    unknown = set(data) - {*_FIELDS, "mode"}
    if unknown:
        raise ValueError(f"unknown SelfExtend settings {sorted(unknown)}; expected {', '.join(_FIELDS)}")
    missing = {"pretrained_length", "window"} - set(data)
    if missing:
        raise ValueError(f"SelfExtend settings lack {sorted(missing)}")
    if data.get("mode", "floor") != "floor":
        raise ValueError(f"SelfExtend in vLLM supports mode 'floor' only, got {data['mode']!r}")
    settings = Settings(data["pretrained_length"], data["window"], data.get("group_size"),
                        rule=data.get("rule") or "cover")
    check_group_size(settings.group_size)
    return settings


def check_group_size(group_size, what: str = "group_size") -> None:
    """A G for vLLM: None (chosen per request) or a whole number from 1 to the library's largest, 64
    (G sets the RoPE table vLLM builds, ``(L - w) * G + w`` rows)."""
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= DEFAULT_MAX_GROUP_SIZE:
        raise ValueError(f"{what} must be a whole number from 1 to {DEFAULT_MAX_GROUP_SIZE} (the largest G "
                         f"SelfExtend uses, selfextend.positions.DEFAULT_MAX_GROUP_SIZE), got {group_size!r}")


def settings_from_config(hf_config) -> Settings | None:
    """The SelfExtend settings stored in a (text) model config, or None when SelfExtend is off."""
    data = getattr(hf_config, SETTINGS_KEY, None)
    if data is None and hasattr(hf_config, "get_text_config"):
        data = getattr(hf_config.get_text_config(), SETTINGS_KEY, None)
    if data is None:
        return None
    try:
        return from_dict(data)
    except ValueError as e:
        raise UnsupportedConfigError(f"the model config's SelfExtend settings ({SETTINGS_KEY!r} in hf_overrides) "
                                     f"are invalid: {e}") from None


def request_group(settings: Settings, prompt_tokens: int, max_tokens: int, extra_args: dict | None) -> int:
    """The G of a request with ``prompt_tokens`` and up to ``max_tokens`` new ones (see the module
    docstring). ValueError, naming the limit, when that G cannot hold the request's length."""
    override = (extra_args or {}).get(GROUP_SIZE_ARG)
    total = prompt_tokens + max_tokens
    if override is not None:
        check_group_size(override, f"extra_args[{GROUP_SIZE_ARG!r}]")
        group = override
    elif total <= settings.pretrained_length:
        group = 1
    elif settings.group_size is not None:
        group = settings.group_size
    else:
        group = choose_settings(total, settings.pretrained_length, settings.rule, settings.window)[0]
    limit = group_limit(settings, group)
    if total > limit:
        raise ValueError(f"the request may reach {total} tokens (prompt {prompt_tokens} + max_tokens {max_tokens}) "
                         f"but SelfExtend with G={group} holds {limit} ((L - w) * G + w with "
                         f"L={settings.pretrained_length}, w={settings.window}); lower max_tokens or use a larger G")
    return group


def group_limit(settings: Settings, group: int) -> int:
    """The longest request G holds: ``L`` for G = 1 (plain), ``(L - w) * G + w`` otherwise."""
    if group == 1:
        return settings.pretrained_length
    return (settings.pretrained_length - settings.window) * group + settings.window


def engine_limit(settings: Settings) -> int:
    """The longest request the engine can serve: the fixed G's limit, or the largest G's (64)."""
    return group_limit(settings, settings.group_size or DEFAULT_MAX_GROUP_SIZE)
