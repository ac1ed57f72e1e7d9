# SPDX-License-Identifier: Apache-2.0
"""The serving scheduler on a scripted runtime (no model): admission, the bounded queue, step interleaving,
timeouts, cancellation, failures that must not stop the worker, and shutdown. Plus the streamed committed
prefix on dimple-tiny's tokenizer."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
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
    """``prepare`` takes a conversation (or a batch of them) whose one message's content is a script: ``name``,
    ``steps`` (canvas length, one position unmasked per step), ``sleep`` (seconds per step), ``fail_at`` (raise
    RuntimeError at that step), ``bad`` (ValueError at the first step), ``bad_prompt`` (ValueError in prepare),
    ``seed`` (an option: requests with different seeds decode apart). ``log`` records (group name, step)."""

    def __init__(self) -> None:
        self.tokenizer = _Tokenizer()
        self.config = SimpleNamespace(mask_token_id=MASK)
        self.log: list[tuple[str, int]] = []
        self.closed: list[str] = []
        self.prepared: list[list[str]] = []

    def prepare(self, conversations: list) -> Any:
        batch = conversations if isinstance(conversations[0], list) else [conversations]
        scripts = [conversation[0]["content"] for conversation in batch]
        if any(script.get("bad_prompt") for script in scripts):
            raise ValueError("the prompt is bad")
        self.prepared.append([script["name"] for script in scripts])
        input_ids = torch.zeros(len(scripts), 3, dtype=torch.long)
        return type("Inputs", (), {"input_ids": input_ids, "scripts": scripts})()

    def stream(self, inputs: Any, template: object = None, response_length: object = None, **options: Any) -> Any:
        """Every row unmasks one position per step, then fills the rest of its canvas with the end token; the
        batch runs as long as its longest script."""
        scripts = inputs.scripts
        name = "+".join(script["name"] for script in scripts)
        steps = max(script["steps"] for script in scripts)
        canvas = torch.full((len(scripts), steps), MASK)
        try:
            for step in range(steps):
                if any(script.get("bad") for script in scripts):
                    raise ValueError("max_new_tokens is too large")
                if any(step == script.get("fail_at") for script in scripts):
                    raise RuntimeError("boom")
                time.sleep(max(script.get("sleep", 0.0) for script in scripts))
                for row, script in enumerate(scripts):
                    if step < script["steps"]:
                        canvas[row, step] = step % END
                    if step == script["steps"] - 1:
                        canvas[row, step + 1 :] = END  # a shorter answer ends: the rest of its canvas is the end
                self.log.append((name, step))
                yield _Step(step, canvas.clone(), len(scripts))
        finally:
            self.closed.append(name)


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


def _request(name: str, seed: int | None = None, **script: Any) -> ChatRequest:
    script = {"name": name, "steps": 3, **script}
    options = {} if seed is None else {"seed": seed}
    return ChatRequest(model="m", messages=[{"role": "user", "content": script}], options=options)


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


def test_requests_with_the_same_options_share_a_forward_and_groups_take_turns(make, runtime: ScriptedRuntime) -> None:
    scheduler = make(max_batch=3, max_queue=4)
    scheduler.pause()
    outs = {name: Collector() for name in "abcd"}
    scheduler.submit(_request("a"), outs["a"])
    scheduler.submit(_request("b"), outs["b"])
    scheduler.submit(_request("c", seed=1), outs["c"])  # other options: its own group
    scheduler.submit(_request("d"), outs["d"])  # beyond max_batch: waits for a slot
    scheduler.resume()
    for out in outs.values():
        assert isinstance(out.result(), Finished)
    names = [name for name, _ in runtime.log]
    assert names[:4] == ["a+b", "c", "a+b", "c"]
    assert names.index("d") >= 6  # joins at a step boundary once a group has left
    assert ["a", "b"] in runtime.prepared
    assert scheduler.metrics.peak_batch_size == 3 and scheduler.metrics.peak_forward_rows == 2
    assert [outs[n].result().completion.text for n in "abcd"] == ["abc"] * 4


def test_a_finished_row_leaves_its_group_early(make) -> None:
    scheduler = make(max_batch=2)
    scheduler.pause()
    short, long = Collector(), Collector()
    scheduler.submit(_request("short", steps=2), short)
    scheduler.submit(_request("long", steps=6), long)
    scheduler.resume()
    assert short.result().completion.forward_passes == 2  # as alone: it has no mask left after 2 steps
    assert not long.done.is_set() or long.result().completion.forward_passes == 6
    assert long.result().completion.forward_passes == 6


def test_a_group_failing_at_its_first_step_retries_each_member_alone(make, runtime: ScriptedRuntime) -> None:
    scheduler = make(max_batch=2)
    scheduler.pause()
    bad, good = Collector(), Collector()
    scheduler.submit(_request("bad", bad=True), bad)
    scheduler.submit(_request("good"), good)
    scheduler.resume()
    assert bad.result().error.status == 400
    assert isinstance(good.result(), Finished)
    assert "bad+good" in runtime.closed


def test_cancelling_one_member_leaves_the_others_decoding(make, runtime: ScriptedRuntime) -> None:
    scheduler = make(max_batch=2)
    scheduler.pause()
    first, second = Collector(), Collector()
    job = scheduler.submit(_request("x", steps=200, sleep=0.001), first)
    scheduler.submit(_request("y", steps=200, sleep=0.001), second)
    scheduler.resume()
    while not first.events:
        time.sleep(0.01)
    scheduler.cancel(job)
    assert isinstance(second.result(), Finished)
    assert not first.done.is_set()
    assert scheduler.metrics.finished["cancelled"] == 1


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
