# SPDX-License-Identifier: Apache-2.0
"""Load test of ``dimple-rt serve`` on dimple-tiny (issue 17): continuous batching under concurrent clients.

    PYTHONPATH=. python benchmarks/load_test.py [--clients 32] [--per-client 4] [--overfill 256]   # from the repo root

Loopback only: the server is a ``dimple-rt serve dimple-tiny`` subprocess on 127.0.0.1 at a free port, driven by
the real ``openai`` client. Requests are 16 distinct ones: dimple-tiny's held-out questions, half with their
picture (a PNG data URL) and half text-only, under four option sets (the default confident decoding, no
threshold, seeded sampling, topk_margin with a low threshold) and canvases of 16-32 tokens. Steps:

1. the single-request answer of each, from ``Runtime.generate`` in this process;
2. sequential: each distinct request twice, one after another, one client;
3. concurrent: ``--clients`` threads, each sending ``--per-client`` requests back to back (``--max-batch`` =
   clients): requests/s, tokens/s, p50/p99 latency, errors, and every answer (text and forward passes) against
   its single-request answer;
4. overfill, twice: ``--overfill`` requests at once (asyncio) against ``--max-queue`` 32: 429s counted, every
   other request must succeed, the server must stay healthy; the server's RSS before and after each round.

Then SIGTERM, and the exit status must be 0. Prints a markdown table; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import PIL.Image

import dimple_rt
from dimple_rt import Runtime
from dimple_rt.tiny import tasks

MODEL = "dimple-tiny"
KEY = "load-test"
MAX_QUEUE = 32
OPTION_SETS: list[dict[str, Any]] = [
    {},
    {"threshold": None},
    {"temperature": 1.0, "seed": 7},
    {"alg": "topk_margin", "threshold": 0.5},
]


@dataclass
class Request:
    """One distinct request: what the client sends, and the answer of Runtime.generate alone."""

    messages: list[dict]
    max_tokens: int
    options: dict[str, Any]
    text: str = ""
    forward_passes: int = 0

    def body(self) -> dict[str, Any]:
        """The client's keyword arguments: OpenAI's fields, Dimple's options in the extension object."""
        dimple = {k: v for k, v in self.options.items() if k not in ("seed", "temperature")}
        return {
            "model": MODEL,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "seed": self.options.get("seed"),
            "temperature": self.options.get("temperature"),
            "extra_body": {"dimple": dimple} if dimple else None,
        }

    def send(self, client: openai.OpenAI) -> tuple[float, Any]:
        begin = time.perf_counter()
        reply = client.chat.completions.create(**self.body())
        return time.perf_counter() - begin, reply


@dataclass
class Phase:
    """The outcome of a batch of calls."""

    name: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    canvas_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def record(self, request: Request, latency: float, reply: Any) -> None:
        self.latencies.append(latency)
        self.completion_tokens += reply.usage.completion_tokens
        self.canvas_tokens += request.max_tokens
        text, passes = reply.choices[0].message.content, reply.model_extra["dimple"]["forward_passes"]
        if text != request.text or passes != request.forward_passes:
            self.mismatches.append(f"{text!r} ({passes} passes) != {request.text!r} ({request.forward_passes})")


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _requests(runtime: Runtime) -> list[Request]:
    """16 distinct requests, with their single-request answers."""
    found: list[Request] = []
    for example in tasks.examples("test", 10_000):
        if example.has_image != (len(found) % 2 == 0):
            continue
        i = len(found)
        options, max_tokens = OPTION_SETS[(i // 2) % len(OPTION_SETS)], 16 + 8 * (i % 3)
        if example.has_image:
            buf = io.BytesIO()
            example.image().save(buf, "PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": example.question}]
            messages = [{"role": "user", "content": parts}]
            conversation = tasks.conversation(example, PIL.Image.open(io.BytesIO(buf.getvalue())))
        else:
            messages = [{"role": "user", "content": example.question}]
            conversation = [{"role": "user", "content": example.question}]
        alone = runtime.generate(conversation, max_new_tokens=max_tokens, **options)
        found.append(Request(messages, max_tokens, options, alone.text, alone.num_forward_passes))
        if len(found) == 16:
            return found
    raise RuntimeError("dimple-tiny's test split has too few examples")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metrics(url: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _start_server(max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "dimple_rt.cli", "serve", MODEL, "--port", str(port), "--api-key", KEY]
    command += ["--max-batch", str(max_batch), "--max-queue", str(MAX_QUEUE), "--timeout", "120"]
    # The server imports the same dimple_rt as this script.
    cwd = Path(dimple_rt.__file__).resolve().parent.parent
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the server did not come up within 120 s")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)


def _sequential(client: openai.OpenAI, requests: list[Request]) -> Phase:
    phase = Phase("sequential (1 client)")
    begin = time.perf_counter()
    for request in requests * 2:
        try:
            phase.record(request, *request.send(client))
        except openai.APIError as err:
            phase.errors.append(repr(err))
    phase.seconds = time.perf_counter() - begin
    return phase


def _concurrent(client: openai.OpenAI, requests: list[Request], clients: int, per_client: int) -> Phase:
    phase = Phase(f"concurrent ({clients} clients)")
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker(c: int) -> None:
        start.wait()
        for k in range(per_client):
            request = requests[(c * per_client + k) % len(requests)]
            try:
                latency, reply = request.send(client)
            except openai.APIError as err:
                with lock:
                    phase.errors.append(repr(err))
                continue
            with lock:
                phase.record(request, latency, reply)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    begin = time.perf_counter()
    for thread in threads:
        thread.join()
    phase.seconds = time.perf_counter() - begin
    return phase


async def _overfill(url: str, requests: list[Request], count: int) -> dict[str, Any]:
    """``count`` requests at once: (ok, 429s, other errors, answers that differ)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    outcome: dict[str, Any] = {"ok": 0, "429": 0, "other": [], "mismatch": 0}

    async def one(k: int) -> None:
        request = requests[k % len(requests)]
        try:
            reply = await client.chat.completions.create(**request.body())
        except openai.RateLimitError:
            outcome["429"] += 1
            return
        except openai.APIError as err:
            outcome["other"].append(repr(err))
            return
        outcome["ok"] += 1
        outcome["mismatch"] += reply.choices[0].message.content != request.text

    await asyncio.gather(*(one(k) for k in range(count)))
    await client.close()
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--overfill", type=int, default=256, help="requests sent at once in each overfill round")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    runtime = Runtime(MODEL)
    requests = _requests(runtime)
    del runtime
    answers_seconds = time.perf_counter() - began
    process, url = _start_server(args.clients)
    failures: list[str] = []
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        requests[0].send(client)  # warm-up
        rss = {"start": _rss_mib(process.pid)}
        sequential = _sequential(client, requests)
        before = _metrics(url)
        cpu = (_cpu_seconds(process.pid), time.process_time())
        concurrent = _concurrent(client, requests, args.clients, args.per_client)
        server_cpu, client_cpu = _cpu_seconds(process.pid) - cpu[0], time.process_time() - cpu[1]
        after = _metrics(url)
        rss["after concurrent"] = _rss_mib(process.pid)
        rounds = []
        for r in range(2):
            rounds.append(asyncio.run(_overfill(url, requests, args.overfill)))
            rss[f"after overfill {r + 1}"] = _rss_mib(process.pid)
        healthy = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            status = -9
    total = time.perf_counter() - began

    forwards = after["dimple_forward_passes_total"] - before["dimple_forward_passes_total"]
    row_steps = after["dimple_row_steps_total"] - before["dimple_row_steps_total"]
    print(f"# dimple-rt serve load test: {MODEL}, loopback, {os.cpu_count()} CPUs, {total:.1f} s in all")
    print(f"(dimple_rt from {Path(dimple_rt.__file__).parent}; the server imports the same)")
    print(f"(single-request answers from Runtime.generate: {answers_seconds:.1f} s, model load included)\n")
    print("| calls | requests | errors | wrong answers | requests/s | answer tok/s | canvas tok/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for phase in (sequential, concurrent):
        n = len(phase.latencies)
        print(
            f"| {phase.name} | {n + len(phase.errors)} | {len(phase.errors)} | {len(phase.mismatches)} | "
            f"{n / phase.seconds:.2f} | {phase.completion_tokens / phase.seconds:.1f} | "
            f"{phase.canvas_tokens / phase.seconds:.1f} | {_percentile(phase.latencies, 50):.3f} | "
            f"{_percentile(phase.latencies, 99):.3f} |"
        )
        failures += [f"{phase.name}: {e}" for e in phase.errors + phase.mismatches]
    speedup = (len(concurrent.latencies) / concurrent.seconds) / (len(sequential.latencies) / sequential.seconds)
    print(f"\nconcurrent / sequential requests/s: {speedup:.2f}x; concurrent phase: {forwards:.0f} forwards for "
          f"{row_steps:.0f} request steps ({row_steps / max(forwards, 1):.1f} rows per forward), "
          f"peak rows in one forward {after['dimple_peak_forward_rows']:.0f}, peak requests decoding "
          f"{after['dimple_peak_batch_size']:.0f}; CPU seconds in it: server {server_cpu:.1f}, clients "
          f"{client_cpu:.1f}, over {concurrent.seconds:.1f} s on {os.cpu_count()} CPUs\n")  # fmt: skip
    print(f"| overfill round ({args.overfill} at once, --max-queue {MAX_QUEUE}) | answered | 429 | other errors | "
          "wrong answers |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r, outcome in enumerate(rounds):
        print(f"| {r + 1} | {outcome['ok']} | {outcome['429']} | {len(outcome['other'])} | {outcome['mismatch']} |")
        failures += outcome["other"] + ([f"round {r + 1}: {outcome['mismatch']} wrong"] if outcome["mismatch"] else [])
        if not outcome["429"]:
            failures.append(f"round {r + 1}: the queue never overflowed")
    print("\n| server RSS | MiB |\n|---|---|")
    for name, mib in rss.items():
        print(f"| {name} | {mib:.1f} |")
    print(f"\nhealth after: {healthy['status']}; exit status after SIGTERM: {status}")
    if healthy["status"] != "ok" or status != 0:
        failures.append(f"health {healthy['status']}, exit status {status}")
    for failure in failures[:20]:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
