"""The vLLM plugin: entry point ``selfextend = selfextend.vllm.plugin:register`` in the group
``vllm.general_plugins``, which vLLM runs in every one of its processes (the API server or ``LLM``
process, the engine core, each worker).

The switch is the model config. An engine whose config carries ``selfextend`` settings (written by
``engine_args`` or ``selfextend vllm-serve`` into ``hf_overrides``) runs SelfExtend's attention backend
or refuses to start; every other engine runs vLLM's stock attention code. Nothing is half on: the
settings cannot be served with plain attention. Two guards on the platform object, installed in every
process, make it so:

- ``check_and_update_config``, where vLLM hands the complete config to platform code (the API server /
  ``LLM`` process, when the config is built, before the engine core starts or anything loads): the
  settings and every engine option are checked (``engine.check_vllm_config``), then SelfExtend is
  switched on (``SELFEXTEND_VLLM=1``, inherited by the processes started after);
- ``get_attn_backend_cls``, where each worker picks the attention backend of each layer: with
  settings in the config the SelfExtend backend is registered if it is not yet (a worker that did not
  inherit the switch, e.g. a Ray actor), and a choice of any other backend is refused.

``SELFEXTEND_VLLM=1`` registers the backend when the plugin loads (models without settings then run
the stock code through it, bit for bit); ``SELFEXTEND_VLLM=0`` switches SelfExtend off, and a config
with settings then refuses to start. The one way to bypass all of this is to keep vLLM from loading
the plugin (``VLLM_PLUGINS`` without ``selfextend``, or the package not installed): ``engine_args`` and
``selfextend vllm-serve`` refuse the former.
"""

from __future__ import annotations

import logging
import os

SWITCH_ENV = "SELFEXTEND_VLLM"
OFF_VALUES = ("0", "false", "no", "off")
TESTED_VLLM = "0.32."  # the backends subclass vLLM internals: versions other than 0.32.x get a warning
CPU_BACKEND = "selfextend.vllm.cpu_backend.SelfExtendCPUBackend"
CUDA_BACKEND = "selfextend.vllm.cuda_backend.SelfExtendFlashAttentionBackend"

logger = logging.getLogger(__name__)


def _switch_value() -> str:
    return os.environ.get(SWITCH_ENV, "").strip().lower()


def switched_on() -> bool:
    """True when ``SELFEXTEND_VLLM`` is set to something other than '', '0', 'false', 'no', 'off'."""
    return _switch_value() not in ("", *OFF_VALUES)


def switched_off() -> bool:
    """True when ``SELFEXTEND_VLLM`` is set to '0', 'false', 'no' or 'off' (SelfExtend refused)."""
    return _switch_value() in OFF_VALUES


def switch_on() -> None:
    """Set ``SELFEXTEND_VLLM=1`` for this process and the processes it starts, and register now."""
    os.environ[SWITCH_ENV] = "1"
    register()


def register() -> None:
    """The entry point: install the guards (always), and point the platform's attention backend at
    SelfExtend's if switched on.

    On CPU vLLM always takes ``CPU_ATTN``: SelfExtend's backend is registered under that name (it runs
    the stock code for every step that groups nothing). On CUDA it is registered as vLLM's ``CUSTOM``
    backend, which ``engine_args`` (and the command ``vllm-serve`` prints) select."""
    install_guards()
    if not switched_on():
        return
    import vllm
    from vllm.v1.attention.backends.registry import register_backend

    replaced, path = selfextend_backend()
    if replaced is None:
        logger.warning("SelfExtend: no backend for this platform; engines with SelfExtend settings will refuse")
        return
    register_backend(replaced, path)
    _forget_chosen_backends()
    if not vllm.__version__.startswith(TESTED_VLLM):
        logger.warning("SelfExtend was tested with vLLM %sx only; this is vLLM %s", TESTED_VLLM, vllm.__version__)


def selfextend_backend():
    """(the ``AttentionBackendEnum`` member SelfExtend replaces on this platform, the class path of
    SelfExtend's backend), or (None, None) on a platform without one."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if current_platform.is_cpu():
        return AttentionBackendEnum.CPU_ATTN, CPU_BACKEND
    if current_platform.is_cuda():
        return AttentionBackendEnum.CUSTOM, CUDA_BACKEND
    return None, None


def _forget_chosen_backends() -> None:
    """Drop vLLM's memo of chosen attention backends, so a backend registered now takes effect in
    this process even after an earlier engine here chose the stock one."""
    from vllm.v1.attention import selector

    cached = getattr(selector, "_cached_get_attn_backend", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


# -- the guards ------------------------------------------------------------------------------------


def install_guards() -> None:
    """Wrap the platform's ``check_and_update_config`` and ``get_attn_backend_cls`` (once per process)."""
    from vllm.platforms import current_platform as platform

    if vars(platform).get("_selfextend_guards"):  # (getattr on a platform logs a warning when missing)
        return
    check, choose = platform.check_and_update_config, platform.get_attn_backend_cls

    def check_and_update_config(vllm_config) -> None:
        check(vllm_config)
        admit(vllm_config)

    def get_attn_backend_cls(selected_backend, *args, **kwargs) -> str:
        from vllm.config import get_current_vllm_config_or_none

        path = choose(selected_backend, *args, **kwargs)
        if path in (CPU_BACKEND, CUDA_BACKEND) or _settings(get_current_vllm_config_or_none()) is None:
            return path
        _refuse_if_switched_off()
        switch_on()  # a process the switch did not reach (e.g. a Ray actor): the settings switch it on
        path = choose(selected_backend, *args, **kwargs)
        if path not in (CPU_BACKEND, CUDA_BACKEND):
            from .settings import UnsupportedConfigError

            raise UnsupportedConfigError(f"vLLM chose the attention backend {path} for a model with SelfExtend "
                                         f"settings; SelfExtend needs {_backend_hint()}")
        return path

    platform.check_and_update_config = check_and_update_config
    platform.get_attn_backend_cls = get_attn_backend_cls
    _guard_requests()
    platform._selfextend_guards = True


def admit(vllm_config) -> None:
    """For a config with SelfExtend settings: refuse what SelfExtend cannot serve, naming the option,
    then switch SelfExtend on. A config without settings passes untouched."""
    settings = _settings(vllm_config)
    if settings is None:
        return
    from vllm.platforms import current_platform

    from .settings import UnsupportedConfigError
    from .worker import SELFEXTEND_WORKERS, check_vllm_config

    _refuse_if_switched_off()
    replaced, _ = selfextend_backend()
    if replaced is None:
        raise UnsupportedConfigError(f"SelfExtend has no attention backend for platform "
                                     f"{current_platform.device_name!r}; it runs on vLLM's CPU and CUDA platforms")
    chosen = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if current_platform.is_cuda() and chosen is not None and chosen != replaced:  # the CPU platform ignores it
        raise UnsupportedConfigError(f"attention backend {chosen.name} was chosen; SelfExtend needs {_backend_hint()}")
    check_vllm_config(vllm_config, settings)
    parallel = vllm_config.parallel_config
    if parallel.worker_cls in SELFEXTEND_WORKERS:  # vLLM's own worker, whose runner hands over each row's G
        parallel.worker_cls = SELFEXTEND_WORKERS[parallel.worker_cls]
    elif parallel.worker_cls not in SELFEXTEND_WORKERS.values():
        raise UnsupportedConfigError(f"worker_cls={parallel.worker_cls!r}: SelfExtend runs with vLLM's own CPU or GPU "
                                     "worker (it extends it to choose G per request); remove --worker-cls")
    switch_on()


def _guard_requests() -> None:
    """Wrap the front end's ``InputProcessor.process_inputs`` (where vLLM turns a prompt and its
    sampling parameters into the request the engine core receives): for an engine with SelfExtend
    settings, check the request's G against its length (a ValueError, which the server answers with
    400) and salt its prefix-cache hash with its G when G > 1, so cached blocks are never shared between
    requests whose keys sit at different positions."""
    from vllm.v1.engine.input_processor import InputProcessor

    if vars(InputProcessor).get("_selfextend_guard"):
        return
    process_inputs = InputProcessor.process_inputs

    def guarded(self, *args, **kwargs):
        request = process_inputs(self, *args, **kwargs)
        settings = _settings(self.vllm_config)
        params = request.sampling_params
        if settings is not None and params is not None:
            from .frontend import admit_request

            tokens = request.prompt_token_ids
            request.cache_salt = admit_request(settings, None if tokens is None else len(tokens), params.max_tokens,
                                               self.vllm_config.model_config.max_model_len, params.extra_args,
                                               request.cache_salt) or request.cache_salt
        return request

    InputProcessor.process_inputs = guarded
    InputProcessor._selfextend_guard = True


def _settings(vllm_config):
    """SelfExtend settings of a vLLM config (None without a model config or without settings)."""
    from .settings import settings_from_config

    model_config = getattr(vllm_config, "model_config", None)
    return None if model_config is None else settings_from_config(model_config.hf_config)


def _refuse_if_switched_off() -> None:
    if switched_off():
        from .settings import SETTINGS_KEY, UnsupportedConfigError

        raise UnsupportedConfigError(
            f"the model config carries SelfExtend settings ({SETTINGS_KEY!r} in hf_overrides) but "
            f"{SWITCH_ENV}={os.environ[SWITCH_ENV]} switches SelfExtend off: unset {SWITCH_ENV}, or remove the "
            f"{SETTINGS_KEY!r} entry (and the raised max_position_embeddings) to serve plain attention")


def _backend_hint() -> str:
    replaced, _ = selfextend_backend()
    if replaced is None:
        return "vLLM's CPU or CUDA platform"
    return f"vLLM's {replaced.name} attention backend (--attention-backend {replaced.name})"
