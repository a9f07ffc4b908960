"""The vLLM plugin: entry point ``selfextend = selfextend.vllm.plugin:register`` in the group
``vllm.general_plugins``, which vLLM runs in every one of its processes.

Installing the package switches nothing on. The backend is registered only in processes started
with ``SELFEXTEND_VLLM=1`` in the environment (``engine_args`` and ``selfextend vllm-serve`` set it;
worker processes inherit it), and even then it changes only engines whose model config carries
``selfextend`` settings: every other model runs vLLM's stock attention code.
"""

from __future__ import annotations

import logging
import os

SWITCH_ENV = "SELFEXTEND_VLLM"
TESTED_VLLM = "0.32."  # the backends subclass vLLM internals: versions other than 0.32.x get a warning
CPU_BACKEND = "selfextend.vllm.cpu_backend.SelfExtendCPUBackend"
CUDA_BACKEND = "selfextend.vllm.cuda_backend.SelfExtendFlashAttentionBackend"

logger = logging.getLogger(__name__)


def switched_on() -> bool:
    """True when ``SELFEXTEND_VLLM`` is set to something other than '', '0', 'false', 'no'."""
    return os.environ.get(SWITCH_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def switch_on() -> None:
    """Set ``SELFEXTEND_VLLM=1`` for this process and the processes it starts, and register now."""
    os.environ[SWITCH_ENV] = "1"
    register()


def register() -> None:
    """Point the platform's attention backend at SelfExtend's, if switched on (else do nothing).

    On CPU vLLM always takes ``CPU_ATTN``; on CUDA the SelfExtend backend replaces ``FLASH_ATTN``
    (``engine_args`` selects that backend explicitly)."""
    if not switched_on():
        return
    import vllm
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.FLASH_ATTN, CUDA_BACKEND)
    else:
        logger.warning("SelfExtend: no backend for platform %s; attention stays stock", current_platform.device_name)
        return
    if not vllm.__version__.startswith(TESTED_VLLM):
        logger.warning("SelfExtend was tested with vLLM %sx only; this is vLLM %s", TESTED_VLLM, vllm.__version__)
