# SPDX-License-Identifier: Apache-2.0
"""The scheduler: owns the Runtime and runs every denoising step in one worker thread, off the event loop.

Requests wait in a bounded FIFO queue (full → 429 with Retry-After). Up to ``max_batch`` of them are decoded at
once. At every step boundary the worker drops cancelled or timed-out requests and admits queued ones: each is
prepared alone (its errors are its own), and the newcomers that share decoding options (GenerationConfig fields,
max_tokens, template, response_length) start together as one *group*, one batched ``Runtime.stream`` over their
conversations (left padded). Then every group advances one step, in turn. A request leaves as soon as its answer
is final ('dim' pipeline: no mask left), even while the rest of its group decodes on.

Per-sequence decisions (the Runtime's default) make each row decode as it would alone, with its own RNG stream,
so an answer equals ``Runtime.generate`` of that one request. If a group fails at its first step (say, one
prompt holds a <|mask|> token), each member starts again alone, so the error reaches only its own request.

What is not there yet: a request cannot join a group that is already decoding. Groups run their forwards one
after another; one forward over rows at different steps, with their own prompt lengths and prefill caches,
needs a step loop that takes rows in and out (generation/ and model/ work).

Each request talks to its caller through ``emit(event)``, called from the worker thread: :class:`Started` after
its first step (so every validation error arrives before it), :class:`Progress` after every step, then exactly
one of :class:`Finished` or :class:`Failed`. A cancelled request gets no further event.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

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
        self.inputs: Any = None  # the request's own prepared ModelInputs
        self.prompt_tokens = 0
        self.steps = 0
        self.canvas: list[int] = []
        self.started = 0.0
        self.decode_seconds = 0.0

    def cancel(self) -> None:
        self.cancelled.set()

    def key(self) -> str:
        """Requests with equal keys decode with the same options and may share a batched forward."""
        request = self.request
        return repr((sorted(request.options.items()), request.max_tokens, request.template, request.response_length))


class Group:
    """Requests decoded together by one batched ``Runtime.stream`` (row i is ``members[i]``). Rows leave when
    their answer is final (``live`` shrinks); a cancelled row stays in the batch but is no longer reported."""

    def __init__(self, members: list[Job], stream: Iterator[Any], early_exit: bool) -> None:
        self.members = members
        self.live = list(members)
        self.stream = stream
        self.early_exit = early_exit  # the 'dim' pipeline: a row without masks is final
        self.steps = 0

    def close(self) -> None:
        self.stream.close()  # type: ignore[attr-defined]


class Scheduler:
    """Owns ``runtime``; ``start()`` the worker, ``submit()`` requests, ``shutdown()`` at the end.

    max_batch: requests decoded at once; max_queue: requests waiting beyond those; timeout: seconds a request
    may take from arrival (queueing included) before it fails with 504.
    """

    def __init__(
        self,
        runtime: Any,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        timeout: float = 300.0,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or not timeout > 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 0 and timeout > 0, got {max_batch}, {max_queue}, {timeout}"
            )
        self.runtime = runtime
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()
        self._active: list[Group] = []  # worker-owned; other threads only count its rows
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
            free_slots = 0 if self._paused else max(0, self.max_batch - self._rows())
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
        return self._rows()

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
        self.metrics.gauges(len(self._pending), self._rows())

    def _rows(self) -> int:
        return sum(len(group.live) for group in self._active)

    def _run(self) -> None:
        # One inference mode around everything: each group's stream enters and leaves its own, interleaved with
        # the others', and each restores the state it found, which must be "on" for the canvases to stay writable.
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._active and (self._paused or not self._pending):
                        self._cond.wait()
                    if self._stopping:
                        break
                    admitted = []
                    while self._pending and not self._paused and self._rows() + len(admitted) < self.max_batch:
                        admitted.append(self._pending.popleft())
                try:
                    self._admit(admitted)
                except Exception as err:  # never the worker: fail the newcomers that did not make it into a group
                    log.exception("admission failed")
                    started = {id(job) for group in self._active for job in group.members}
                    for job in admitted:
                        if id(job) not in started:
                            self._fail(job, APIError(500, f"internal error: {type(err).__name__}", type="server_error"))
                with self._cond:
                    self._gauges()  # the rows of this round, before any of them finishes
                for group in list(self._active):
                    self._guarded(self._advance, group)
                with self._cond:
                    self._gauges()
            for group in self._active:
                group.close()
                for job in group.live:
                    self._fail(
                        job, APIError(503, "the server shut down before the answer was done", type="server_error")
                    )
            self._active.clear()
            self._gauges()

    def _guarded(self, work: Callable[[Group], None], group: Group) -> None:
        """Advance one group; whatever goes wrong fails its requests (500), never the worker."""
        try:
            work(group)
        except Exception as err:
            log.exception("a group failed in the scheduler")
            self._drop(group)
            for job in group.live:
                self._fail(job, APIError(500, f"internal error: {type(err).__name__}", type="server_error"))

    def _admit(self, jobs: list[Job]) -> None:
        """Prepare each new request alone (its errors are its own), then start one group per set of requests
        that decode with the same options: a group is one batched ``Runtime.stream``."""
        ready: dict[str, list[Job]] = {}
        for job in jobs:
            if job.cancelled.is_set():
                self.metrics.finish("cancelled")
            elif time.monotonic() > job.deadline:
                self._fail(job, self._timeout_error())
            elif self._prepare(job):
                ready.setdefault(job.key(), []).append(job)
        for members in ready.values():
            self._start(members)

    def _prepare(self, job: Job) -> bool:
        job.started = time.monotonic()
        try:
            inputs = self.runtime.prepare(job.request.messages)
        except (ValueError, TypeError, NotImplementedError) as err:
            self._fail(job, APIError(400, str(err), param="messages"))
            return False
        except Exception as err:  # prepare only reads the request (template, tokenizer, images): the input's fault
            log.exception("prepare failed")
            self._fail(job, APIError(400, f"the messages could not be prepared: {err}", param="messages"))
            return False
        job.prompt_tokens = int(inputs.input_ids.shape[1])
        job.inputs = inputs
        return True

    def _start(self, members: list[Job]) -> None:
        request = members[0].request
        options = dict(request.options)
        if request.max_tokens is not None:
            options["max_new_tokens"] = request.max_tokens
        try:
            if len(members) == 1:
                inputs = members[0].inputs
            else:
                inputs = self.runtime.prepare([job.request.messages for job in members])
            stream = self.runtime.stream(
                inputs, template=request.template, response_length=request.response_length, **options
            )
        except Exception as err:  # each member prepared alone above; a batch that fails is our fault
            log.exception("a group could not start")
            for job in members:
                self._fail(job, APIError(500, f"internal error: {type(err).__name__}", type="server_error"))
            return
        self._active.append(Group(members, stream, options.get("pipeline", "dim") == "dim"))

    def _advance(self, group: Group) -> None:
        for job in list(group.live):
            if job.cancelled.is_set():
                group.live.remove(job)
                self.metrics.finish("cancelled")
            elif time.monotonic() > job.deadline:
                group.live.remove(job)
                self._fail(job, self._timeout_error())
        if not group.live:
            self._drop(group)
            return
        begin = time.perf_counter()
        try:
            step = next(group.stream)
        except StopIteration:
            self._drop(group)
            for job in list(group.live):
                self._complete(job)
            return
        except NonFiniteLogitsError as err:
            self._drop(group)
            for job in group.live:
                self._fail(
                    job, APIError(500, f"the model failed: {err}", type="server_error", code="non_finite_logits")
                )
            return
        except (ValueError, TypeError) as err:  # the options meet the prompt at the first step: the client's call
            self._drop(group)
            if group.steps == 0 and len(group.members) > 1:
                for job in group.live:  # whose error is it? Each member starts again on its own.
                    self._start([job])
            elif group.steps == 0:
                for job in group.live:
                    self._fail(job, APIError(400, _as_request_message(str(err)), param=_param_of(str(err))))
            else:
                log.exception("a group failed at step %d", group.steps)
                for job in group.live:
                    self._fail(job, APIError(500, f"decoding failed: {err}", type="server_error"))
            return
        seconds = time.perf_counter() - begin
        group.steps += 1
        self.metrics.step(step.committed, seconds, rows=len(group.members))
        mask_id = self.runtime.config.mask_token_id
        for job in list(group.live):
            job.canvas = step.canvas[group.members.index(job)].tolist()
            job.steps += 1
            if job.steps == 1:
                self._emit(job, Started(job.prompt_tokens))
            masks_left = job.canvas.count(mask_id)
            self._emit(job, Progress(step.step, job.canvas, masks_left))
            if group.early_exit and masks_left == 0:
                group.live.remove(job)  # its answer is final: a single run would stop here too
                self._complete(job)
        if not group.live:
            self._drop(group)

    def _complete(self, job: Job) -> None:
        tokenizer = self.runtime.tokenizer
        answer = tokenizer.answer_ids(job.canvas)
        text = tokenizer.decode(answer)
        finish_reason = "stop" if len(answer) < len(job.canvas) else "length"
        cut = cut_at_stop(text, job.request.stop)
        if cut is not None:
            text, finish_reason = cut, "stop"
        completion = Completion(
            text=text,
            token_ids=answer,
            finish_reason=finish_reason,
            prompt_tokens=job.prompt_tokens,
            forward_passes=job.steps,
            canvas_tokens=len(job.canvas),
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

    def _drop(self, group: Group) -> None:
        if group in self._active:
            self._active.remove(group)
        group.close()

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
