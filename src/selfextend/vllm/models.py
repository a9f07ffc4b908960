"""Models for vLLM: a GGUF file (or the bundled model's name) becomes a local Hugging Face folder.

vLLM's CPU build cannot run GGUF-quantised weights, so the file is dequantised once with
transformers (float32, exactly the weights ``selfextend.assets.load_model`` gives the transformers
path) and saved with its tokenizer under ``$SELFEXTEND_CACHE/vllm/<name>``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..assets import AssetError, cache_dir, load_model, model_name, resolve_model


def hf_folder(spec: str | os.PathLike) -> Path:
    """A Hugging Face folder vLLM can load for ``spec`` (built-in name, HF folder or .gguf file)."""
    folder, gguf = resolve_model(spec)
    if gguf is None:
        return folder
    target = cache_dir() / "vllm" / model_name(spec)
    if (target / ".complete").exists():
        return target
    model, tokenizer = load_model(spec)  # dequantised to float32 on load: nothing quantised remains
    model.hf_quantizer = None  # else transformers refuses to save a model it loaded from GGUF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    except OSError as e:
        raise AssetError(f"could not write the dequantised model to {partial}: {e}") from e
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    (target / ".complete").touch()
    return target
