# SPDX-License-Identifier: Apache-2.0
"""``dimple-rt serve`` as a process: it starts on 127.0.0.1, answers, and on SIGTERM lets the in-flight request
finish and exits 0."""

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

SERVE_OPTIONS = ("--host", "--port", "--max-batch", "--max-queue", "--api-key", "--image-dir", "--timeout")


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


def test_sigterm_finishes_in_flight_work_and_exits_0() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # The same import rule as this run: with `python -P` the installed package, otherwise the checkout.
    python = [sys.executable, "-P"] if sys.flags.safe_path else [sys.executable]
    command = [*python, "-m", "dimple_rt.cli", "serve", "dimple-tiny", "--port", str(port), "--api-key", "k"]
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
        # A request long enough to be in flight when SIGTERM comes: 'dream' runs all of its 300 steps.
        body = {
            "model": "dimple-tiny",
            "messages": [{"role": "user", "content": "What colour is the circle?"}],
            "max_tokens": 16,
            "dimple": {"pipeline": "dream", "steps": 300, "threshold": None},
        }
        replies: list[httpx.Response] = []

        def ask() -> None:
            headers = {"Authorization": "Bearer k"}
            replies.append(httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60))

        asker = threading.Thread(target=ask)
        asker.start()
        while httpx.get(f"{url}/health", timeout=5).json()["batch_size"] == 0:
            assert asker.is_alive(), "the request finished before SIGTERM could interrupt it"
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        asker.join(60)
        assert process.wait(60) == 0, process.communicate()[0]
        assert len(replies) == 1 and replies[0].status_code == 200, replies and replies[0].text
        assert replies[0].json()["dimple"]["forward_passes"] == 300
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
