# SPDX-License-Identifier: Apache-2.0
"""The scheduler: owns the Runtime and a step engine (:class:`~dimple_rt.generation.engine.Engine`), and runs
every denoising step in one worker thread, off the event loop.

Requests wait in a bounded FIFO queue (full → 429 with Retry-After). Up to ``max_batch`` of them are decoded at
once, as continuous (step-level) batching: at every step boundary the worker drops cancelled and timed-out
requests, admits queued ones into the running batch (each prepared alone, so its errors are its own: images
encoded, options checked), and runs one engine step, in which every request advances by one denoising step.
Requests at different steps, with different prompts and options, share the engine's forwards (one per step in
the steady state, plus one for the requests joining at that boundary; see the engine for what runs alone). A
request leaves as soon as its answer is final, and a queued one takes its place at the next boundary.

Per-sequence decisions (the engine's only mode) make each row decode as it would alone, with its own RNG
streams, so an answer equals ``Runtime.generate`` of that one request, tokens and forward passes. A request that
fails (its logits are not finite, say) fails alone; an engine step that raises fails the requests in the batch
(500), never the worker.

Each request talks to its caller through ``emit(event)``, called from the worker thread: :class:`Started` after
its first step (so every validation error arrives before it), :class:`Progress` after every step, then exactly
one of :class:`Finished` or :class:`Failed`. A cancelled request gets no further event.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dimple_rt.generation.engine import Engine, Sequence
from dimple_rt.generation.loop import NonFiniteLogitsError

from .errors import APIError
from .metrics import Metrics
from .schemas import ChatRequest

log = logging.getLogger("dimple_rt.serve")


@dataclass
class Completion:
    """A finished request. finish_reason: "stop" (the answer ended, or a stop string cut it) or "length" (the
    canvas filled without an end); token_ids: the answer's ids (cut at the terminator, before stop strings)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    forward_passes: int
    canvas_tokens: int
    queue_seconds: float
    decode_seconds: float

    def usage(self) -> dict[str, int]:
        completion = len(self.token_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def extension(self) -> dict[str, Any]:
        """Dimple's extension fields of a response."""
        return {
            "forward_passes": self.forward_passes,
            "canvas_tokens": self.canvas_tokens,
            "queue_seconds": round(self.queue_seconds, 6),
            "decode_seconds": round(self.decode_seconds, 6),
            "seconds": round(self.queue_seconds + self.decode_seconds, 6),
        }


@dataclass
class Started:
    prompt_tokens: int


@dataclass
class Progress:
    """The canvas (max_tokens ids, masks included) after step ``step``; masks_left: masks still in it."""

    step: int
    canvas: list[int]
    masks_left: int


@dataclass
class Finished:
    completion: Completion


@dataclass
class Failed:
    error: APIError


Event = Started | Progress | Finished | Failed


class Job:
    """One request inside the scheduler. ``cancel()`` may be called from any thread."""

    def __init__(self, request: ChatRequest, emit: Callable[[Event], None], timeout: float) -> None:
        self.request = request
        self.emit = emit
        self.arrived = time.monotonic()
        self.deadline = self.arrived + timeout
        self.cancelled = threading.Event()
        self.sequence: Sequence | None = None  # its row in the engine, once admitted
        self.prompt_tokens = 0
        self.steps = 0
        self.started = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Owns ``runtime``; ``start()`` the worker, ``submit()`` requests, ``shutdown()`` at the end.

    max_batch: requests decoded at once; max_queue: requests waiting beyond those; timeout: seconds a request
    may take from arrival (queueing included) before it fails with 504. ``engine``: the step engine, by default
    ``Engine(runtime.model, runtime.backend)``.
    """

    def __init__(
        self,
        runtime: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        timeout: float = 300.0,
        metrics: Metrics | None = None,
        engine: Any = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or not timeout > 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 0 and timeout > 0, got {max_batch}, {max_queue}, {timeout}"
            )
        self.runtime = runtime
        self.engine = engine if engine is not None else Engine(runtime.model, runtime.backend)
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # worker-owned: the requests in the engine; other threads only count them
        self._paused = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # Caller side (any thread) ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dimple-scheduler", daemon=True)
            self._thread.start()

    def submit(self, request: ChatRequest, emit: Callable[[Event], None]) -> Job:
        """Queue a request; APIError 429 (with Retry-After) when the queue is full, 503 when shutting down."""
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            free_slots = 0 if self._paused else max(0, self.max_batch - len(self._active))
            if len(self._pending) >= self.max_queue + free_slots:
                raise APIError(
                    429,
                    f"the server is busy: {len(self._pending)} requests are queued (--max-queue {self.max_queue}); "
                    "retry after a moment",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            job = Job(request, emit, self.timeout)
            self._pending.append(job)
            self._gauges()
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel a request (a client went away): it leaves the queue now, or the batch at the next step."""
        job.cancel()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.metrics.finish("cancelled")
                self._gauges()
            self._cond.notify_all()

    def pause(self) -> None:
        """Admit nothing new from the queue until :meth:`resume` (active requests go on)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        """The worker thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def batch_size(self) -> int:
        """Requests being decoded now."""
        return len(self._active)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Fail queued requests with 503 and stop; active requests are cancelled at their next step boundary."""
        with self._cond:
            self._stopping = True
            while self._pending:
                self._fail(self._pending.popleft(), APIError(503, "the server is shutting down", type="server_error"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # Worker side ------------------------------------------------------------------------------------------------

    def _gauges(self) -> None:
        self.metrics.gauges(len(self._pending), len(self._active))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._active and (self._paused or not self._pending):
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = []
                while self._pending and not self._paused and len(self._active) + len(admitted) < self.max_batch:
                    admitted.append(self._pending.popleft())
            for job in admitted:
                try:
                    self._admit(job)
                except Exception as err:  # never the worker
                    log.exception("admission failed")
                    self._leave(job, APIError(500, f"internal error: {type(err).__name__}", type="server_error"))
            self._drop_abandoned()
            with self._cond:
                self._gauges()  # the rows of this step, before any of them finishes
            if self._active:
                self._step()
            with self._cond:
                self._gauges()
        for job in list(self._active):
            self._leave(job, APIError(503, "the server shut down before the answer was done", type="server_error"))
        self._gauges()

    def _admit(self, job: Job) -> None:
        """Prepare the request alone (its errors are its own) and add it to the engine's running batch."""
        if job.cancelled.is_set():
            self.metrics.finish("cancelled")
            return
        if time.monotonic() > job.deadline:
            self._fail(job, self._timeout_error())
            return
        job.started = time.monotonic()
        request = job.request
        try:
            inputs = self.runtime.prepare(request.messages)
        except (ValueError, TypeError, NotImplementedError) as err:
            self._fail(job, APIError(400, str(err), param="messages"))
            return
        except Exception as err:  # prepare only reads the request (template, tokenizer, images): the input's fault
            log.exception("prepare failed")
            self._fail(job, APIError(400, f"the messages could not be prepared: {err}", param="messages"))
            return
        options = dict(request.options)
        if request.max_tokens is not None:
            options["max_new_tokens"] = request.max_tokens
        try:
            decode, config = self.runtime.decode_request(
                inputs, template=request.template, response_length=request.response_length, **options
            )
            job.sequence = self.engine.add(decode, config, tag=job)
        except (ValueError, TypeError) as err:  # the options meet the prompt: the client's call
            self._fail(job, APIError(400, _as_request_message(str(err)), param=_param_of(str(err))))
            return
        job.prompt_tokens = int(inputs.input_ids.shape[1])
        self._active.append(job)

    def _drop_abandoned(self) -> None:
        """Cancelled requests leave the batch quietly, timed-out ones with 504."""
        for job in list(self._active):
            if job.cancelled.is_set():
                self._leave(job, None)
                self.metrics.finish("cancelled")
            elif time.monotonic() > job.deadline:
                self._leave(job, self._timeout_error())

    def _step(self) -> None:
        """One engine step over the batch; each request then advances, finishes or fails on its own."""
        try:
            stepped = self.engine.step()
        except Exception as err:  # the engine isolates each row's errors: this is ours, and ends the batch
            log.exception("an engine step failed")
            for job in list(self._active):
                self._leave(job, APIError(500, f"internal error: {type(err).__name__}", type="server_error"))
            return
        for forward in self.engine.forwards:
            self.metrics.step(forward.committed, forward.seconds, rows=forward.rows)
        mask_id = self.runtime.config.mask_token_id
        for sequence in stepped:
            job = sequence.tag
            if job not in self._active:
                continue
            if sequence.error is not None:
                self._leave(job, self._step_error(sequence))
                continue
            if sequence.forwards > job.steps:  # it took a step (a finished sequence may just leave)
                job.steps = sequence.forwards
                canvas = sequence.canvas.tolist()
                if job.steps == 1:
                    self._emit(job, Started(job.prompt_tokens))
                assert sequence.last_step is not None
                self._emit(job, Progress(sequence.last_step.step, canvas, canvas.count(mask_id)))
            if sequence.finished:
                self._active.remove(job)
                self._complete(job, sequence)

    def _step_error(self, sequence: Sequence) -> APIError:
        err = sequence.error
        if isinstance(err, NonFiniteLogitsError):
            return APIError(500, f"the model failed: {err}", type="server_error", code="non_finite_logits")
        if isinstance(err, (ValueError, TypeError)) and sequence.forwards == 0:  # checked at its first step
            return APIError(400, _as_request_message(str(err)), param=_param_of(str(err)))
        log.error("a request failed at step %d", sequence.forwards, exc_info=err)
        return APIError(500, f"decoding failed: {type(err).__name__}: {err}", type="server_error")

    def _leave(self, job: Job, error: APIError | None) -> None:
        """Take an active (or just admitted) request out of the batch; fail it with ``error`` if given."""
        if job in self._active:
            self._active.remove(job)
        if job.sequence is not None:
            self.engine.remove(job.sequence)
        if error is not None:
            self._fail(job, error)

    def _complete(self, job: Job, sequence: Sequence) -> None:
        tokenizer = self.runtime.tokenizer
        canvas = sequence.canvas.tolist()
        answer = tokenizer.answer_ids(canvas)
        text = tokenizer.decode(answer)
        finish_reason = "stop" if len(answer) < len(canvas) else "length"
        cut = cut_at_stop(text, job.request.stop)
        if cut is not None:
            text, finish_reason = cut, "stop"
        completion = Completion(
            text=text,
            token_ids=answer,
            finish_reason=finish_reason,
            prompt_tokens=job.prompt_tokens,
            forward_passes=sequence.forwards,
            canvas_tokens=len(canvas),
            queue_seconds=job.started - job.arrived,
            decode_seconds=time.monotonic() - job.started,
        )
        self.metrics.finish(
            finish_reason, completion.prompt_tokens, len(answer), completion.queue_seconds + completion.decode_seconds
        )
        self._emit(job, Finished(completion))

    def _timeout_error(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within the server's timeout of {self.timeout:g} s (queueing included); "
            "ask for fewer max_tokens or steps",
            type="timeout",
            code="timeout",
        )

    def _fail(self, job: Job, error: APIError) -> None:
        self.metrics.finish("timeout" if error.status == 504 else "error")
        self._emit(job, Failed(error))

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        if job.cancelled.is_set():
            return
        try:
            job.emit(event)
        except Exception:  # a caller's callback must never stop the worker
            log.exception("emit failed")


def cut_at_stop(text: str, stops: list[str]) -> str | None:
    """``text`` up to the earliest stop string (OpenAI: the stop string is not returned), or None if none occurs."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else None


def _param_of(message: str) -> str | None:
    for name in ("max_new_tokens", "template", "response_length"):
        if name in message:
            return "max_tokens" if name == "max_new_tokens" else f"dimple.{name}"
    return None


def _as_request_message(message: str) -> str:
    """Runtime names the canvas max_new_tokens; the request calls it max_tokens."""
    return message.replace("max_new_tokens", "max_tokens")
