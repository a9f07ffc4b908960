"""SelfExtend attention as C++ kernels over vLLM's CPU paged KV cache (x86-64, AVX-512F).

Two entry points, one extension:

    decode   one query per request (a decode step): ``csrc/decode.cpp``
    prefill  n >= 1 queries per request in vLLM's flat token layout (prefill, chunked prefill,
             recompute): ``csrc/prefill.cpp``, tiled over query rows and keys like vLLM's own kernel

Each request has its own group size G; its keys are stored rotated to their grouped position
``j // G``. Grouped keys are scored against the query at its grouped position (rotated inside the
kernel from the rotation table), neighbour keys are rotated back from ``j // G`` to ``j`` in the
kernel -- the cache is only read. The maths, the cache layout and the work split are described at the
top of the sources (``csrc/common.h`` has what they share).

    from selfextend.vllm import cpu_kernel
    if cpu_kernel.available():
        out, lse = cpu_kernel.decode(q, key_cache, value_cache, block_table, seq_lens, groups,
                                     window, scale, table, out=output_rows)
        out, lse = cpu_kernel.prefill(q, key_cache, value_cache, query_start_loc, seq_lens,
                                      block_table, groups, window, scale, table, out=output_rows)
    else:
        ...  # the torch path; cpu_kernel.reason() says why

The extension is compiled once per machine with ``torch.utils.cpp_extension`` (``-O3 -march=native
-fopenmp``, one to two minutes; ``scripts/setup-vllm.sh`` does it) into
``selfextend.assets.cache_dir() / "vllm-kernel"``, in a folder named by a hash of the sources, the
torch and Python versions, the flags and the CPU, so a change of any of them builds afresh. A build
goes to a temporary folder renamed into place when done, so two processes building at once do not
clash. A failed build is remembered (``<folder>.failed`` holds the compiler's output) and not retried
until ``python -m selfextend.vllm.cpu_kernel --force``, which also prints the build time.

``SELFEXTEND_VLLM_KERNEL=torch`` makes :func:`available` False (the torch path runs); unset or
``auto``, the kernels run wherever they build.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..assets import cache_dir
from .rotations import RotationTable

logger = logging.getLogger(__name__)

ENV = "SELFEXTEND_VLLM_KERNEL"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("decode.cpp", "prefill.cpp", "module.cpp"))  # built into one module
HEADERS = (CSRC / "common.h",)
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)
DTYPES = (torch.float32, torch.bfloat16)
HEAD_SIZES = (32, 64, 128, 256)
MAX_QUERIES_PER_KV = 8
CACHE_ISAS = ("vec", "vec16")  # vLLM CPU attention ISAs whose cache layout the kernel reads (not "amx")


class _State:
    module = None                 # the loaded extension
    failure: str | None = None    # why it is unavailable (set once tried)
    build_seconds: float | None = None  # time of this process's build (None: loaded from the cache)
    folder: Path | None = None


_state = _State()
_lock = threading.Lock()


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------


def available() -> bool:
    """True when the kernels are compiled and loaded (building them on the first call if needed); False
    when ``SELFEXTEND_VLLM_KERNEL=torch``, the CPU lacks AVX-512F, or the build failed (see
    :func:`reason`). Raises ValueError only for an unknown ``SELFEXTEND_VLLM_KERNEL`` value."""
    if _forced_off():
        return False
    with _lock:
        if _state.module is None and _state.failure is None:
            try:
                _load(force=False)
            except Exception as error:  # any failure means "use torch"; the reason is kept
                _state.failure = _one_line(error)
        return _state.module is not None


def reason() -> str:
    """Why :func:`available` is False (one line); empty when the kernels are available."""
    if available():
        return ""
    if _forced_off():
        return f"{ENV}=torch forces the torch path"
    return _state.failure or "unknown"


def build(force: bool = False) -> float | None:
    """Compile (unless a build for these sources, torch, flags and CPU is cached) and load the kernels.
    Returns this call's build time in seconds, or None when it was loaded from the cache.
    ``force`` retries a build remembered as failed. Raises RuntimeError with the reason on failure."""
    with _lock:
        if _state.module is None:
            _state.failure = None
            try:
                _load(force=force)
            except Exception as error:
                _state.failure = _one_line(error)
                raise RuntimeError(_state.failure) from error
        return _state.build_seconds


def unsupported(dtype: torch.dtype, head_size: int, num_heads: int, num_kv_heads: int, block_size: int,
                isa: str) -> str | None:
    """Why the kernels cannot serve an attention layer of this geometry (one line), or None when they can.
    ``isa`` is vLLM's CPU attention ISA for the layer's cache (``cpu_attn._get_attn_isa``): its cache
    layout must be "vec" or "vec16". This does not check :func:`available`."""
    if dtype not in DTYPES:
        return f"dtype {dtype} (the kernel takes float32 and bfloat16)"
    if head_size not in HEAD_SIZES:
        return f"head size {head_size} (the kernel is built for {', '.join(map(str, HEAD_SIZES))})"
    if num_kv_heads < 1 or num_heads % num_kv_heads or not 1 <= num_heads // num_kv_heads <= MAX_QUERIES_PER_KV:
        return f"{num_heads} query heads over {num_kv_heads} kv heads (1 to {MAX_QUERIES_PER_KV} per kv head)"
    if block_size % 16:
        return f"block size {block_size} (a multiple of 16)"
    if isa not in CACHE_ISAS:
        return f"vLLM's {isa!r} cache layout (the kernel reads {' and '.join(map(repr, CACHE_ISAS))})"
    return None


def decode(query_plain: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           block_table: torch.Tensor, seq_lens: torch.Tensor, group_size: torch.Tensor | int, window: int,
           scale: float, table: RotationTable, query_grouped: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SelfExtend attention of one decoding query per request over its cached keys.

    query_plain    [N, Hq, D] float32 / bfloat16, last dim contiguous: the query at its position
                   p = seq_lens[n] - 1 (as vLLM's rotary layer outputs it)
    key_cache,
    value_cache    [num_blocks, Hkv, B, D], the query's dtype: vLLM's CPU cache views (the two halves
                   of its [num_blocks, Hkv, 2B, D] tensor), keys stored at grouped positions j // G
    block_table    [N, max_blocks] int32: request n's key j is slot j % B of block block_table[n, j // B]
    seq_lens       [N] int32: keys per request (S, the new key included); 0 gives a zero row, lse -inf
    group_size     [N] int32 (or one int for all): G per request; 1 is plain attention
    window         w: the last w keys are neighbours (scored at their own positions)
    scale          softmax scale (usually D ** -0.5)
    table          the engine's RotationTable (grown here to cover max(max S, w) if needed)
    query_grouped  [N, Hq, D] like query_plain: the query at p // G + w - w // G, or None (the
                   kernel rotates query_plain there); ignored for rows with G = 1
    out            [N, Hq, D] in the query's dtype, any row strides, last dim contiguous (e.g. vLLM's
                   output rows); a new tensor when None

    Returns (out, lse): the attention output and the log-sum-exp of the scaled scores [N, Hq] float32.
    The caches are never written. Raises RuntimeError when the kernel is unavailable (check
    :func:`available` first) or an input is malformed (the message names it)."""
    group_size, out = _prepare(query_plain, seq_lens, group_size, window, table, out)
    lse = _state.module.decode(query_plain, query_grouped, key_cache, value_cache, block_table, seq_lens,
                               group_size, int(window), float(scale), table.cos_t, table.sin_t, out)
    return out, lse


def prefill(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
            group_size: torch.Tensor | int, window: int, scale: float, table: RotationTable,
            out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SelfExtend attention of each request's ``n_r >= 1`` newest queries over its cached keys, in
    vLLM's flat token layout (prefill, a chunk after cached tokens, recompute; decode works too).

    query            [T, Hq, D] float32 / bfloat16, last dim contiguous: request r's queries are rows
                     query_start_loc[r] .. query_start_loc[r + 1] - 1, at positions S_r - n_r .. S_r - 1
                     (as vLLM's rotary layer outputs them)
    key_cache,
    value_cache      [num_blocks, Hkv, B, D] in the query's dtype (see :func:`decode`), the new keys
                     already written; keys of a request with G > 1 stored at grouped positions j // G
    query_start_loc  [R + 1] int32, non-decreasing, query_start_loc[R] <= T
    seq_lens         [R] int32: S_r, keys per request (its new ones included), S_r >= n_r
    block_table      [R, max_blocks] int32
    group_size       [R] int32 (or one int for all): G per request; 1 is plain causal attention
    window           w: keys j with p - w < j <= p are neighbours of the query at p
    scale            softmax scale
    table            the engine's RotationTable (grown here to cover max(max S, w) if needed)
    out              [T, Hq, D] in the query's dtype, any row strides, last dim contiguous (e.g. vLLM's
                     output rows); a new tensor when None. Only the requests' rows are written.

    Returns (out, lse): the attention output and the log-sum-exp of the scaled scores [T, Hq] float32
    (-inf for rows of no request). The caches are never written. Raises RuntimeError when the kernels
    are unavailable (check :func:`available` first) or an input is malformed (the message names it)."""
    group_size, out = _prepare(query, seq_lens, group_size, window, table, out)
    lse = _state.module.prefill(query, key_cache, value_cache, query_start_loc, seq_lens, block_table, group_size,
                                int(window), float(scale), table.cos_t, table.sin_t, out)
    return out, lse


def _prepare(query, seq_lens, group_size, window, table, out):
    """What both entry points do before the call: the kernels loaded, G per request as a tensor, the
    output tensor, the rotation table long enough for the longest request and the window."""
    if _state.module is None and not available():
        raise RuntimeError(f"the SelfExtend CPU kernels are unavailable: {reason()}")
    if isinstance(group_size, int):
        group_size = torch.full((seq_lens.numel(),), group_size, dtype=torch.int32)
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype)
    table.grow(max(int(window), int(seq_lens.max()) if seq_lens.numel() else 0))
    return group_size, out


# ------------------------------------------------------------------------------------------------
# building and loading
# ------------------------------------------------------------------------------------------------


def _forced_off() -> bool:
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ("", "auto", "torch"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not understood: use 'torch' (torch attention) or 'auto'")
    return value == "torch"


def _cpu() -> tuple[str, set[str]]:
    """(model name, feature flags) of the first CPU, from /proc/cpuinfo; empty when unknown."""
    name, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def _key(cpu_name: str, cpu_flags: set[str]) -> str:
    """Hash of everything the compiled file depends on."""
    digest = hashlib.sha256()
    sources = [path.read_bytes() for path in SOURCES + HEADERS]
    for part in (*sources, torch.__version__.encode(), sys.version.encode(), " ".join(CFLAGS).encode(),
                 " ".join(LDFLAGS).encode(), platform.machine().encode(), cpu_name.encode(),
                 " ".join(sorted(cpu_flags)).encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _load(force: bool) -> None:
    """Fill ``_state.module`` from the cache or a new build; raises with the reason otherwise."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"needs an x86-64 CPU with AVX-512F; this is {platform.machine()}")
    cpu_name, cpu_flags = _cpu()
    if "avx512f" not in cpu_flags:
        raise RuntimeError(f"the CPU ({cpu_name or 'unknown'}) lacks AVX-512F")
    key = _key(cpu_name, cpu_flags)
    root = cache_dir() / "vllm-kernel"
    folder = root / f"kernel-{key}"
    name = f"selfextend_kernel_{key}"
    library = folder / f"{name}.so"
    failed = root / f"kernel-{key}.failed"
    _state.folder = folder
    if library.exists():
        _state.module = _import(name, library)
        return
    if failed.exists() and not force:
        raise RuntimeError(f"its build failed before ({_first_error(failed.read_text())}); "
                           f"log: {failed}; retry: python -m selfextend.vllm.cpu_kernel --force")
    root.mkdir(parents=True, exist_ok=True)
    logger.warning("SelfExtend: building the CPU attention kernels into %s (once, one to two minutes)", folder)
    started = time.perf_counter()
    try:
        _state.module = _compile(name, root, folder)
    except Exception as error:
        failed.write_text(str(error))
        raise RuntimeError(f"build failed ({_first_error(str(error))}); log: {failed}") from error
    failed.unlink(missing_ok=True)
    _state.build_seconds = time.perf_counter() - started


def _compile(name: str, root: Path, folder: Path):
    """Build in a private temporary folder, then rename it to ``folder`` (atomic; if another process
    got there first, its identical build stays). Returns the loaded module."""
    from torch.utils import cpp_extension

    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        with _ninja_on_path():
            module = cpp_extension.load(name=name, sources=[str(path) for path in SOURCES],
                                        extra_cflags=list(CFLAGS),
                                        extra_ldflags=list(LDFLAGS), build_directory=str(scratch), verbose=False)
        scratch.chmod(0o755)  # mkdtemp made it private; the build is for every user of this cache
        try:
            os.rename(scratch, folder)
        except OSError:
            if not (folder / f"{name}.so").exists():
                raise
        return module
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def _ninja_on_path():
    """torch runs ``ninja`` from PATH; put the one of this Python's environment first (it is there even
    when the venv is not activated)."""
    folders = [str(Path(sys.executable).parent)]
    try:
        import ninja

        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*folders, before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


def _import(name: str, library: Path):
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        raise RuntimeError(f"cannot load {library} ({error}); delete {library.parent} to rebuild") from error
    return module


def _first_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.lower().startswith("error building extension"):
            return line[:300]
    return (lines[0] if lines else "no output")[:300]


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:500]


# ------------------------------------------------------------------------------------------------
# python -m selfextend.vllm.cpu_kernel [--force]
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfextend.vllm.cpu_kernel",
                                     description="Build (once) and load the SelfExtend kernels for vLLM's CPU path.")
    parser.add_argument("--force", action="store_true", help="retry a build remembered as failed")
    args = parser.parse_args(argv)
    logger.setLevel(logging.ERROR)  # the one line below says it all
    try:
        if _forced_off():
            print(f"SelfExtend CPU kernels: not used ({ENV}=torch); vLLM attention runs in torch")
            return 0
        seconds = build(force=args.force)
    except (RuntimeError, ValueError) as error:
        print(f"SelfExtend CPU kernels: not available ({error}); vLLM attention falls back to torch")
        return 1
    how = "loaded from the cache" if seconds is None else f"built in {seconds:.1f} s"
    print(f"SelfExtend CPU kernels: {how} ({_state.folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
