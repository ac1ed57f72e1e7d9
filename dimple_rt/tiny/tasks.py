# SPDX-License-Identifier: Apache-2.0
"""dimple-tiny's synthetic task suite: pictures of coloured shapes on a 3x3 grid, questions about them, and a
few text-only tasks, with answers from two tokens to about forty so that answer lengths vary widely.

Why this design: a 84x84 picture is exactly 3x3 merged vision tokens (28 px each), one per grid cell, so a
model of a few million parameters trained for minutes on two CPU cores can learn to read it; the answers are
computed from the scene, so accuracy is measurable by exact match. Everything is a pure function of a seed:
the same seed gives the same scene, question and picture on any machine. Splits are disjoint by seed range.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from dimple_rt.io import write_text
from dimple_rt.training.synthetic import paint_shape

IMAGE_SIZE = 84  # 3x3 cells of 28 px = one merged vision token each (patch 14, merge 2)
CELL = IMAGE_SIZE // 3
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 40, 180),
}
KINDS = ("circle", "square", "triangle")
# Grid cells in reading order; the names used in answers.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
WORDS = ("cat", "dog", "sun", "tree", "fish", "bird", "moon", "star", "rock", "leaf", "rain", "wind")
SPLITS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
"""First seed of each split; a split's examples use seeds ``start + index``, so the splits never share one."""

# Task kinds and how often each is drawn (out of the sum); "describe" and the list tasks give the long answers.
TASK_WEIGHTS: dict[str, int] = {
    "colour_of_kind": 3,
    "kind_at_position": 3,
    "position_of": 3,
    "count_all": 2,
    "count_colour": 2,
    "describe": 4,
    "arithmetic": 1,
    "copy_list": 1,
    "reverse_list": 1,
}
SHORT_KINDS = ("colour_of_kind", "kind_at_position", "position_of", "count_all", "count_colour", "arithmetic")


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: kind, colour and grid cell (0..8, reading order)."""

    kind: str
    colour: str
    cell: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Example:
    """One question/answer pair; ``shapes`` is the scene (empty for text-only tasks)."""

    seed: int
    task: str
    question: str
    answer: str
    shapes: tuple[Shape, ...]

    @property
    def has_image(self) -> bool:
        return bool(self.shapes)

    def image(self) -> Image.Image:
        """The scene's picture (drawn on demand; deterministic)."""
        return draw_scene(self.shapes)


def draw_scene(shapes: tuple[Shape, ...] | list[Shape]) -> Image.Image:
    """A white 84x84 picture with each shape drawn inside its 28x28 cell."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        row, col = divmod(shape.cell, 3)
        x0, y0 = col * CELL + 4, row * CELL + 4
        paint_shape(draw, shape.kind, (x0, y0, x0 + CELL - 8, y0 + CELL - 8), COLOURS[shape.colour])
    return image


def _scene(rng: random.Random) -> tuple[Shape, ...]:
    count = rng.randint(1, 4)
    cells = sorted(rng.sample(range(9), count))
    return tuple(Shape(rng.choice(KINDS), rng.choice(sorted(COLOURS)), cell) for cell in cells)


def _phrase(shape: Shape) -> str:
    preposition = "in the" if shape.position == "center" else "at the"
    return f"a {shape.colour} {shape.kind} {preposition} {shape.position}"


def describe(shapes: tuple[Shape, ...]) -> str:
    """The reference description: the count, then every shape in reading order."""
    count = len(shapes)
    head = "There is one shape" if count == 1 else f"There are {NUMBER_WORDS[count]} shapes"
    phrases = [_phrase(shape) for shape in shapes]
    body = phrases[0] if count == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{head}: {body}."


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _image_task(task: str, rng: random.Random) -> tuple[str, str, tuple[Shape, ...]] | None:
    shapes = _scene(rng)
    if task == "describe":
        return "Describe the image.", describe(shapes), shapes
    if task == "count_all":
        return "How many shapes are there?", f"{_capital(NUMBER_WORDS[len(shapes)])}.", shapes
    if task == "count_colour":
        colour = rng.choice(sorted(COLOURS))
        n = sum(shape.colour == colour for shape in shapes)
        return f"How many {colour} shapes are there?", f"{_capital(NUMBER_WORDS[n])}.", shapes
    if task == "colour_of_kind":
        kinds = [k for k in KINDS if sum(s.kind == k for s in shapes) == 1]
        if not kinds:
            return None
        kind = rng.choice(kinds)
        colour = next(s.colour for s in shapes if s.kind == kind)
        return f"What colour is the {kind}?", f"{_capital(colour)}.", shapes
    if task == "kind_at_position":
        shape = rng.choice(shapes)
        return f"What shape is at the {shape.position}?", f"A {shape.colour} {shape.kind}.", shapes
    if task == "position_of":
        unique = [s for s in shapes if sum((t.kind, t.colour) == (s.kind, s.colour) for t in shapes) == 1]
        if not unique:
            return None
        shape = rng.choice(unique)
        return f"Where is the {shape.colour} {shape.kind}?", f"{_capital(shape.position)}.", shapes
    raise ValueError(f"unknown image task {task!r}")


def _text_task(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "arithmetic":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", f"{a + b}."
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", f"{a - b}."
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 8))]
    listed = ", ".join(words)
    if task == "copy_list":
        return f"Copy the list: {listed}.", f"{listed}."
    if task == "reverse_list":
        return f"Reverse the list: {listed}.", f"{', '.join(reversed(words))}."
    raise ValueError(f"unknown text task {task!r}")


def make_example(seed: int, task: str | None = None) -> Example:
    """The example of ``seed`` (its task drawn by TASK_WEIGHTS unless given). Pure: same seed, same example."""
    rng = random.Random(f"dimple-tiny/{seed}")
    if task is None:
        task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    if task in ("arithmetic", "copy_list", "reverse_list"):
        question, answer = _text_task(task, rng)
        return Example(seed, task, question, answer, ())
    while True:  # a scene may not fit the question (no unique kind): draw another from the same stream
        made = _image_task(task, rng)
        if made is not None:
            question, answer, shapes = made
            return Example(seed, task, question, answer, shapes)


def examples(split: str, count: int, task: str | None = None) -> Iterator[Example]:
    """The first ``count`` examples of ``split`` ("train", "validation" or "test")."""
    start = SPLITS[split]
    for index in range(count):
        yield make_example(start + index, task)


def conversation(example: Example, image: object | None = None) -> list[dict]:
    """The Runtime.generate conversation of ``example`` (image first, then the question, as in training)."""
    content: list[dict] = []
    if example.has_image:
        content.append({"type": "image", "image": image if image is not None else example.image()})
    content.append({"type": "text", "text": example.question})
    return [{"role": "user", "content": content}]


def write_split(directory: str | os.PathLike, split: str, count: int) -> Path:
    """Write ``directory/<split>.jsonl`` (dimple_rt.training's format) and its pictures under ``images/``."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for example in examples(split, count):
        record: dict = {"messages": [], "images": []}
        question = example.question
        if example.has_image:
            name = f"images/{split}-{example.seed}.png"
            example.image().save(directory / name)
            record["images"].append(name)
            question = "<image>" + question  # the chat template puts text right after <|vision_end|>
        record["messages"] = [
            {"role": "user", "content": question},
            {"role": "assistant", "content": example.answer},
        ]
        record["task"] = example.task
        lines.append(json.dumps(record))
    path = directory / f"{split}.jsonl"
    write_text(path, "\n".join(lines) + "\n")
    return path


def corpus_texts(count: int = 4000) -> Iterator[str]:
    """Text the tokenizer is trained on: questions and answers of the train split."""
    for example in examples("train", count):
        yield example.question
        yield example.answer


# Evaluation ---------------------------------------------------------------------------------------------------

# Longest position names first, so that "top left" is not read as "top".
_PHRASE = re.compile(
    r"(?:a|an) ("
    + "|".join(COLOURS)
    + r") ("
    + "|".join(KINDS)
    + r") (?:at|in) the ("
    + "|".join(sorted(POSITIONS, key=len, reverse=True))
    + r")\b"
)


def parse_description(text: str) -> tuple[int | None, set[tuple[str, str, str]]]:
    """The stated count and the set of (colour, kind, position) triples a description mentions."""
    match = re.search(r"There (?:is|are) (" + "|".join(NUMBER_WORDS) + r") shape", text)
    count = NUMBER_WORDS.index(match.group(1)) if match else None
    triples = set()
    for found in _PHRASE.finditer(text):
        triples.add((found.group(1), found.group(2), found.group(3)))
    return count, triples


def is_correct(example: Example, output: str) -> bool:
    """Exact match (after stripping whitespace) for short answers and lists; for descriptions, a content match:
    the stated count and the set of (colour, kind, position) mentioned equal the scene's, in any wording."""
    output = output.strip()
    if example.task != "describe":
        return output == example.answer
    count, triples = parse_description(output)
    truth = {(s.colour, s.kind, s.position) for s in example.shapes}
    return count == len(example.shapes) and triples == truth
