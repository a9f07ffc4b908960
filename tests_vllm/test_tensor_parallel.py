"""SelfExtend with tensor parallelism 2 on CPU: the settings reach both workers through the model
config, each worker serves its share of the KV heads, and the result is the transformers path's."""

from __future__ import annotations

from conftest import ONE_BATCH, PROMPTS, assert_matches


def test_both_workers_run_selfextend(tensor_parallel):
    assert tensor_parallel["backends"] == [("SelfExtendCPUImpl", True)] * 2


def test_tensor_parallel_batch_matches_transformers(tensor_parallel, reference):
    for name in ONE_BATCH:
        assert_matches(tensor_parallel["batch"][name], reference[name],
                       f"{name} ({len(PROMPTS[name])} tokens), tensor parallel 2")
