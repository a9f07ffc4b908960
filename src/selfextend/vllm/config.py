"""SelfExtend's settings for one vLLM engine: written into the model config, read back in every process.

The settings travel inside the model's Hugging Face config through vLLM's ``hf_overrides``, which
the engine hands to every worker process (tensor-parallel ranks included)::

    hf_overrides = {"selfextend": {"pretrained_length": L, "window": w, "group_size": G, "mode": "floor"},
                    "max_position_embeddings": max_model_len}

``max_position_embeddings`` is raised so that vLLM builds its RoPE table for every position the
engine may see; SelfExtend reads the trained length ``L`` from its own entry, never from there.

vLLM caches keys, so a key's grouped position ``j // G`` must not depend on how long the sequence
will grow: one engine uses one fixed ``G`` (not the per-length automatic G of ``selfextend.enable``).
The engine's ``max_model_len`` is the extended limit ``(L - w) * G + w`` at most, so vLLM itself
refuses longer requests.

Nothing here imports vLLM: the checks run before an engine starts, in any environment.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..positions import DEFAULT_MAX_GROUP_SIZE, DEFAULT_RULE, rule_window
from ..positions import choose_settings as rule_settings  # not this module's choose_settings
from ..settings import Settings

SETTINGS_KEY = "selfextend"  # the key in hf_overrides / the model config
TABLE_KEY = "max_position_embeddings"  # raised in hf_overrides so that vLLM's RoPE table reaches max_model_len
PLUGIN_NAME = "selfextend"  # the entry point's name in vllm.general_plugins (what VLLM_PLUGINS must list)
SUPPORTED_ROPE_TYPES = ("default", "llama3")  # pure rotations whose frequencies ignore max_position_embeddings


class UnsupportedConfigError(ValueError):
    """The model or the engine options ask for something SelfExtend in vLLM does not support."""


@dataclass(frozen=True)
class EngineSettings:
    """SelfExtend settings of one engine: trained length ``L``, window ``w``, fixed group size ``G``."""

    pretrained_length: int
    window: int
    group_size: int
    mode: str = "floor"

    def __post_init__(self):
        if self.mode != "floor":
            raise ValueError(f"SelfExtend in vLLM supports mode 'floor' only, got {self.mode!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a whole number >= 1 in vLLM (one G per engine), "
                             f"got {self.group_size!r}")
        if self.group_size > DEFAULT_MAX_GROUP_SIZE:  # the library's automatic G stops there too
            raise ValueError(f"group_size={self.group_size} is more than {DEFAULT_MAX_GROUP_SIZE}, the largest G "
                             "SelfExtend uses (selfextend.positions.DEFAULT_MAX_GROUP_SIZE); choose G <= "
                             f"{DEFAULT_MAX_GROUP_SIZE} (G sets the RoPE table vLLM builds: (L - w) * G + w rows)")
        self.as_settings()  # validates L and w with the library's own rules

    def as_settings(self) -> Settings:
        """The library's :class:`selfextend.Settings` for the same values."""
        return Settings(self.pretrained_length, self.window, self.group_size, self.mode)

    @property
    def limit(self) -> int:
        """The extended limit ``(L - w) * G + w``."""
        return self.as_settings().max_length

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> EngineSettings:
        """Settings from the ``selfextend`` entry of a model config; ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"the model config's {SETTINGS_KEY!r} entry must be a dict, got {type(data).__name__}")
        unknown = set(data) - {"pretrained_length", "window", "group_size", "mode"}
        if unknown:
            raise ValueError(f"unknown SelfExtend settings {sorted(unknown)}; expected pretrained_length, "
                             "window, group_size, mode")
        missing = {"pretrained_length", "window", "group_size"} - set(data)
        if missing:
            raise ValueError(f"SelfExtend settings lack {sorted(missing)}")
        return cls(**data)

    def describe(self) -> str:
        return (f"SelfExtend floor L={self.pretrained_length} w={self.window} G={self.group_size} "
                f"(limit {self.limit})")


def settings_from_config(hf_config) -> EngineSettings | None:
    """The engine settings stored in a (text) model config, or None when SelfExtend is off."""
    data = getattr(hf_config, SETTINGS_KEY, None)
    if data is None and hasattr(hf_config, "get_text_config"):
        data = getattr(hf_config.get_text_config(), SETTINGS_KEY, None)
    if data is None:
        return None
    try:
        return EngineSettings.from_dict(data)
    except ValueError as e:
        raise UnsupportedConfigError(f"the model config's SelfExtend settings ({SETTINGS_KEY!r} in hf_overrides) "
                                     f"are invalid: {e}") from None


def check_model_config(hf_config) -> None:
    """Refuse models whose attention SelfExtend-in-vLLM cannot reproduce exactly (one line each)."""
    config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if getattr(config, "sliding_window", None) is not None or "sliding_attention" in (
            getattr(config, "layer_types", None) or ()):
        raise UnsupportedConfigError(
            "sliding-window attention is not supported: vLLM keeps only the window in its cache, "
            "while SelfExtend's grouped part needs every earlier key")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and any(isinstance(v, dict) for v in rope.values()):
        raise UnsupportedConfigError("per-layer-type rotary embeddings (e.g. Gemma 3) are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}): "
            "its frequencies or scale depend on max_position_embeddings, which the engine raises")
    if getattr(config, "kv_lora_rank", None) or getattr(config, "use_mla", False):
        raise UnsupportedConfigError("multi-head latent attention (MLA) models are not supported")


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


def choose_settings(pretrained_length: int, group_size: int | None, window: int | None,
                    max_model_len: int | None, rule: str | None = None) -> tuple[EngineSettings, int]:
    """(settings, max_model_len) for the requested values.

    ``group_size`` defaults to the G that ``rule`` (default ``positions.DEFAULT_RULE``, as in
    ``selfextend.enable``) picks for ``max_model_len`` tokens, and ``window`` to the rule's window;
    ``max_model_len`` defaults to the limit ``(L - w) * G + w`` and may not exceed it."""
    L = pretrained_length
    if rule is not None and group_size is not None:
        raise ValueError(f"give group_size={group_size!r} or rule={rule!r}, not both: the rule chooses G")
    rule = rule or DEFAULT_RULE
    w = rule_window(rule, L) if window is None else window
    if group_size is None:
        if max_model_len is None:
            raise ValueError("give group_size, max_model_len, or both (one G serves the whole engine)")
        if not isinstance(max_model_len, int) or max_model_len < 1:
            raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")
        Settings(L, w, rule=rule)  # the library's own message for a bad L, w or rule
        group_size = rule_settings(max_model_len, L, rule, w)[0]
    settings = EngineSettings(L, w, group_size)
    if max_model_len is None:
        max_model_len = settings.limit
    elif not isinstance(max_model_len, int) or max_model_len < 1:
        raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")
    elif max_model_len > settings.limit:
        raise ValueError(f"max_model_len={max_model_len} is beyond SelfExtend's extended limit "
                         f"{settings.limit} ((L - w) * G + w with L={L}, w={w}, G={settings.group_size}); "
                         "use a larger group_size, a smaller window, or a smaller max_model_len")
    return settings, max_model_len


def hf_overrides_for(settings: EngineSettings, max_model_len: int, user_overrides: dict | None = None) -> dict:
    """``hf_overrides`` carrying the settings, with the RoPE table sized for ``max_model_len``, merged
    with the user's own overrides; a user override of either key SelfExtend sets is refused by name."""
    overrides = check_user_overrides(user_overrides)
    overrides[SETTINGS_KEY] = settings.to_dict()
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
