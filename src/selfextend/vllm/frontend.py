"""The front end (the ``LLM`` or API-server process): what is checked and written before an engine
starts, and what each request is told before it reaches the engine core.

Before an engine starts (``engine_args``, ``selfextend vllm-serve``, and the plugin where vLLM builds
its config): the model as vLLM will build it (:func:`check_model_config`), the engine options
(:func:`check_engine_options`), the settings and ``max_model_len`` (:func:`engine_settings`), the
``hf_overrides`` that carry them (:func:`hf_overrides_for`). Each refusal is one line naming the option.

Per request (the plugin's ``validate_request`` guard, :func:`admit_request`): its G
(``settings.request_group``) is checked against its length, and a request with G > 1 gets a cache salt
naming its G, so vLLM's prefix cache never gives it blocks written at other positions.

Nothing here imports vLLM.
"""

from __future__ import annotations

from ..positions import DEFAULT_RULE, rule_window
from ..settings import ContextLengthError, Settings
from .settings import (SETTINGS_KEY, TABLE_KEY, UnsupportedConfigError, check_group_size, engine_limit,
                       request_group, to_dict)

PLUGIN_NAME = "selfextend"  # the entry point's name in vllm.general_plugins (what VLLM_PLUGINS must list)
SUPPORTED_ROPE_TYPES = ("default", "llama3")  # pure rotations whose frequencies ignore max_position_embeddings
DEFAULT_LENGTH_FACTOR = 4  # an engine whose G is chosen per request serves 4 L tokens unless told otherwise


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------


def engine_settings(pretrained_length: int, group_size: int | None, window: int | None,
                    max_model_len: int | None, rule: str | None = None) -> tuple[Settings, int]:
    """(settings, max_model_len) for the requested values. ``group_size`` fixes the G of every request
    longer than L; None lets ``rule`` (default "cover", the paper's) choose it per request.
    ``max_model_len`` defaults to the fixed G's limit ``(L - w) * G + w``, or 4 L when G is chosen per
    request, and may not exceed the limit."""
    if rule is not None and group_size is not None:
        raise ValueError(f"give group_size={group_size!r} or rule={rule!r}, not both: the rule chooses G")
    check_group_size(group_size)
    rule = rule or DEFAULT_RULE
    window = rule_window(rule, pretrained_length) if window is None and isinstance(pretrained_length, int) else window
    settings = Settings(pretrained_length, window, group_size, rule=rule)
    limit = engine_limit(settings)
    if max_model_len is None:
        max_model_len = limit if group_size is not None else min(limit, DEFAULT_LENGTH_FACTOR * pretrained_length)
    elif isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
        raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")
    try:
        settings.raise_if_too_long(max_model_len)
    except ContextLengthError as err:
        raise ValueError(f"max_model_len={max_model_len}: {err}") from None
    return settings, max_model_len


def describe(settings: Settings, max_model_len: int) -> str:
    """One line for logs and errors: the settings, how G is chosen, the longest request."""
    g = f"G={settings.group_size}" if settings.group_size is not None else f"G by rule {settings.rule!r}"
    return (f"SelfExtend L={settings.pretrained_length} w={settings.window} {g} per request longer than L "
            f"(G=1 for the others), max_model_len={max_model_len}")


def hf_overrides_for(settings: Settings, max_model_len: int, user_overrides: dict | None = None) -> dict:
    """``hf_overrides`` carrying the settings, with the RoPE table sized for ``max_model_len``, merged
    with the user's own overrides; a user override of either key SelfExtend sets is refused by name."""
    overrides = check_user_overrides(user_overrides)
    overrides[SETTINGS_KEY] = to_dict(settings)
    overrides[TABLE_KEY] = max(max_model_len, settings.pretrained_length)
    return overrides


def check_user_overrides(user_overrides) -> dict:
    """A copy of the user's ``hf_overrides`` (``{}`` for None); refuses a non-dict and, by name, the
    two keys SelfExtend sets itself (a silent overwrite would drop one side's value)."""
    if user_overrides is not None and not isinstance(user_overrides, dict):
        raise ValueError("hf_overrides must be a dict when SelfExtend adds its settings to it")
    overrides = dict(user_overrides or {})
    if SETTINGS_KEY in overrides:
        raise ValueError(f"hf_overrides already has a {SETTINGS_KEY!r} entry: SelfExtend writes it from "
                         "group_size, window, max_model_len and rule (-G, -w, --max-model-len, --rule); remove it")
    if TABLE_KEY in overrides:
        raise ValueError(f"hf_overrides sets {TABLE_KEY!r}: SelfExtend sets it to max_model_len so that vLLM's "
                         "RoPE table covers every position (the trained length is pretrained_length); remove it")
    return overrides


def apply_overrides(config, overrides: dict | None):
    """``config`` (a transformers config, changed in place and returned) with ``hf_overrides``
    applied as vLLM 0.32 applies them (``ModelConfig``): a dict value updates a nested config of
    that name key by key, any other value replaces the attribute."""
    for key, value in (overrides or {}).items():
        nested = getattr(config, key, None)
        if isinstance(value, dict) and nested is not None and hasattr(nested, "to_dict"):
            _update_nested(nested, value)
        else:
            setattr(config, key, value)
    return config


def _update_nested(target, updates: dict) -> None:
    for key, value in updates.items():
        nested = target.get(key) if isinstance(target, dict) else getattr(target, key, None)
        if isinstance(value, dict) and nested is not None and (isinstance(nested, dict) or hasattr(nested, "__dict__")):
            _update_nested(nested, value)
        elif isinstance(target, dict):
            target[key] = value
        else:
            setattr(target, key, value)


def check_plugin_allowed(vllm_plugins: list[str] | None) -> None:
    """Refuse when ``VLLM_PLUGINS`` (vLLM's allow-list of plugins, None when unset) leaves SelfExtend's
    out: vLLM would then never load the plugin and serve the settings with plain attention."""
    if vllm_plugins is not None and PLUGIN_NAME not in vllm_plugins:
        raise UnsupportedConfigError(
            f"VLLM_PLUGINS={','.join(vllm_plugins)!r} leaves out the {PLUGIN_NAME!r} plugin, so vLLM would serve "
            f"plain attention: add {PLUGIN_NAME} to VLLM_PLUGINS or unset it")


# ------------------------------------------------------------------------------------------------
# the model and the engine options
# ------------------------------------------------------------------------------------------------


def check_model_config(hf_config, window: int | None = None) -> None:
    """Refuse models whose attention SelfExtend-in-vLLM cannot reproduce exactly (one line each).

    Sliding-window layers are served by vLLM's stock attention when their window is at most
    SelfExtend's ``window`` (they never see a key that far, so SelfExtend would not change them: Gemma
    2/3's local layers, windowed Mistral); a larger window is refused (vLLM keeps only the window in
    that layer's cache, SelfExtend would need grouped keys there)."""
    config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    sliding = getattr(config, "sliding_window", None)
    if sliding is None and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise UnsupportedConfigError("sliding-window attention: layer_types names sliding layers but the config "
                                     "sets no sliding_window")
    if sliding is not None and (window is None or sliding > window):
        raise UnsupportedConfigError(
            f"sliding-window attention with a window of {sliding} tokens is not supported"
            + ("" if window is None else f" beyond SelfExtend's window w={window} (those layers would need grouped "
                                          f"keys vLLM does not keep); use -w {sliding} or more"))
    for layer_type, rope in _rope_parameter_sets(config):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            where = f" ({layer_type} layers)" if layer_type else ""
            raise UnsupportedConfigError(
                f"rope type {rope_type!r}{where} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}): "
                "its frequencies or scale depend on max_position_embeddings, which the engine raises")
    if getattr(config, "kv_lora_rank", None) or getattr(config, "use_mla", False):
        raise UnsupportedConfigError("multi-head latent attention (MLA) models are not supported")


def _rope_parameter_sets(config) -> list[tuple[str | None, dict]]:
    """(layer type or None, rope parameters) of a config: one set, or one per layer type (Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return []
    if any(isinstance(v, dict) for v in rope.values()):
        return [(name, params) for name, params in rope.items() if isinstance(params, dict)]
    return [(None, rope)]


# Engine options that change what the KV cache holds or how attention runs, and why they are refused.
_REFUSED_OPTIONS = {
    "speculative_config": "speculative decoding is not supported (draft and verify passes are not wired)",
    "kv_transfer_config": "KV transfer / disaggregated serving is not supported "
                          "(the cache holds keys at grouped positions)",
}


def check_engine_options(options: dict) -> None:
    """Refuse engine options the SelfExtend backend does not support, naming the option."""
    dtype = str(options.get("kv_cache_dtype") or "auto")
    if dtype != "auto":
        raise UnsupportedConfigError(f"kv_cache_dtype={dtype!r} is not supported: keys are rotated in the cache "
                                     "and must keep the model's dtype (use kv_cache_dtype='auto')")
    for name, reason in _REFUSED_OPTIONS.items():
        if options.get(name):
            raise UnsupportedConfigError(f"{name}: {reason}")
    if int(options.get("decode_context_parallel_size") or 1) > 1:
        raise UnsupportedConfigError("decode context parallelism is not supported "
                                     "(each rank would hold a strided share of every sequence)")
    if int(options.get("pipeline_parallel_size") or 1) > 1:
        raise UnsupportedConfigError("pipeline parallelism has not been tested with SelfExtend; "
                                     "use tensor_parallel_size instead")


# ------------------------------------------------------------------------------------------------
# each request
# ------------------------------------------------------------------------------------------------


def admit_request(settings: Settings, prompt_tokens: int | None, max_tokens: int | None, max_model_len: int,
                  extra_args: dict | None, cache_salt: str | None) -> str | None:
    """The cache salt of a request (None: leave it as it is), after checking its G; ValueError (which
    the server turns into a 400) for a G that cannot hold it. ``max_tokens`` None means up to
    ``max_model_len``, as vLLM fills it in."""
    if prompt_tokens is None:
        raise ValueError("SelfExtend needs the prompt as token ids (prompt embeddings are not supported)")
    if max_tokens is None:
        max_tokens = max(0, max_model_len - prompt_tokens)
    group = request_group(settings, prompt_tokens, max_tokens, extra_args)
    if group == 1:
        return None
    tag = f"selfextend:G={group}:w={settings.window}"  # keys at grouped positions for this G
    return tag if not cache_salt else f"{cache_salt}|{tag}"
