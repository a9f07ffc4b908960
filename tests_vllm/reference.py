"""Reference outputs from this project's transformers path, for the vLLM tests to compare against.

Runs in ``.venv`` (the transformers version the library supports), not in ``.venv-vllm``:

    .venv/bin/python tests_vllm/reference.py < request.json > outputs.json

request: {"model": folder, "group_sizes": [G or null per prompt], "window": w, "prompts": [[ids]],
"max_new_tokens": n} (G null or 1 = the plain model for that prompt). For each prompt it writes the log-probability of every prompt
token given the ones before it (one forward pass), and the greedy continuation with each chosen
token's log-probability and its margin over the runner-up (``model.generate`` with the KV cache).
"""

from __future__ import annotations

import json
import sys

import torch


def outputs_for(model, prompt: list[int], max_new_tokens: int) -> dict:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)  # [n, vocab]
        prompt_logprobs = logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    greedy = out.sequences[0, len(prompt):].tolist()
    step_logprobs = [logits[0].float().log_softmax(-1) for logits in out.logits]
    top2 = [lp.topk(2).values for lp in step_logprobs]
    return {"prompt_logprobs": prompt_logprobs, "greedy": greedy,
            "greedy_logprobs": [lp[t].item() for lp, t in zip(step_logprobs, greedy)],
            "margins": [(v[0] - v[1]).item() for v in top2]}


def main() -> None:
    import selfextend
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    request = json.load(sys.stdin)
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    results = []
    for prompt, group in zip(request["prompts"], request["group_sizes"]):
        if group not in (None, 1):
            selfextend.enable(model, group_size=group, window=request["window"])
        results.append(outputs_for(model, prompt, request["max_new_tokens"]))
        selfextend.disable(model)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
