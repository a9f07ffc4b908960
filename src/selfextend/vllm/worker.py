"""The worker process: the engine's checks, each attention layer's geometry, and the G of each batch row.

The plugin points vLLM's ``worker_cls`` at :class:`SelfExtendCPUWorker` (CUDA: :class:`SelfExtendGPUWorker`)
for an engine with SelfExtend settings. The worker is vLLM's own; only its model runner gains one step
(:class:`RequestGroups`): before vLLM builds the attention metadata of a step, the G of every row of
the batch (``settings.request_group``, from the request's prompt, ``max_tokens`` and ``extra_args``,
computed once per request) is handed to the SelfExtend metadata builders, which plan the step from it.
"""

from __future__ import annotations

import torch

from ..settings import Settings
from .frontend import check_engine_options, check_model_config
from .settings import UnsupportedConfigError, engine_limit, request_group, settings_from_config

CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
GPU_WORKER = "vllm.v1.worker.gpu_worker.Worker"
SELFEXTEND_WORKERS = {CPU_WORKER: "selfextend.vllm.worker.SelfExtendCPUWorker",
                      GPU_WORKER: "selfextend.vllm.worker.SelfExtendGPUWorker"}


def engine_settings(vllm_config) -> Settings | None:
    """The engine's SelfExtend settings, or None when its model config carries none."""
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return None
    return settings_from_config(model_config.hf_config)


def check_vllm_config(vllm_config, settings: Settings) -> None:
    """Refuse engines SelfExtend cannot serve exactly; each error names the option to change. Runs where
    vLLM builds the config (the front end) and again in each worker."""
    check_model_config(vllm_config.model_config.hf_config, settings.window)
    parallel = vllm_config.parallel_config
    check_engine_options({
        "kv_cache_dtype": vllm_config.cache_config.cache_dtype,
        "speculative_config": vllm_config.speculative_config,
        "kv_transfer_config": vllm_config.kv_transfer_config,
        "decode_context_parallel_size": parallel.decode_context_parallel_size,
        "pipeline_parallel_size": parallel.pipeline_parallel_size,
    })
    max_len = vllm_config.model_config.max_model_len
    if max_len > engine_limit(settings):
        raise UnsupportedConfigError(
            f"max_model_len={max_len} is beyond SelfExtend's extended limit {engine_limit(settings)} "
            f"({settings.describe()}); pass --max-model-len {engine_limit(settings)} or less")
    model_config = vllm_config.model_config
    table = getattr(getattr(model_config, "hf_text_config", None) or model_config.hf_config,
                    "max_position_embeddings", None)
    if isinstance(table, int) and table < max_len:  # possible with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1
        raise UnsupportedConfigError(
            f"max_model_len={max_len} is beyond the model's RoPE table (max_position_embeddings={table}); "
            f"set max_position_embeddings to {max_len} in hf_overrides (engine_args and vllm-serve do)")


def check_layer(alibi_slopes, logits_soft_cap, sinks, attn_type, kv_sharing) -> None:
    """Refuse attention-layer features SelfExtend does not reproduce (arguments of an AttentionImpl)."""
    from vllm.v1.attention.backend import AttentionType

    problems = {
        "ALiBi": alibi_slopes is not None,
        "attention logit soft-capping": bool(logits_soft_cap),
        "attention sinks": sinks is not None,
        f"attention type {attn_type!r} (decoder self-attention only)": attn_type != AttentionType.DECODER,
        "cross-layer KV cache sharing": kv_sharing is not None,
    }
    for what, present in problems.items():
        if present:
            raise UnsupportedConfigError(f"SelfExtend in vLLM does not support {what}")


def groups_layer(settings: Settings, sliding_window: int | None) -> bool:
    """Whether a layer with this sliding window groups keys: a window of at most w never reaches a key
    w or more away, so such a layer runs vLLM's stock attention (Gemma 2/3's local layers)."""
    return sliding_window is None or sliding_window > settings.window


def global_inv_freq(vllm_config, head_size: int) -> torch.Tensor:
    """The inverse frequencies ``[rotary_dim / 2]`` (float64) of the rotary embedding vLLM built for
    the model's full-attention layers.

    vLLM keeps every rotary embedding it creates in ``rotary_embedding._ROPE_DICT``; the model's are
    those with its head size (and RoPE table length); with local and global layers (Gemma 3), the one
    whose base is the full-attention layers' ``rope_theta``. Only plain rotations in the rotate-half
    (GPT-NeoX) layout are accepted, since SelfExtend moves keys by rotating them."""
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding

    hf_config = vllm_config.model_config.hf_text_config
    table = getattr(hf_config, "max_position_embeddings", None)
    candidates = [rope for rope in _ROPE_DICT.values() if rope.head_size == head_size]
    if any(rope.max_position_embeddings == table for rope in candidates):
        candidates = [rope for rope in candidates if rope.max_position_embeddings == table]
    theta = _full_attention_theta(hf_config)
    if theta is not None and any(float(rope.base) == theta for rope in candidates):
        candidates = [rope for rope in candidates if float(rope.base) == theta]
    if not candidates:
        raise UnsupportedConfigError("SelfExtend found no rotary embedding in this model (it needs RoPE)")
    for rope in candidates:
        if type(rope) not in (RotaryEmbedding, Llama3RotaryEmbedding):
            raise UnsupportedConfigError(f"rotary embedding {type(rope).__name__} is not supported "
                                         "(supported: plain and llama3 RoPE)")
        if not rope.is_neox_style:
            raise UnsupportedConfigError("GPT-J style (interleaved) rotary embeddings are not supported in vLLM")
    inv_freqs = {tuple(rope._compute_inv_freq(rope.base).tolist()) for rope in candidates}
    if len(inv_freqs) != 1:
        raise UnsupportedConfigError("this model's full-attention layers use several different rotary "
                                     "embeddings; not supported")
    return torch.tensor(inv_freqs.pop(), dtype=torch.float64)


def _full_attention_theta(hf_config) -> float | None:
    """``rope_theta`` of the full-attention layers (None when the config does not say)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return None if theta is None else float(theta)


# ------------------------------------------------------------------------------------------------
# the G of each batch row, handed to the metadata builders every step
# ------------------------------------------------------------------------------------------------


class RequestGroups:
    """A mixin for vLLM's model runner: before the attention metadata of a step is built, every
    SelfExtend metadata builder receives ``request_groups`` -- the G of each row of the batch, in the
    batch's order (rows without a request, as in vLLM's dummy runs, get 1)."""

    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        groups = self._selfextend_groups(num_reqs)
        for per_cache_group in self.attn_groups:
            for attn_group in per_cache_group:
                for builder in attn_group.metadata_builders:
                    if hasattr(builder, "request_groups"):
                        builder.request_groups = groups
        return super()._build_attention_metadata(num_tokens, num_reqs, *args, **kwargs)

    def _selfextend_groups(self, num_reqs: int) -> torch.Tensor:
        """``[num_reqs]`` int32: the G of each row (computed once per request, then remembered)."""
        settings = engine_settings(self.vllm_config)
        known = self.__dict__.setdefault("_selfextend_known", {})
        if len(known) > 4 * max(1, len(self.requests)):  # forget finished requests now and then
            for req_id in [r for r in known if r not in self.requests]:
                del known[req_id]
        groups = []
        for req_id in self.input_batch.req_ids[:num_reqs]:
            if req_id not in known:
                known[req_id] = _group_of(settings, self.requests.get(req_id))
            groups.append(known[req_id])
        groups += [1] * (num_reqs - len(groups))
        return torch.tensor(groups, dtype=torch.int32)


def _group_of(settings: Settings | None, state) -> int:
    """The G of one request the runner holds (1 without settings or without sampling parameters)."""
    if settings is None or state is None or state.sampling_params is None or state.prompt_token_ids is None:
        return 1
    params = state.sampling_params
    return request_group(settings, len(state.prompt_token_ids), params.max_tokens or 0, params.extra_args)


def _with_request_groups(runner) -> None:
    """Give a model runner the :class:`RequestGroups` step (its class becomes a subclass of its own)."""
    cls = type(runner)
    if isinstance(runner, RequestGroups):
        return
    runner.__class__ = type(f"SelfExtend{cls.__name__}", (RequestGroups, cls), {})


def _worker_classes():
    """The worker classes (built on first access: importing vLLM's workers is heavy)."""
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    class SelfExtendCPUWorker(CPUWorker):
        """vLLM's CPU worker whose model runner hands each row's G to the SelfExtend backend."""

        def init_device(self):
            super().init_device()
            if getattr(self, "use_v2_model_runner", False):
                raise UnsupportedConfigError("SelfExtend does not support vLLM's V2 model runner (VLLM_USE_V2_MODEL_RUNNER)")
            _with_request_groups(self.model_runner)

    class SelfExtendGPUWorker(Worker):
        """vLLM's GPU worker whose model runner hands each row's G to the SelfExtend backend (not yet run on
        a GPU)."""

        def init_device(self):
            super().init_device()
            _with_request_groups(self.model_runner)

    return {"SelfExtendCPUWorker": SelfExtendCPUWorker, "SelfExtendGPUWorker": SelfExtendGPUWorker}


def __getattr__(name: str):
    if name in ("SelfExtendCPUWorker", "SelfExtendGPUWorker"):
        classes = _worker_classes()
        globals().update(classes)
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
