"""SIGTERM stops a real `selfextend serve` process promptly, even in the middle of a long prefill.

The server runs as a subprocess on the tiny checkpoint. A small bootstrap (below) wraps the model
loader so the first decoder layer of every prefill writes a line to a log file and then waits for
the test to say "go": the test knows the prefill is running, sends SIGTERM, waits until the server
has begun shutting down, and only then lets the prefill go on. Nothing depends on timing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import httpx

from server_support import LONG_PROMPT, NAME, completion_body, wait_until

BOOTSTRAP = """
import sys, time
from pathlib import Path

import selfextend.commands.common as common
from selfextend.generation import decoder_layers

log, go = Path(sys.argv[1]), Path(sys.argv[2])
load = common.load_model


def load_model(spec):
    model, tokenizer = load(spec)
    for i, layer in enumerate(decoder_layers(model)):
        def hold(_layer, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, tokens, hidden]
            if hidden.shape[1] > 1:  # a prefill
                with log.open("a") as f:
                    f.write(f"prefill layer {i}\\n")
                deadline = time.monotonic() + 120
                while i == 0 and not go.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
        layer.register_forward_pre_hook(hold, with_kwargs=True)
    return model, tokenizer


common.load_model = load_model
from selfextend.cli import main
sys.exit(main(sys.argv[3:]))
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Output:
    """Collects a pipe's lines in a background thread."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    def __contains__(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def test_sigterm_during_a_prefill_stops_it_between_layers_and_exits_0(tiny, tmp_path):
    log, go = tmp_path / "layers.log", tmp_path / "go"
    port = free_port()
    command = [sys.executable, "-c", BOOTSTRAP, str(log), str(go), "serve", "--model", str(tiny),
               "--group-size", "2", "--port", str(port), "--served-name", NAME]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    stderr = Output(server.stderr)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "Uvicorn running" in stderr or server.poll() is not None, timeout=120)
        assert server.poll() is None, "".join(stderr.lines)

        answers = []
        request = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{base}/v1/completions", json=completion_body(LONG_PROMPT, max_tokens=8), timeout=120)))
        request.start()
        wait_until(lambda: log.exists() and "prefill layer 0" in log.read_text(), timeout=60)  # held in layer 0

        server.send_signal(signal.SIGTERM)
        wait_until(lambda: "Shutting down" in stderr, timeout=60)  # the server has seen the signal
        go.touch()  # let the held prefill go on: it must stop before its next layer
        assert server.wait(timeout=60) == 0, "".join(stderr.lines)
        request.join(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    assert log.read_text() == "prefill layer 0\n"  # layer 1 never ran
    (answer,) = answers
    assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
