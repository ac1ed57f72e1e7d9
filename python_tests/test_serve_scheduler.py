# SPDX-License-Identifier: Apache-2.0
"""The serving scheduler on a scripted runtime (no model): admission, the bounded queue, step interleaving,
timeouts, cancellation, failures that must not stop the worker, and shutdown. Plus the streamed committed
prefix on dimple-tiny's tokenizer."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from dimple_rt.serve.errors import APIError
from dimple_rt.serve.scheduler import Failed, Finished, Progress, Scheduler, Started
from dimple_rt.serve.schemas import ChatRequest
from dimple_rt.serve.streaming import CommittedPrefix
from dimple_rt.tokenizer import DimpleTokenizer
from dimple_rt.weights import resolve_model

MASK = 9
END = 8
WAIT = 10.0


@dataclass
class _Step:
    step: int
    canvas: torch.Tensor
    committed: int


class _Tokenizer:
    def answer_ids(self, ids: list[int]) -> list[int]:
        ids = list(ids)
        return ids[: ids.index(END)] if END in ids else ids

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class ScriptedRuntime:
    """``prepare`` takes a conversation whose one message's content is a script: ``steps`` (int), ``sleep``
    (seconds per step), ``fail_at`` (raise RuntimeError at that step), ``bad`` (ValueError at the first step).
    Each step unmasks the next canvas position with its step number; ``log`` records (name, step)."""

    def __init__(self) -> None:
        self.tokenizer = _Tokenizer()
        self.log: list[tuple[str, int]] = []
        self.closed: list[str] = []

    def prepare(self, messages: list[dict]) -> Any:
        script = messages[0]["content"]
        if script.get("bad_prompt"):
            raise ValueError("the prompt is bad")
        return type("Inputs", (), {"input_ids": torch.zeros(1, 3, dtype=torch.long), "script": script})()

    def stream(self, inputs: Any, template: object = None, response_length: object = None, **options: Any) -> Any:
        script = inputs.script
        canvas = torch.full((1, script["steps"]), MASK)
        try:
            for step in range(script["steps"]):
                if script.get("bad"):
                    raise ValueError("max_new_tokens is too large")
                if step == script.get("fail_at"):
                    raise RuntimeError("boom")
                time.sleep(script.get("sleep", 0.0))
                canvas[0, step] = step % END
                self.log.append((script["name"], step))
                yield _Step(step, canvas.clone(), 1)
        finally:
            self.closed.append(script["name"])


class Collector:
    """An ``emit`` that records events and signals the final one."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.done = threading.Event()

    def __call__(self, event: Any) -> None:
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    def result(self) -> Any:
        assert self.done.wait(WAIT), "no final event"
        return self.events[-1]


def _request(name: str, **script: Any) -> ChatRequest:
    script = {"name": name, "steps": 3, **script}
    return ChatRequest(model="m", messages=[{"role": "user", "content": script}])


@pytest.fixture
def runtime() -> ScriptedRuntime:
    return ScriptedRuntime()


@pytest.fixture
def make(runtime: ScriptedRuntime):
    made: list[Scheduler] = []

    def build(**kwargs: Any) -> Scheduler:
        scheduler = Scheduler(runtime, **kwargs)
        scheduler.start()
        made.append(scheduler)
        return scheduler

    yield build
    for scheduler in made:
        scheduler.shutdown()


def test_events_of_a_request(make) -> None:
    scheduler = make()
    out = Collector()
    scheduler.submit(_request("a", steps=3), out)
    final = out.result()
    kinds = [type(e) for e in out.events]
    assert kinds == [Started, Progress, Progress, Progress, Finished]
    assert [e.step for e in out.events if isinstance(e, Progress)] == [0, 1, 2]
    assert final.completion.text == "abc" and final.completion.finish_reason == "length"
    assert final.completion.forward_passes == 3 and final.completion.prompt_tokens == 3


def test_active_requests_advance_in_turn_and_the_queue_waits(make, runtime: ScriptedRuntime) -> None:
    scheduler = make(max_batch=2, max_queue=4)
    scheduler.pause()
    outs = [Collector() for _ in range(3)]
    for name, out in zip("abc", outs):
        scheduler.submit(_request(name, steps=3), out)
    scheduler.resume()
    for out in outs:
        out.result()
    names = [name for name, _ in runtime.log]
    assert names[:4] == ["a", "b", "a", "b"]  # joined together, one step each per round
    assert names.index("c") >= names.index("a") + 5  # c joins only when a slot frees up
    assert scheduler.metrics.peak_batch_size == 2


def test_full_queue_answers_429_and_cancel_frees_a_slot(make) -> None:
    scheduler = make(max_batch=1, max_queue=2)
    scheduler.pause()
    jobs = [scheduler.submit(_request(name), Collector()) for name in "ab"]
    with pytest.raises(APIError) as full:
        scheduler.submit(_request("c"), Collector())
    assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
    scheduler.cancel(jobs[0])
    assert scheduler.queue_depth == 1
    out = Collector()
    scheduler.submit(_request("c"), out)
    scheduler.resume()
    assert isinstance(out.result(), Finished)
    assert scheduler.metrics.finished["cancelled"] == 1


def test_timeouts_in_the_queue_and_in_the_batch(make, runtime: ScriptedRuntime) -> None:
    scheduler = make(max_batch=1, timeout=0.3)
    slow, queued = Collector(), Collector()
    scheduler.submit(_request("slow", steps=1000, sleep=0.01), slow)
    scheduler.submit(_request("queued"), queued)
    assert slow.result().error.status == 504
    assert queued.result().error.status == 504
    assert "slow" in runtime.closed
    assert scheduler.metrics.finished["timeout"] == 2


def test_cancel_of_an_active_request_closes_its_stream(make, runtime: ScriptedRuntime) -> None:
    scheduler = make()
    out = Collector()
    job = scheduler.submit(_request("long", steps=10_000, sleep=0.001), out)
    deadline = time.monotonic() + WAIT
    while not out.events:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    scheduler.cancel(job)
    while "long" not in runtime.closed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert scheduler.batch_size == 0 and not out.done.is_set()


def test_failures_are_answered_and_the_worker_goes_on(make) -> None:
    scheduler = make()
    cases = {
        "bad prompt": (_request("p", bad_prompt=True), 400),
        "bad options": (_request("o", bad=True), 400),
        "crash": (_request("x", fail_at=1), 500),
    }
    for name, (request, status) in cases.items():
        out = Collector()
        scheduler.submit(request, out)
        final = out.result()
        assert isinstance(final, Failed) and final.error.status == status, name
    bad = _request("o", bad=True)
    out = Collector()
    scheduler.submit(bad, out)
    assert out.result().error.param == "max_tokens"

    def broken_emit(event: Any) -> None:
        raise RuntimeError("a caller's bug")

    scheduler.submit(_request("e"), broken_emit)
    out = Collector()
    scheduler.submit(_request("after"), out)
    assert isinstance(out.result(), Finished)


def test_shutdown_answers_503_to_waiting_and_active_requests(make) -> None:
    scheduler = make(max_batch=1)
    active, waiting = Collector(), Collector()
    scheduler.submit(_request("active", steps=10_000, sleep=0.001), active)
    scheduler.submit(_request("waiting"), waiting)
    while not active.events:
        time.sleep(0.01)
    scheduler.shutdown()
    assert active.result().error.status == 503
    assert waiting.result().error.status == 503
    with pytest.raises(APIError) as refused:
        scheduler.submit(_request("late"), Collector())
    assert refused.value.status == 503


# The committed prefix of a stream ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> DimpleTokenizer:
    return DimpleTokenizer.from_pretrained(resolve_model("dimple-tiny"))


def test_committed_prefix_sends_only_what_is_final_from_the_left(tokenizer: DimpleTokenizer) -> None:
    mask = tokenizer.mask_token_id
    ids = tokenizer.encode("The red circle.")
    end = tokenizer.eos_token_id
    final = [*ids, end, end]
    prefix = CommittedPrefix(tokenizer, mask)
    deltas = []
    # Unmask right to left first, then left to right: nothing is sent until the leftmost token is there.
    order = [len(final) - 1, len(final) - 2, *range(len(final) - 2)]
    canvas = [mask] * len(final)
    for position in order:
        canvas[position] = final[position]
        deltas.append(prefix.update(canvas))
    assert deltas[:2] == ["", ""]
    assert "".join(deltas) == "The red circle."
    assert prefix.finish("The red circle.") == ""


def test_committed_prefix_holds_back_a_possible_stop_string(tokenizer: DimpleTokenizer) -> None:
    mask = tokenizer.mask_token_id
    ids = tokenizer.encode("ab cd ef")
    prefix = CommittedPrefix(tokenizer, mask, stops=["cd"])
    canvas = [mask] * (len(ids) + 1)
    sent = []
    for position, token in enumerate(ids):
        canvas[position] = token
        sent.append(prefix.update(canvas))
    assert "".join(sent) == "ab "  # cut before the stop string, never past it
    assert prefix.stopped
