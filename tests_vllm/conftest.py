"""Tests of SelfExtend inside vLLM. They run in ``.venv-vllm`` (``bash scripts/test-vllm.sh``), never in
the default suite: vLLM's CPU build pins an older transformers than the library's own tests use.

The reference is this project's transformers path (``selfextend.enable``, proven against a float64
reference in ``tests/``), computed by ``tests_vllm/reference.py`` in ``.venv`` and compared here with
what vLLM produces for the same tiny random Llama, in float32.

Tolerance: log-probabilities within ``ATOL = 1e-4``. Both sides compute the same float32 maths in a
different order (vLLM's fused QKV matmul and RoPE cache, vLLM's paged CPU kernel or torch's flash
kernel vs transformers' SDPA), so they differ by float32 rounding: ~1e-5 on log-probabilities of
size ~6 here. A real mismatch (a key at the wrong position) moves them by 1e-1 and more. Greedy
tokens must be equal wherever the reference's top-2 margin exceeds ``MARGIN``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = ROOT / ".venv" / "bin" / "python"

L, W, G, BLOCK = 128, 32, 4, 32  # tiny model: trained length, window, group size, KV block size
LIMIT = (L - W) * G + W  # 416
ATOL = 1e-4
MARGIN = 1e-3
NEW_TOKENS = 12

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # tests ask workers which backend runs


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and vLLM's CUDA build (scripts/test-vllm.sh --gpu); "
                                      "fails without one (the default run deselects them)")


def pytest_runtest_setup(item):
    if "cuda" in item.keywords and not torch.cuda.is_available():
        pytest.fail("needs a CUDA GPU and vLLM's CUDA build: run bash scripts/test-vllm.sh --gpu there")


# ------------------------------------------------------------------------------------------------
# the tiny model and the prompts
# ------------------------------------------------------------------------------------------------


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (trained length L, head size 32: a size vLLM's CPU kernel takes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=L,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    save_redrawn(LlamaForCausalLM(config), folder)
    return folder


def save_redrawn(model, folder: Path) -> None:
    """Save ``model`` with its matrices redrawn at a scale where positions matter (default init is too flat)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape) * (1.0 if "embed" in name else 2.0 / p.shape[1] ** 0.5))
    model.save_pretrained(folder)


def _tokens(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 512, (n,), generator=generator).tolist()


LONG = _tokens(300, 1)
PROMPTS = {
    "long": LONG,                                   # 2.3x the trained length: G = 4
    "long2": _tokens(260, 2),
    "long3": _tokens(200, 3),
    "mid": _tokens(100, 4),                         # + 12 new tokens fits L: G = 1, vLLM's stock path
    "short": _tokens(20, 5),                        # within the window too
    "shared": LONG[:256] + _tokens(44, 6),          # first 8 blocks of "long": a prefix-cache hit (both G = 4)
    "prefix_fits": LONG[:96] + _tokens(10, 14),     # the first 3 blocks of "long", but G = 1: no hit
    "x64": _tokens(64, 7),                          # two full blocks, cached ...
    "x64b": _tokens(64, 7) + _tokens(100, 8),       # ... then read by these two (G = 4), which decode
    "x64c": _tokens(64, 7) + _tokens(95, 12),       # 5 positions apart, sharing both blocks
}
PROMPTS.update({f"tight{i}": _tokens(250, 9 + i) for i in range(3)})  # 8 blocks each, a 9th while decoding
ONE_BATCH = ["long", "long2", "long3", "mid", "short"]  # G = 4, 4, 4, 1, 1 in one batch
TIGHT = ["tight0", "tight1", "tight2", "mid"]  # G = 4, 4, 4, 1 under cache pressure


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def request_group(prompt_tokens: int, group_size: int | None = G, window: int = W, new_tokens: int = NEW_TOKENS,
                  trained: int = L) -> int:
    """The G a request gets, written out from the design: 1 when prompt + max_tokens fits the trained
    length; else the engine's fixed G, or (None) the smallest G with (L - w) * G + w >= that length."""
    total = prompt_tokens + new_tokens
    if total <= trained:
        return 1
    return group_size if group_size is not None else -(-(total - window) // (trained - window))


def run_reference(model: str, prompts: dict[str, list[int]], selfextend: bool = True,
                  groups: dict[str, int] | None = None, window: int = W) -> dict[str, dict]:
    """Reference outputs (see reference.py) computed in .venv, keyed like ``prompts``: with SelfExtend,
    each prompt with its own G (``groups``, default :func:`request_group` for the fixed G)."""
    if not REFERENCE_PYTHON.exists():
        pytest.fail(f"{REFERENCE_PYTHON} is missing: the reference runs in .venv; run bash scripts/setup.sh")
    groups = groups or {}
    sizes = [(groups.get(name) or request_group(len(ids))) if selfextend else None for name, ids in prompts.items()]
    request = {"model": model, "group_sizes": sizes, "window": window, "prompts": list(prompts.values()),
               "max_new_tokens": NEW_TOKENS}
    proc = subprocess.run([str(REFERENCE_PYTHON), str(ROOT / "tests_vllm" / "reference.py")], input=json.dumps(request),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"reference failed:\n{proc.stderr[-3000:]}"
    return dict(zip(prompts, json.loads(proc.stdout)))


@pytest.fixture(scope="session")
def reference(tiny_model) -> dict[str, dict]:
    """The transformers path with SelfExtend on every prompt, each with the G its request gets from an
    engine with G = 4 fixed (1 for prompts that fit L)."""
    return run_reference(tiny_model, PROMPTS)


# ------------------------------------------------------------------------------------------------
# engines
# ------------------------------------------------------------------------------------------------

ENGINE_DEFAULTS = dict(skip_tokenizer_init=True, dtype="float32", block_size=BLOCK, enforce_eager=True, seed=0,
                       gpu_memory_utilization=0.1, num_gpu_blocks_override=128)


@contextmanager
def engine(model: str, selfextend: bool = True, keep_switch: bool = False, group_size: int = G, window: int = W,
           **options):
    """A vLLM ``LLM`` for ``model``, with SelfExtend (G, W by default) or plain (the plugin switched
    off unless ``keep_switch``); shut down on exit."""
    from vllm import LLM

    from selfextend.vllm import engine_args

    kwargs = {**ENGINE_DEFAULTS, **options}
    if selfextend:
        kwargs = engine_args(model, group_size=group_size, window=window, **kwargs)
    else:
        if not keep_switch:
            switch_off()
        kwargs = dict(model=model, max_model_len=L, **kwargs)
    llm = LLM(**kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def switch_off() -> None:
    """Undo the switch in this process (env var, backend override, vLLM's memo of chosen backends)."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from selfextend.vllm import SWITCH_ENV

    os.environ.pop(SWITCH_ENV, None)
    AttentionBackendEnum.CPU_ATTN.clear_override()
    selector._cached_get_attn_backend.cache_clear()


def worker_backends(llm) -> list[tuple[str, bool]]:
    """(attention impl class, SelfExtend settings present) of the first layer, per worker."""

    def probe(worker):
        from vllm.model_executor.layers.attention import Attention

        layer = next(m for m in worker.model_runner.model.modules() if isinstance(m, Attention))
        return type(layer.impl).__name__, getattr(layer.impl, "settings", None) is not None

    return llm.collective_rpc(probe)


def kernel_refusals(llm) -> list:
    """Per worker, why each SelfExtend metadata builder does not use the C++ kernels (None: it does)."""
    return llm.collective_rpc(lambda worker: [getattr(builder, "kernel_refusal", "not a SelfExtend builder")
                                             for per_cache in worker.model_runner.attn_groups for group in per_cache
                                             for builder in group.metadata_builders])


def sampling(**overrides):
    from vllm import SamplingParams

    options = dict(max_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=0, logprobs=0, detokenize=False,
                   ignore_eos=True)
    return SamplingParams(**{**options, **overrides})


def generate(llm, names: list[str], prompts: dict | None = None, **overrides) -> dict[str, object]:
    """Run ``prompts[name]`` (default ``PROMPTS``) for each name as one batch; outputs keyed by name."""
    prompts = PROMPTS if prompts is None else prompts
    outputs = llm.generate([{"prompt_token_ids": prompts[n]} for n in names], sampling(**overrides), use_tqdm=False)
    return dict(zip(names, outputs))


# ------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------


def prompt_logprobs(output) -> list[float]:
    """vLLM's log-probability of each prompt token after the first."""
    ids = output.prompt_token_ids
    return [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], ids[1:])]


def greedy(output) -> tuple[list[int], list[float]]:
    completion = output.outputs[0]
    return list(completion.token_ids), [entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids)]


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def compared_steps(ref: dict) -> int:
    """Greedy steps whose reference choice is clear (margin > MARGIN): compare up to the first unclear one."""
    steps = next((i for i, m in enumerate(ref["margins"]) if m <= MARGIN), len(ref["margins"]))
    assert steps >= NEW_TOKENS // 2, f"reference has a near tie at step {steps}; pick other prompts"
    return steps


def assert_matches(output, ref: dict, what: str, atol: float = ATOL) -> None:
    """vLLM's output equals the reference: prompt log-probs (when asked for), greedy tokens and
    their log-probs."""
    if output.prompt_logprobs is not None:
        prompt_diff = max_difference(prompt_logprobs(output), ref["prompt_logprobs"])
        assert prompt_diff < atol, f"{what}: prompt log-probs differ by {prompt_diff:.2e}"
    steps = compared_steps(ref)
    tokens, logprobs = greedy(output)
    assert tokens[:steps] == ref["greedy"][:steps], f"{what}: greedy tokens differ"
    decode_diff = max_difference(logprobs[:steps], ref["greedy_logprobs"][:steps])
    assert decode_diff < atol, f"{what}: decode log-probs differ by {decode_diff:.2e}"


# ------------------------------------------------------------------------------------------------
# what each engine configuration produced (engines live only while their fixture runs)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def one_pass(tiny_model) -> dict:
    """SelfExtend with G = 4 for requests past L, prefix caching off, every prompt prefilled in one step:
    each prompt alone, then all in one batch (G = 4 and G = 1 rows together)."""
    with engine(tiny_model, enable_prefix_caching=False, max_num_batched_tokens=2048) as llm:
        watch_cache(llm)
        count_kernel_calls(llm)
        return {"backends": worker_backends(llm), "kernel_refusals": kernel_refusals(llm),
                "alone": {name: generate(llm, [name])[name] for name in ONE_BATCH},
                "batch": generate(llm, ONE_BATCH),
                "asked_g2": generate(llm, ["long3", "mid"], extra_args={"selfextend_group_size": 2}),
                "refused": {g: refusal(llm, "long", g) for g in (2, 65, "4")},
                "cache_watch": cache_watch(llm), "kernel_calls": kernel_calls(llm)}


@pytest.fixture(scope="session")
def torch_decode(tiny_model) -> dict:
    """As ``one_pass`` (the batch), with the C++ kernels switched off: rows with G > 1 gather their keys."""
    os.environ["SELFEXTEND_VLLM_KERNEL"] = "torch"  # the engine's worker processes inherit it
    try:
        with engine(tiny_model, enable_prefix_caching=False, max_num_batched_tokens=2048) as llm:
            watch_cache(llm)
            count_kernel_calls(llm)
            return {"batch": generate(llm, ONE_BATCH), "cache_watch": cache_watch(llm),
                    "kernel_calls": kernel_calls(llm)}
    finally:
        del os.environ["SELFEXTEND_VLLM_KERNEL"]


def refusal(llm, name: str, group) -> str:
    """The error a request for ``name`` asking for G = ``group`` gets (it must get one)."""
    try:
        generate(llm, [name], extra_args={"selfextend_group_size": group})
    except ValueError as e:
        return str(e)
    raise AssertionError(f"a request asking for G = {group!r} was served")


@pytest.fixture(scope="session")
def chunked(tiny_model) -> dict:
    """SelfExtend, prefix caching on, prefill in chunks of 64 tokens, a KV cache of 26 blocks: the
    three "tight" requests fill 24 while prefilling and each needs a 9th block while decoding."""
    with engine(tiny_model, enable_prefix_caching=True, max_num_batched_tokens=64, num_gpu_blocks_override=26,
                disable_log_stats=False) as llm:
        watch_cache(llm)
        count_kernel_calls(llm)
        results = {"alone": generate(llm, ["long"])}
        # vLLM reads no cached blocks for a request that asks for prompt log-probs: ask for none
        results["shared"] = generate(llm, ["shared"], prompt_logprobs=None)  # hits the blocks of "long"
        results["prefix_fits"] = generate(llm, ["prefix_fits"], prompt_logprobs=None)  # G = 1: must not hit them
        results["prefix_g4"] = generate(llm, ["prefix_fits"], prompt_logprobs=None,
                                        extra_args={"selfextend_group_size": 4})  # G = 4: hits them
        results["prefix_g3"] = generate(llm, ["prefix_fits"], prompt_logprobs=None,
                                        extra_args={"selfextend_group_size": 3})  # G = 3: must not
        results["pressure"] = generate(llm, TIGHT)
        results["preemptions"] = counter(llm, "vllm:num_preemptions")
        generate(llm, ["x64"], extra_args={"selfextend_group_size": 4})  # caches two full blocks at G = 4 ...
        results["x64"] = generate(llm, ["x64b", "x64c"], prompt_logprobs=None)  # ... both read while decoding
        results["cache_watch"] = cache_watch(llm)
        results["kernel_calls"] = kernel_calls(llm)
        return results


def counter(llm, name: str) -> float:
    """Value of a counter metric of the engine."""
    return sum(m.value for m in llm.get_metrics() if m.name == name)


def watch_cache(llm) -> None:
    """In every worker, wrap each attention layer's forward: compare the whole KV cache before and after
    each call and count the (block, head, slot) entries that changed other than the call's new slots."""

    def install(worker):
        import torch
        from vllm.model_executor.layers.attention import Attention

        from selfextend.vllm.cpu_backend import probe_layout

        stats = worker.__dict__.setdefault("_cache_watch", {"calls": 0, "changed": 0, "written": 0})
        for module in worker.model_runner.model.modules():
            if not isinstance(module, Attention) or getattr(module.impl, "_watched", False):
                continue
            impl, forward = module.impl, module.impl.forward

            def watched(layer, query, key, value, kv_cache, metadata, output, *args, _forward=forward, **kwargs):
                if metadata is None:
                    return _forward(layer, query, key, value, kv_cache, metadata, output, *args, **kwargs)
                before = kv_cache.clone()
                result = _forward(layer, query, key, value, kv_cache, metadata, output, *args, **kwargs)
                blocks, heads, block, _ = kv_cache.shape
                layout = probe_layout(layer.isa, block, heads, query.shape[-1], kv_cache.dtype, "auto")
                pages = lambda t: t.view(blocks, heads, 2, block * query.shape[-1])  # noqa: E731  key, value pages
                diff = pages(before) != pages(kv_cache)  # [blocks, H, 2, B * D]
                changed = diff[:, :, 0][..., layout.key_index].any(-1) | diff[:, :, 1][..., layout.value_index].any(-1)
                slots = metadata.slot_mapping[: metadata.num_actual_tokens].long()
                stats["written"] += int(changed[slots // block, :, slots % block].sum())
                changed[slots // block, :, slots % block] = False  # the new keys and values
                stats["calls"] += 1
                stats["changed"] += int(changed.sum())
                return result

            impl.forward, impl._watched = watched, True
        return True

    llm.collective_rpc(install)


def cache_watch(llm) -> list[dict]:
    return llm.collective_rpc(lambda worker: dict(worker._cache_watch))


def count_kernel_calls(llm) -> None:
    """In every worker, count the calls of the C++ kernels (``cpu_kernel.decode`` / ``prefill``)."""

    def install(worker):
        from selfextend.vllm import cpu_kernel

        calls = worker.__dict__.setdefault("_kernel_calls", {"decode": 0, "prefill": 0})
        for name in calls:
            function = getattr(cpu_kernel, name)
            if getattr(function, "_counted", False):
                continue

            def counted(*args, _function=function, _name=name, **kwargs):
                calls[_name] += 1
                return _function(*args, **kwargs)

            counted._counted = True
            setattr(cpu_kernel, name, counted)
        return True

    llm.collective_rpc(install)


def kernel_calls(llm) -> list[dict]:
    return llm.collective_rpc(lambda worker: dict(worker._kernel_calls))


PLAIN_BATCH = ["mid", "short"]  # what fits a plain engine (max_model_len = L)


@pytest.fixture(scope="session")
def plain(tiny_model) -> dict:
    """Stock vLLM: the plugin is installed but not switched on."""
    with engine(tiny_model, selfextend=False, enable_prefix_caching=False, max_num_batched_tokens=2048) as llm:
        return {"backends": worker_backends(llm), "batch": generate(llm, PLAIN_BATCH)}


@pytest.fixture(scope="session")
def switched_on_plain_model(tiny_model) -> dict:
    """The switch on (SELFEXTEND_VLLM=1) but a model config without SelfExtend settings."""
    from selfextend.vllm import switch_on

    switch_on()
    with engine(tiny_model, selfextend=False, keep_switch=True, enable_prefix_caching=False,
                max_num_batched_tokens=2048) as llm:
        return {"backends": worker_backends(llm), "batch": generate(llm, PLAIN_BATCH)}


@pytest.fixture(scope="session")
def tensor_parallel(tiny_model) -> dict:
    """SelfExtend with tensor parallelism 2 on CPU: two worker processes, each with one KV head.
    vLLM cannot bind two CPU workers to one NUMA node by itself; one core each is given explicitly."""
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind or "0|1"
    try:
        with engine(tiny_model, tensor_parallel_size=2, enable_prefix_caching=False,
                    max_num_batched_tokens=2048) as llm:
            return {"backends": worker_backends(llm), "batch": generate(llm, ONE_BATCH)}
    finally:
        if bind is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
