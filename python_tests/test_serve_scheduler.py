# SPDX-License-Identifier: Apache-2.0
"""The serving scheduler on a scripted runtime and engine (no model): admission into the running batch, the
bounded queue, timeouts, cancellation, failures that must not stop the worker, and shutdown. Plus the streamed
committed prefix on dimple-tiny's tokenizer."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dimple_rt.generation.engine import Forward, Sequence
from dimple_rt.generation.loop import DecodeRequest, Step
from dimple_rt.serve.errors import APIError
from dimple_rt.serve.scheduler import Failed, Finished, Progress, Scheduler, Started
from dimple_rt.serve.schemas import ChatRequest
from dimple_rt.serve.streaming import CommittedPrefix
from dimple_rt.tokenizer import DimpleTokenizer
from dimple_rt.weights import resolve_model

MASK = 9
END = 8
WAIT = 10.0


class _Tokenizer:
    def answer_ids(self, ids: list[int]) -> list[int]:
        ids = list(ids)
        return ids[: ids.index(END)] if END in ids else ids

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


class ScriptedRuntime:
    """``prepare`` takes a conversation whose one message's content is a script: ``name``, ``steps`` (canvas
    length, one position unmasked per step), ``sleep`` (seconds per step), ``fail_at`` (the sequence fails with
    RuntimeError at that step), ``bad`` (ValueError from decode_request), ``bad_prompt`` (ValueError in
    prepare), ``explode`` (the whole engine step raises at the sequence's first step)."""

    def __init__(self) -> None:
        self.tokenizer = _Tokenizer()
        self.config = SimpleNamespace(mask_token_id=MASK)
        self.prepared: list[str] = []

    def prepare(self, conversation: list) -> Any:
        script = conversation[0]["content"]
        if script.get("bad_prompt"):
            raise ValueError("the prompt is bad")
        self.prepared.append(script["name"])
        return SimpleNamespace(input_ids=torch.zeros(1, 3, dtype=torch.long), script=script)

    def decode_request(self, inputs: Any, **options: Any) -> tuple[DecodeRequest, dict]:
        script = inputs.script
        if script.get("bad"):
            raise ValueError("max_new_tokens is too large")
        canvas = torch.full((1, script["steps"]), MASK)
        request = DecodeRequest(inputs.input_ids, torch.ones_like(inputs.input_ids), canvas)
        return request, {"script": script, **options}


class ScriptedEngine:
    """The engine's contract without a model: every sequence unmasks one position per step, then fills the
    rest of its canvas with the end token. ``log`` records the names in each step; ``removed`` the sequences
    taken out before they were done."""

    def __init__(self) -> None:
        self.sequences: list[Sequence] = []
        self.forwards: list[Forward] = []
        self.log: list[list[str]] = []
        self.removed: list[str] = []

    def add(self, request: DecodeRequest, options: dict, *, tag: Any = None) -> Sequence:
        sequence = Sequence(request, tag)
        sequence.state = options["script"]  # type: ignore[assignment]
        self.sequences.append(sequence)
        return sequence

    def remove(self, sequence: Sequence) -> None:
        if sequence in self.sequences:
            self.sequences.remove(sequence)
            self.removed.append(sequence.state["name"])  # type: ignore[index]

    def step(self) -> list[Sequence]:
        stepped = list(self.sequences)
        scripts = [sequence.state for sequence in stepped]
        if any(script.get("explode") for script in scripts):  # type: ignore[union-attr]
            raise RuntimeError("the engine broke")
        time.sleep(max(script.get("sleep", 0.0) for script in scripts))  # type: ignore[union-attr]
        for sequence, script in zip(stepped, scripts):
            i = sequence.forwards
            if i == script.get("fail_at"):  # type: ignore[union-attr]
                sequence.error = RuntimeError("boom")
                continue
            canvas = sequence.canvas.clone()
            canvas[i] = i % END
            finished = i == script["steps"] - 1  # type: ignore[index]
            sequences = torch.cat([torch.zeros(3, dtype=torch.long), canvas])[None]
            position, confidence = torch.tensor([[0, i]]), torch.ones(1)
            sequence.last_step = Step(i, sequences, 1, position, confidence, last=finished)
            sequence.forwards, sequence.finished = i + 1, finished
        self.log.append([script["name"] for script in scripts])  # type: ignore[index]
        self.forwards = [Forward("cached", len(stepped), len(stepped), 0.0)]
        self.sequences = [sequence for sequence in self.sequences if not sequence.done]
        return stepped


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
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def make(runtime: ScriptedRuntime, engine: ScriptedEngine):
    made: list[Scheduler] = []

    def build(**kwargs: Any) -> Scheduler:
        scheduler = Scheduler(runtime, engine=engine, **kwargs)
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


def test_requests_join_the_running_batch_at_a_step_boundary(make, engine: ScriptedEngine) -> None:
    """A request that arrives while another decodes joins its steps; beyond max_batch one waits for a slot,
    which it takes at the step after a request leaves."""
    scheduler = make(max_batch=2, max_queue=4)
    first, second, third = Collector(), Collector(), Collector()
    scheduler.submit(_request("a", steps=6, sleep=0.02), first)
    while not first.events:
        time.sleep(0.005)
    scheduler.submit(_request("b", steps=3, sleep=0.02), second)
    scheduler.submit(_request("c", steps=2, sleep=0.02), third)
    for out in (first, second, third):
        assert isinstance(out.result(), Finished)
    joined = next(i for i, names in enumerate(engine.log) if "b" in names)
    assert joined >= 1 and engine.log[joined] == ["a", "b"]  # b joined a, which was already decoding
    assert all(len(names) <= 2 for names in engine.log)
    left = max(i for i, names in enumerate(engine.log) if "b" in names)
    assert engine.log[left + 1] == ["a", "c"]  # c took b's slot at the next step
    assert [out.result().completion.forward_passes for out in (first, second, third)] == [6, 3, 2]
    assert scheduler.metrics.peak_batch_size == 2 and scheduler.metrics.peak_forward_rows == 2


def test_a_finished_request_leaves_the_batch_early(make) -> None:
    scheduler = make(max_batch=2)
    scheduler.pause()
    short, long = Collector(), Collector()
    scheduler.submit(_request("short", steps=2), short)
    scheduler.submit(_request("long", steps=6), long)
    scheduler.resume()
    assert short.result().completion.forward_passes == 2  # as alone: it has no mask left after 2 steps
    assert long.result().completion.forward_passes == 6


def test_a_failing_request_fails_alone(make, engine: ScriptedEngine) -> None:
    scheduler = make(max_batch=3)
    scheduler.pause()
    bad, crash, good = Collector(), Collector(), Collector()
    scheduler.submit(_request("bad", bad=True), bad)
    scheduler.submit(_request("crash", fail_at=1), crash)
    scheduler.submit(_request("good"), good)
    scheduler.resume()
    assert bad.result().error.status == 400 and bad.result().error.param == "max_tokens"
    assert crash.result().error.status == 500 and "boom" in crash.result().error.message
    assert isinstance(good.result(), Finished)
    assert engine.log[0] == ["crash", "good"]


def test_an_engine_step_that_raises_fails_the_batch_not_the_worker(make) -> None:
    scheduler = make(max_batch=2)
    scheduler.pause()
    doomed, companion = Collector(), Collector()
    scheduler.submit(_request("x", explode=True), doomed)
    scheduler.submit(_request("y"), companion)
    scheduler.resume()
    assert doomed.result().error.status == 500 and companion.result().error.status == 500
    out = Collector()
    scheduler.submit(_request("after"), out)
    assert isinstance(out.result(), Finished)
    assert scheduler.batch_size == 0


def test_cancelling_one_request_leaves_the_others_decoding(make, engine: ScriptedEngine) -> None:
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
    assert not first.done.is_set() and engine.removed == ["x"]
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


def test_timeouts_in_the_queue_and_in_the_batch(make, engine: ScriptedEngine) -> None:
    scheduler = make(max_batch=1, timeout=0.3)
    slow, queued = Collector(), Collector()
    scheduler.submit(_request("slow", steps=1000, sleep=0.01), slow)
    scheduler.submit(_request("queued"), queued)
    assert slow.result().error.status == 504
    assert queued.result().error.status == 504
    assert engine.removed == ["slow"]
    assert scheduler.metrics.finished["timeout"] == 2


def test_cancel_of_an_active_request_removes_it_from_the_engine(make, engine: ScriptedEngine) -> None:
    scheduler = make()
    out = Collector()
    job = scheduler.submit(_request("long", steps=10_000, sleep=0.001), out)
    deadline = time.monotonic() + WAIT
    while not out.events:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    scheduler.cancel(job)
    while "long" not in engine.removed:
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
