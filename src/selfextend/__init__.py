"""selfextend: let any RoPE language model read past its trained context, with no training.

Implements SelfExtend ("LLM Maybe LongLM", Jin et al. 2024, arXiv 2401.01325): attention to nearby
tokens keeps ordinary positions, attention to distant tokens uses floor-divided ("grouped")
positions, so no relative distance leaves the range the model saw in training.

    import selfextend
    handle = selfextend.enable(model)          # group size chosen from the input length
    model.generate(...)                        # as usual
    selfextend.disable(model)                  # back exactly as it was

Importing the package registers, once for the whole process, an attention function and a mask
function named ``"selfextend"`` with transformers (``AttentionInterface`` and
``AttentionMaskInterface``). Nothing else changes until ``enable`` selects that implementation on a
model; models that never select it are not affected.
"""

from .integration import (
    SUPPORTED_MODEL_TYPES,
    ContextLengthError,
    SelfExtendHandle,
    UnsupportedModelError,
    disable,
    enable,
    get_handle,
    is_enabled,
)
from .sequence import prompt_length
from .positions import choose_group_size, default_window, grouped_positions, max_extended_length
from .settings import Settings

__version__ = "0.1.0"

__all__ = [
    "enable",
    "disable",
    "is_enabled",
    "get_handle",
    "SelfExtendHandle",
    "Settings",
    "prompt_length",
    "ContextLengthError",
    "UnsupportedModelError",
    "SUPPORTED_MODEL_TYPES",
    "choose_group_size",
    "default_window",
    "grouped_positions",
    "max_extended_length",
]
