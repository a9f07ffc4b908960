"""The bundled model (SmolLM2-135M, trained length 8192) in vLLM with SelfExtend against the
transformers path, on a passkey prompt past the trained length (slow: run with -m slow)."""

from __future__ import annotations

import random

import pytest
from conftest import assert_matches, engine, generate, run_reference

REAL_ATOL = 2e-3  # 30 float32 layers over 9000 tokens: rounding differences grow with depth and length


@pytest.mark.slow
def test_bundled_model_past_its_trained_length_matches_transformers():
    from transformers import AutoTokenizer

    from selfextend import prompts
    from selfextend.vllm.models import hf_folder

    folder = str(hf_folder("smollm2-135m"))
    prompt = prompts.passkey_prompt(AutoTokenizer.from_pretrained(folder), 9000, 0.5,
                                    prompts.random_key(random.Random(0)))
    inputs = {"passkey": prompt.input_ids}
    reference = run_reference(folder, inputs, groups={"passkey": 4}, window=1024)
    with engine(folder, group_size=4, window=1024, max_num_batched_tokens=4096, num_gpu_blocks_override=None,
                gpu_memory_utilization=0.2) as llm:
        output = generate(llm, ["passkey"], inputs)["passkey"]
    assert_matches(output, reference["passkey"], "9000-token passkey prompt, bundled model", atol=REAL_ATOL)
