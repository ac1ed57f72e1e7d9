# SPDX-License-Identifier: Apache-2.0
"""``dimple-rt serve`` as a process: it starts on 127.0.0.1, answers, and on SIGTERM lets in-flight requests
finish within its grace period, answers the rest 503, and exits 0."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dimple_rt.cli import main

GRACE = 3.0
SERVE_OPTIONS = ("--host", "--port", "--max-batch", "--max-queue", "--api-key", "--image-dir", "--timeout", "--preset")
SERVE_OPTIONS += ("--quantize", "--dtype", "--device", "--backend")


def test_serve_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in SERVE_OPTIONS:
        assert option in out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_or_cancels_in_flight_work_and_exits_0() -> None:
    """SIGTERM with two requests in flight: one that fits in the grace period is answered (or, on a very slow
    machine, cancelled) cleanly; one that cannot fit (8192 'dream' steps) gets a 503 error body; exit status 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The same import rule as this run: with `python -P` the installed package, otherwise the checkout.
    python = [sys.executable, "-P"] if sys.flags.safe_path else [sys.executable]
    command = [*python, "-m", "dimple_rt.cli", "serve", "dimple-tiny", "--port", str(port), "--api-key", "k"]
    command += ["--shutdown-grace", str(GRACE)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the server did not come up within 60 s"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        replies: dict[str, httpx.Response] = {}

        def ask(name: str, dimple: dict) -> None:
            body = {
                "model": "dimple-tiny",
                "messages": [{"role": "user", "content": "What colour is the circle?"}],
                "max_tokens": 16,
                "dimple": dimple,
            }
            headers = {"Authorization": "Bearer k"}
            replies[name] = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)

        endless = {"pipeline": "dream", "steps": 8192, "threshold": None}
        askers = [
            threading.Thread(target=ask, args=("endless", endless)),
            threading.Thread(target=ask, args=("short", {"threshold": None})),
        ]
        askers[0].start()
        while httpx.get(f"{url}/health", timeout=5).json()["batch_size"] == 0:
            time.sleep(0.01)
        askers[1].start()
        while httpx.get(f"{url}/health", timeout=5).json()["batch_size"] + len(replies) < 2:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        for asker in askers:
            asker.join(120)
        assert process.wait(60) == 0, process.communicate()[0]
        assert replies["endless"].status_code == 503, replies["endless"].text
        assert "shut down" in replies["endless"].json()["error"]["message"]
        assert replies["short"].status_code in (200, 503), replies["short"].text
        if replies["short"].status_code == 200:
            assert replies["short"].json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
