# SPDX-License-Identifier: Apache-2.0
"""Server metrics in Prometheus' text format (version 0.0.4), without a client library: a few counters and
gauges behind one lock, written by the event loop (HTTP responses) and the scheduler's worker thread (steps)."""

from __future__ import annotations

import collections
import threading
import time

TOKENS_PER_SECOND_WINDOW = 10.0
"""Seconds of recent decoding over which ``dimple_tokens_per_second`` is measured."""


class Metrics:
    """Counters and gauges of one server. Every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.responses: collections.Counter[tuple[str, int]] = collections.Counter()  # (endpoint, status) → count
        self.finished: collections.Counter[str] = collections.Counter()  # finish reason (stop, length, error...)
        self.queue_depth = 0
        self.batch_size = 0
        self.peak_batch_size = 0
        self.max_batch = 0
        self.forward_passes = 0
        self.row_steps = 0
        self.peak_forward_rows = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.committed_tokens = 0
        self.decode_seconds = 0.0
        self.request_seconds_sum = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens committed)

    def response(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.responses[(endpoint, status)] += 1

    def gauges(self, queue_depth: int, batch_size: int) -> None:
        with self._lock:
            self.queue_depth, self.batch_size = queue_depth, batch_size
            self.peak_batch_size = max(self.peak_batch_size, batch_size)

    def step(self, committed: int, seconds: float, rows: int = 1) -> None:
        """One forward pass over ``rows`` requests, which committed ``committed`` canvas tokens in ``seconds``."""
        now = time.monotonic()
        with self._lock:
            self.forward_passes += 1
            self.row_steps += rows
            self.peak_forward_rows = max(self.peak_forward_rows, rows)
            self.committed_tokens += committed
            self.decode_seconds += seconds
            self._recent.append((now, committed))
            while self._recent and self._recent[0][0] < now - TOKENS_PER_SECOND_WINDOW:
                self._recent.popleft()

    def forward_counts(self) -> tuple[int, int]:
        """(forward passes, request steps) read together: their difference is the steps that shared a forward."""
        with self._lock:
            return self.forward_passes, self.row_steps

    def finish(self, reason: str, prompt_tokens: int = 0, completion_tokens: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.request_seconds_sum += seconds

    def tokens_per_second(self) -> float:
        """Canvas tokens committed per second over the last :data:`TOKENS_PER_SECOND_WINDOW` seconds."""
        now = time.monotonic()
        with self._lock:
            tokens = sum(n for t, n in self._recent if t >= now - TOKENS_PER_SECOND_WINDOW)
        return tokens / TOKENS_PER_SECOND_WINDOW

    def render(self) -> str:
        tokens_per_second = self.tokens_per_second()
        with self._lock:
            lines = [
                "# HELP dimple_http_responses_total HTTP responses by endpoint and status code.",
                "# TYPE dimple_http_responses_total counter",
            ]
            for (endpoint, status), count in sorted(self.responses.items()):
                lines.append(f'dimple_http_responses_total{{endpoint="{endpoint}",code="{status}"}} {count}')
            lines += [
                "# HELP dimple_requests_total Completion requests that left the scheduler, by finish reason.",
                "# TYPE dimple_requests_total counter",
            ]
            for reason, count in sorted(self.finished.items()):
                lines.append(f'dimple_requests_total{{reason="{reason}"}} {count}')
            scalars = [
                ("queue_depth", "gauge", "Requests waiting to join the batch.", self.queue_depth),
                ("batch_size", "gauge", "Requests being decoded now.", self.batch_size),
                ("peak_batch_size", "gauge", "The most requests decoded at once so far.", self.peak_batch_size),
                ("max_batch", "gauge", "The most requests decoded at once (--max-batch).", self.max_batch),
                (
                    "forward_passes_total",
                    "counter",
                    "Forward passes run (each is one denoising step of each of its requests).",
                    self.forward_passes,
                ),
                ("row_steps_total", "counter", "Request steps run (a forward over n rows counts n).", self.row_steps),
                ("peak_forward_rows", "gauge", "The most requests one forward has decoded.", self.peak_forward_rows),
                ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens),
                ("completion_tokens_total", "counter", "Answer tokens of finished requests.", self.completion_tokens),
                ("committed_tokens_total", "counter", "Canvas tokens unmasked.", self.committed_tokens),
                ("decode_seconds_total", "counter", "Seconds spent in denoising steps.", self.decode_seconds),
                ("request_seconds_total", "counter", "Seconds from arrival to finish.", self.request_seconds_sum),
                ("tokens_per_second", "gauge", "Canvas tokens unmasked per second, last 10 s.", tokens_per_second),
            ]
        for name, kind, help_text, value in scalars:
            lines += [f"# HELP dimple_{name} {help_text}", f"# TYPE dimple_{name} {kind}", f"dimple_{name} {value}"]
        return "\n".join(lines) + "\n"
