# SPDX-License-Identifier: Apache-2.0
"""The step engine (continuous batching): sequences that join at different steps, with different prompts (with
and without images), canvas lengths and options, share forwards and still each decode to exactly their
``Runtime.generate`` answer, tokens and forward count, on dimple-tiny (both backends) and on a tiny random
checkpoint (whose near-uniform logits make ties and threshold misses likely: a stricter check that padding and
batch companions do not move a decision)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from dimple_rt import Runtime
from dimple_rt.generation.engine import Engine, Sequence
from dimple_rt.generation.loop import NonFiniteLogitsError
from dimple_rt.testing.tiny_checkpoint import write_tiny_checkpoint
from dimple_rt.tiny import tasks

MIXED_OPTIONS: list[dict[str, Any]] = [
    {"max_new_tokens": 16},
    {"max_new_tokens": 12, "threshold": None},
    {"max_new_tokens": 16, "temperature": 1.0, "seed": 3},
    {"max_new_tokens": 16, "alg": "origin", "threshold": None, "temperature": 0.7, "seed": 5},
    {"max_new_tokens": 8, "prefill": False, "threshold": None},
    {"max_new_tokens": 20, "alg": "topk_margin", "threshold": 0.5},
    {"max_new_tokens": 16, "pipeline": "dream", "steps": 8, "threshold": None},
    {"max_new_tokens": 16, "pipeline": "fast_dllm", "block_length": 4, "threshold": 0.9},
    {"max_new_tokens": 16, "pipeline": "fast_dllm", "cache": "dual", "block_length": 8, "threshold": 0.9},
    {"max_new_tokens": 12, "alg": "entropy", "threshold": None},
    {"max_new_tokens": 16, "temperature": 0.5, "top_p": 0.9, "seed": 11, "threshold": None},
    {"max_new_tokens": 24, "alg": "origin-ratio", "threshold": None, "seed": 2},
]


@pytest.fixture(scope="module")
def tiny() -> Runtime:
    return Runtime("dimple-tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def random_rt(checkpoint: Path) -> Runtime:
    return Runtime(checkpoint)


@pytest.fixture(scope="module", params=["kernels", "reference"])
def random_any(checkpoint: Path, request: pytest.FixtureRequest) -> Runtime:
    return Runtime(checkpoint, backend=request.param)


def _tiny_conversations(count: int) -> list[list[dict]]:
    """dimple-tiny's test questions, with their pictures or as text only, in turn."""
    found = []
    for example in tasks.examples("test", 10_000):
        if example.has_image == (len(found) % 2 == 0):
            image = example.image() if example.has_image else None
            found.append(
                tasks.conversation(example, image) if image else [{"role": "user", "content": example.question}]
            )
        if len(found) == count:
            return found
    raise AssertionError("too few test examples")


def _random_conversations(count: int) -> list[list[dict]]:
    """Prompts of many lengths, every other one with a picture of one of three sizes."""
    texts = ["Hi", "What colour is the big circle in the picture?", "a b c d e f g h i j k l m n o p"]
    conversations = []
    for i in range(count):
        content: list[dict] = []
        if i % 2:
            image = Image.new("RGB", (56 + 28 * (i % 3), 56), "white")
            ImageDraw.Draw(image).ellipse((5, 5, 40, 40), fill=(200, 20, 20))
            content.append({"type": "image", "image": image})
        content.append({"type": "text", "text": texts[i % 3] * (1 + i // 3)})
        conversations.append([{"role": "user", "content": content}])
    return conversations


def _run(
    runtime: Runtime, conversations: list, options: list[dict[str, Any]], join_per_step: int, **hooks: Any
) -> tuple[Engine, list[Sequence], list[list[tuple[str, int, tuple[int, ...]]]]]:
    """Feed the requests in order, ``join_per_step`` at each step boundary, and step until all are done.
    Returns the engine, the sequences and per step its forwards as (kind, rows, the step indices of the
    sequences in that step's ``cached`` forward)."""
    engine = Engine(runtime.model, runtime.backend)
    sequences: list[Sequence] = []
    log = []
    pending = list(range(len(conversations)))
    while pending or engine.sequences:
        for k in pending[:join_per_step]:
            request, config = runtime.decode_request(conversations[k], **options[k])
            sequences.append(engine.add(request, config, tag=k, **hooks.get(k, {})))
        del pending[:join_per_step]
        stepped = engine.step()
        cached = tuple(sorted(s.last_step.step for s in stepped if _was_cached(s)))
        log.append([(f.kind, f.rows, cached) for f in engine.forwards])
    return engine, sequences, log


def _was_cached(sequence: Sequence) -> bool:
    """Whether the sequence's last step was a ``cached`` forward (a prefilling sequence past its first step)."""
    state, step = sequence.state, sequence.last_step
    return state is not None and state.options.prefill and step is not None and step.step >= 1


def _check_single_answers(runtime: Runtime, conversations: list, options: list, sequences: list[Sequence]) -> None:
    for sequence in sequences:
        k = sequence.tag
        alone = runtime.generate(conversations[k], **options[k])
        assert sequence.error is None and sequence.finished, k
        assert sequence.canvas.tolist() == alone.sequences[0, sequence.prompt_len :].tolist(), (k, options[k])
        assert sequence.forwards == alone.num_forward_passes, (k, options[k])


def test_joining_sequences_equal_their_single_answers(tiny: Runtime) -> None:
    """Twelve requests, two joining per step, every pipeline and many options, pictures and text: each canvas
    and forward count equals the request decoded alone, and the sequences shared forwards."""
    conversations = _tiny_conversations(len(MIXED_OPTIONS))
    engine, sequences, log = _run(tiny, conversations, MIXED_OPTIONS, join_per_step=2)
    _check_single_answers(tiny, conversations, MIXED_OPTIONS, sequences)
    assert engine.sequences == []
    assert engine.total_forwards < sum(s.forwards for s in sequences)
    cached = [(rows, steps) for forwards in log for kind, rows, steps in forwards if kind == "cached"]
    assert max(rows for rows, _ in cached) >= 4
    assert any(len(set(steps)) >= 3 for _, steps in cached)  # rows at 3 different steps in one forward


def test_random_checkpoint_many_steps(random_any: Runtime) -> None:
    """No threshold (one or a few tokens per step, so many steps), prompts of 6 lengths: exact canvases, on
    both backends."""
    conversations = _random_conversations(9)
    base: list[dict[str, Any]] = [
        {"threshold": None},
        {"threshold": None, "temperature": 1.0, "seed": 3},
        {"threshold": None, "alg": "origin", "temperature": 0.8, "seed": 4},
        {"threshold": None, "alg": "topk_margin"},
        {"threshold": None, "prefill": False},
        {"threshold": None, "alg": "entropy", "steps": 6},
    ]
    options = [{"max_new_tokens": 8 + 4 * (i % 3), **base[i % len(base)]} for i in range(len(conversations))]
    engine, sequences, _ = _run(random_any, conversations, options, join_per_step=3)
    _check_single_answers(random_any, conversations, options, sequences)
    assert engine.total_forwards < sum(s.forwards for s in sequences)


def test_steady_state_runs_one_forward_per_step(random_rt: Runtime) -> None:
    """Prefilling sequences: one forward per step, plus one at the steps where newcomers join."""
    conversations = _random_conversations(4)
    options = [{"max_new_tokens": 12, "threshold": None}] * 4
    engine = Engine(random_rt.model, random_rt.backend)
    joins = {0: [0, 1], 2: [2], 5: [3]}
    kinds_per_step = []
    for step in range(40):
        for k in joins.get(step, []):
            engine.add(*random_rt.decode_request(conversations[k], **options[k]), tag=k)
        if not engine.sequences:
            break
        engine.step()
        kinds_per_step.append([f.kind for f in engine.forwards])
    assert kinds_per_step[0] == ["prefill"]
    assert kinds_per_step[1] == ["cached"]
    assert kinds_per_step[2] == ["prefill", "cached"]
    assert kinds_per_step[5] == ["prefill", "cached"]
    assert all(kinds == ["cached"] for kinds in kinds_per_step[6:])


def test_removed_and_failed_sequences_leave_the_others_exact(random_rt: Runtime) -> None:
    """One sequence is removed mid-decode, one fails (its logits hook makes NaN): the others are untouched."""
    conversations = _random_conversations(4)
    options: list[dict[str, Any]] = [{"max_new_tokens": 12, "threshold": None}] * 4

    def poison(step: int, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits * float("nan") if step == 2 else logits

    engine = Engine(random_rt.model, random_rt.backend)
    sequences = []
    for k in range(4):
        hooks = {"logits_hook": poison} if k == 1 else {}
        sequences.append(engine.add(*random_rt.decode_request(conversations[k], **options[k]), tag=k, **hooks))
    engine.step()
    engine.step()
    engine.remove(sequences[2])
    while engine.sequences:
        engine.step()
    assert isinstance(sequences[1].error, NonFiniteLogitsError) and sequences[1].forwards == 2
    assert not sequences[2].done and sequences[2] not in engine.sequences
    _check_single_answers(random_rt, conversations, options, [sequences[0], sequences[3]])


def test_add_refuses_bad_input(random_rt: Runtime) -> None:
    engine = Engine(random_rt.model, random_rt.backend)
    request, config = random_rt.decode_request(["one", "two"], max_new_tokens=4)
    with pytest.raises(ValueError, match="one sequence"):
        engine.add(request, config)
    request, config = random_rt.decode_request("x", max_new_tokens=4)
    ids = request.input_ids.clone()
    ids[0, -1] = random_rt.config.mask_token_id
    with pytest.raises(ValueError, match=re.escape("<|mask|>")):
        engine.add(dataclasses.replace(request, input_ids=ids), config)
    assert engine.sequences == []
