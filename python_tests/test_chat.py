# SPDX-License-Identifier: Apache-2.0
"""``dimple-rt chat``: one exchange under a pseudo-terminal (the canvas drawn live, the answer and its stats,
/quit exits 0), and the session's commands, history and in-place redrawing in process."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dimple_rt
from dimple_rt.chat import MASK, Chat, LiveCanvas, run_chat
from dimple_rt.tiny import tasks

OPTIONS = {"max_new_tokens": 8, "threshold": None}  # one token per step: the canvas unmasks over several steps
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def rt() -> dimple_rt.Runtime:
    return dimple_rt.Runtime("dimple-tiny")


@pytest.fixture(scope="module")
def example() -> tasks.Example:
    return next(e for e in tasks.examples("test", 1000) if e.task == "colour_of_kind")


def _turn(question: str, image: object | None = None) -> dict:
    content = [] if image is None else [{"type": "image", "image": image}]
    return {"role": "user", "content": [*content, {"type": "text", "text": question}]}


class _Terminal:
    """A child process on a pseudo-terminal, and everything it has written."""

    def __init__(self, command: list[str], cwd: str, env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env)
        os.close(slave)
        self.output = b""

    def read_until(self, marker: bytes, start: int = 0, seconds: float = 180.0) -> str:
        """Read until ``marker`` appears after offset ``start`` (or the child closes the terminal)."""
        deadline = time.monotonic() + seconds
        while marker not in self.output[start:]:
            assert time.monotonic() < deadline, f"no {marker!r} within {seconds} s; got {self.output!r}"
            ready, _, _ = select.select([self.master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                self.output += chunk
        return self.output.decode("utf-8", "replace")

    def write(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        os.close(self.master)


def test_one_exchange_under_a_pseudo_terminal(rt: dimple_rt.Runtime, example: tasks.Example, tmp_path: Path) -> None:
    picture = tmp_path / "scene.png"
    example.image().save(picture)
    expected = rt.generate([_turn(example.question, str(picture))], **OPTIONS)
    # The installed package when the suite runs against it (python -P), else this checkout: run from the folder
    # that holds the imported dimple_rt.
    root = str(Path(dimple_rt.__file__).resolve().parent.parent)
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    env.update(PYTHONPATH=root, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "dimple_rt.cli", "chat", "dimple-tiny", "--max-new-tokens", "8"]
    terminal = _Terminal([*command, "--threshold", "none"], cwd=root, env=env)
    try:
        terminal.read_until(b"you> ")
        terminal.write(f"/image {picture}")
        terminal.read_until(b"attached")
        start = len(terminal.output)
        terminal.write(example.question)
        shown = terminal.read_until(b"tokens/s]", start)[start:]
        terminal.write("/quit")
        terminal.read_until(b"\x00 never written: read to the end")
        assert terminal.process.wait(30) == 0
    finally:
        terminal.close()
    assert MASK in shown and "\x1b[J" in shown  # the canvas was drawn with masks and redrawn in place
    plain = ANSI.sub("", shown)
    assert f"dimple> {expected.text}\r\n" in plain
    assert f"{expected.stats.forward_passes} forward passes at" in plain and "finish: stop" in plain


def test_commands_history_and_pictures(rt: dimple_rt.Runtime, example: tasks.Example, tmp_path: Path) -> None:
    picture = tmp_path / "scene.png"
    example.image().save(picture)
    out = io.StringIO()
    chat = Chat(rt, OPTIONS, out, live=False, colour=False)
    assert chat.handle(f"/image {tmp_path / 'missing.png'}") and "no such file" in out.getvalue()
    assert chat.pending == []
    chat.handle(f"/image {picture}")
    assert len(chat.pending) == 1
    first = chat.ask(example.question)
    assert first is not None and chat.pending == [] and len(chat.history) == 2
    assert first.token_ids == rt.generate([_turn(example.question, str(picture))], **OPTIONS).token_ids
    second = chat.ask("And the square?")
    conversation = [*chat.history[:2], _turn("And the square?")]
    assert second is not None and second.token_ids == rt.generate(conversation, **OPTIONS).token_ids
    assert len(chat.history) == 4 and chat.history[3] == {"role": "assistant", "content": second.text}
    text = out.getvalue()
    assert f"dimple> {first.text}\n" in text and f"dimple> {second.text}\n" in text
    assert "\x1b" not in text and MASK not in text  # not a terminal: no live canvas, no escape codes
    chat.handle("/reset")
    assert chat.history == [] and chat.pending == []
    assert chat.handle("/frobnicate") and "unknown command '/frobnicate'" in out.getvalue()
    assert chat.handle("") and not chat.handle("/quit")


def test_a_failed_turn_keeps_the_history(rt: dimple_rt.Runtime) -> None:
    out = io.StringIO()
    chat = Chat(rt, {"max_new_tokens": 8192}, out, live=False, colour=False)  # longer than dimple-tiny's positions
    assert chat.ask("Hi") is None and chat.history == []
    assert "error: " in out.getvalue() and "max_position_embeddings" in out.getvalue()


def test_run_chat_reads_until_end_of_input(example: tasks.Example, tmp_path: Path) -> None:
    picture = tmp_path / "scene.png"
    example.image().save(picture)
    lines = iter([example.question, "/help"])

    def read(prompt: str) -> str:
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line

    out = io.StringIO()
    assert run_chat("dimple-tiny", str(picture), {}, OPTIONS, read=read, out=out) == 0
    text = out.getvalue()
    assert "picture attached to your first message" in text and "/reset" in text and "tokens/s]" in text
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_chat("dimple-tiny", str(tmp_path / "missing.png"), {}, OPTIONS, read=read, out=io.StringIO())


def test_live_canvas_erases_the_rows_it_drew(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "10")
    out = io.StringIO()
    canvas = LiveCanvas(out, colour=False)
    canvas.draw([("x" * 25, "done")])  # 3 rows of 10 columns
    assert canvas.rows == 3
    canvas.draw([("ab", "new"), ("\u2591" * 3, "mask")], label="> ")
    assert out.getvalue() == "x" * 25 + "\r\x1b[2A\x1b[J" + "> ab\u2591\u2591\u2591"
    canvas.clear()
    assert out.getvalue().endswith("\r\x1b[J") and canvas.rows == 0
    # In colour the escape codes take no room: "dimple> " + 3 characters is 11 columns, 2 rows.
    coloured = LiveCanvas(io.StringIO(), colour=True)
    coloured.draw([("abc", "new")], label="dimple> ")
    assert coloured.rows == 2 and "\x1b[1;32mabc\x1b[0m" in coloured.out.getvalue()
    coloured.draw([("\u4e2d\u6587", "done")], label="")  # two wide characters: 4 columns
    assert coloured.rows == 1
