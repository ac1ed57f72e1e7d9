# SPDX-License-Identifier: Apache-2.0
"""Decoding visualisation: a recorded trace is the generation itself (same answer, every step, each step's
commits), the GIF has one frame per step, and the HTML page parses and embeds every step."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

import dimple_rt
from dimple_rt import visualize
from dimple_rt.tiny import tasks

OPTIONS = {"max_new_tokens": 16, "threshold": None}  # one token per step: 16 steps, some of them cheap


@pytest.fixture(scope="module")
def rt() -> dimple_rt.Runtime:
    return dimple_rt.Runtime("dimple-tiny")


@pytest.fixture(scope="module")
def trace(rt: dimple_rt.Runtime) -> visualize.Trace:
    example = next(e for e in tasks.examples("test", 1000) if e.task == "describe")
    return visualize.record(rt, tasks.conversation(example), **OPTIONS)


def test_the_trace_is_the_generation(rt: dimple_rt.Runtime, trace: visualize.Trace) -> None:
    example = next(e for e in tasks.examples("test", 1000) if e.task == "describe")
    plain = rt.generate(tasks.conversation(example), **OPTIONS)
    assert trace.result.token_ids == plain.token_ids and trace.result.text == plain.text
    assert len(trace.steps) == plain.num_forward_passes > 1
    mask = trace.mask_token_id
    before = [mask] * OPTIONS["max_new_tokens"]
    for step in trace.steps:
        filled = [p for p, (a, b) in enumerate(zip(before, step.canvas)) if a == mask and b != mask]
        assert step.committed == filled
        assert len(step.confidences) == len(filled) and all(0 < c <= 1 for c in step.confidences)
        assert all(token in trace.pieces for token in step.canvas)
        before = step.canvas
    assert trace.pieces[mask] == "<|mask|>"
    assert rt.tokenizer.answer_ids(trace.steps[-1].canvas) == plain.token_ids


def test_gif_has_one_frame_per_step(trace: visualize.Trace, tmp_path: Path) -> None:
    path = visualize.write(trace, tmp_path / "trace.gif")
    with Image.open(path) as image:
        assert image.format == "GIF" and image.n_frames == len(trace.steps)
        image.seek(0)
        first = image.convert("RGB")
        image.seek(image.n_frames - 1)
        last = image.convert("RGB")
    # The first frame still shows masks (their fill colour), the last one none.
    assert visualize.MASK_FILL in {colour for _, colour in first.getcolors(1 << 16)}
    assert visualize.MASK_FILL not in {colour for _, colour in last.getcolors(1 << 16)}
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left


class _Page(HTMLParser):
    """Collects the embedded trace and the ids of the page's elements."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.external: list[str] = []
        self.trace = ""
        self._in_trace = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        if values.get("src") or (tag == "link" and values.get("href")):
            self.external.append(values.get("src") or values["href"])
        self._in_trace = tag == "script" and values.get("id") == "trace"

    def handle_endtag(self, tag: str) -> None:
        self._in_trace = False

    def handle_data(self, data: str) -> None:
        if self._in_trace:
            self.trace += data


def test_html_parses_and_holds_every_step(trace: visualize.Trace, tmp_path: Path) -> None:
    path = visualize.write(trace, tmp_path / "trace.html")
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert {"trace", "step", "canvas", "play"} <= page.ids and page.external == []  # self-contained
    data = json.loads(page.trace)
    assert len(data["steps"]) == len(trace.steps)
    for embedded, step in zip(data["steps"], trace.steps):
        assert embedded == {
            "step": step.step,
            "canvas": step.canvas,
            "committed": step.committed,
            "confidences": step.confidences,
        }
    assert data["text"] == trace.result.text and data["mask"] == trace.mask_token_id
    assert {int(k) for k in data["pieces"]} == set(trace.pieces)


def test_text_cannot_break_out_of_the_script(trace: visualize.Trace, tmp_path: Path) -> None:
    """A token whose text closes the script element stays data: the page still parses to the same trace."""
    hostile = visualize.Trace(
        trace.steps, {**trace.pieces, trace.steps[-1].canvas[0]: "</script><b>&amp;"}, trace.mask_token_id,
        trace.terminator_ids, trace.result,
    )  # fmt: skip
    page = _Page()
    page.feed(visualize.write_html(hostile, tmp_path / "hostile.html").read_text(encoding="utf-8"))
    assert json.loads(page.trace)["pieces"][str(trace.steps[-1].canvas[0])] == "</script><b>&amp;"


def test_bad_requests(rt: dimple_rt.Runtime, trace: visualize.Trace, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.gif or \.html"):
        visualize.write(trace, tmp_path / "trace.png")
    with pytest.raises(ValueError, match="batch of 2"):
        visualize.record(rt, ["What is 2 plus 3?", "What is 1 plus 1?"], max_new_tokens=4)
    with pytest.raises(FileNotFoundError, match="cannot write"):
        visualize.write(trace, tmp_path / "missing" / "trace.gif")
