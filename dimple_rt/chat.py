# SPDX-License-Identifier: Apache-2.0
"""``dimple-rt chat``: a terminal chat that shows each answer unmasking.

Every turn is one :meth:`~dimple_rt.Runtime.generate` call on the whole conversation so far (Dimple has no
KV cache across turns: the history is the prompt). On a terminal the canvas is redrawn in place after every
step (the cursor goes back over the rows it drew, then clears to the end of the screen): masks as a dim ░,
the tokens this step committed in bold green, the end-of-text padding as a dim ·. Then the answer replaces the
canvas and its statistics follow. Piped (not a terminal) it prints only the answers and statistics, without
escape codes; NO_COLOR (https://no-color.org) keeps the live canvas but drops the colours.

Commands: ``/image PATH`` attaches a picture to the next message, ``/reset`` forgets the conversation,
``/quit`` (or end of input) leaves, ``/help`` lists them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import unicodedata
from collections.abc import Callable
from typing import Any, TextIO

from PIL import Image

from .processor import load_image
from .runtime import GenerationResult, Message, Runtime, StreamStep

COMMANDS = (
    "/image PATH  attach a picture to your next message\n"
    "/reset       forget the conversation\n"
    "/quit        leave (so does Ctrl-D)\n"
    "/help        this list"
)
MASK, END = "\u2591", "\u00b7"
"""How a mask and an end-of-text token look on the live canvas."""
DIM, NEW, BOLD, RESET = "\x1b[2m", "\x1b[1;32m", "\x1b[1m", "\x1b[0m"


def _width(text: str) -> int:
    """Terminal columns of one line of ``text``: East Asian wide characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def canvas_segments(
    runtime: Runtime, canvas: list[int], fresh: set[int], terminators: frozenset[int]
) -> list[tuple[str, str]]:
    """The canvas as ``(text, kind)`` runs, kind "mask", "new" (committed at this step), "done" or "end"
    (end-of-text). Tokens are decoded a run at a time, so multi-token characters and words read right."""
    mask_id = runtime.config.mask_token_id

    def kind(position: int, token: int) -> str:
        if token == mask_id:
            return "mask"
        if token in terminators:
            return "end"
        return "new" if position in fresh else "done"

    segments: list[tuple[str, str]] = []
    run: list[int] = []
    run_kind = ""
    for position, token in enumerate([*canvas, None]):
        this = "" if token is None else kind(position, token)
        if run and this != run_kind:
            if run_kind == "mask":
                text = MASK * len(run)
            elif run_kind == "end":
                text = END * len(run)
            else:
                text = runtime.tokenizer.decode(run)
            segments.append((text, run_kind))
            run = []
        if token is not None:
            run.append(token)
            run_kind = this
    return segments


class LiveCanvas:
    """Draws text in place on a terminal: each draw first erases the rows the previous one took."""

    def __init__(self, out: TextIO, colour: bool) -> None:
        self.out, self.colour, self.rows = out, colour, 0

    def _rows(self, text: str) -> int:
        columns = max(shutil.get_terminal_size().columns, 1)
        return sum(max(1, -(-_width(line) // columns)) for line in text.split("\n"))

    def draw(self, segments: list[tuple[str, str]], label: str = "") -> None:
        """Replace the last drawing with ``label`` (bold) and the segments, styled by kind."""
        styles = {"label": BOLD, "mask": DIM, "end": DIM, "new": NEW} if self.colour else {}
        segments = [(label, "label"), *segments]
        plain = "".join(text for text, _ in segments)  # what takes room on the screen: no escape codes
        shown = "".join(f"{styles[kind]}{text}{RESET}" if kind in styles else text for text, kind in segments)
        self.clear()
        self.out.write(shown)
        self.out.flush()
        self.rows = self._rows(plain)

    def clear(self) -> None:
        """Erase what the last draw wrote; the cursor ends at the start of its first row."""
        if self.rows:
            up = f"\x1b[{self.rows - 1}A" if self.rows > 1 else ""
            self.out.write(f"\r{up}\x1b[J")
            self.out.flush()
            self.rows = 0


class Chat:
    """One conversation with a loaded model: the history, the pictures waiting for the next message, the
    generation options of every turn, and where and how to show it (``live``: redraw the canvas in place)."""

    def __init__(self, runtime: Runtime, options: dict[str, Any], out: TextIO, *, live: bool, colour: bool) -> None:
        self.runtime, self.options, self.out = runtime, options, out
        self.live, self.colour = live, colour
        self.history: list[Message] = []
        self.pending: list[Image.Image] = []

    def say(self, text: str, style: str = "") -> None:
        self.out.write(f"{style}{text}{RESET}\n" if style and self.colour else f"{text}\n")
        self.out.flush()

    def attach(self, path: str) -> None:
        """Load ``path`` now (so a bad file is reported at once) and keep it for the next message."""
        if self.runtime.processor is None:
            raise ValueError("this model has no vision tower: it cannot take images")
        self.pending.append(load_image(path))

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.ask(line)
            return True
        command, _, argument = line.partition(" ")
        if command == "/quit":
            return False
        if command == "/reset":
            self.history, self.pending = [], []
            self.say("(conversation forgotten)", DIM)
        elif command == "/image" and argument.strip():
            try:
                self.attach(os.path.expanduser(argument.strip()))
            except (OSError, ValueError, TypeError) as err:
                self.say(f"error: {err}")
            else:
                self.say(f"(picture attached to your next message: {argument.strip()})", DIM)
        elif command == "/help":
            self.say(COMMANDS)
        else:
            self.say(f"unknown command {line!r}; the commands are:\n{COMMANDS}")
        return True

    def ask(self, text: str) -> GenerationResult | None:
        """One turn: the answer to ``text`` (with any attached pictures) given the history, drawn live, then
        its statistics. A failed turn (e.g. a conversation longer than the model's positions) leaves the
        history as it was and drops the attached pictures; Ctrl-C cancels the turn."""
        content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in self.pending]
        turn = {"role": "user", "content": [*content, {"type": "text", "text": text}]}
        canvas = LiveCanvas(self.out, self.colour)
        terminators = self.runtime.tokenizer.answer_terminator_ids
        label = "dimple> "

        def show(step: StreamStep) -> None:
            fresh = set(step.positions[:, 1].tolist())
            canvas.draw(canvas_segments(self.runtime, step.canvas[0].tolist(), fresh, terminators), label)

        if self.live and "template" not in self.options and "response_length" not in self.options:
            masks = [self.runtime.config.mask_token_id] * self.options.get("max_new_tokens", 64)
            canvas.draw(canvas_segments(self.runtime, masks, set(), terminators), label)
        try:
            result = self.runtime.generate([*self.history, turn], on_step=show if self.live else None, **self.options)
        except (OSError, ValueError, TypeError) as err:
            canvas.clear()
            dropped = " (the attached pictures are dropped)" if self.pending else ""
            self.pending = []
            self.say(f"error: {err}{dropped}; /reset starts a new conversation")
            return None
        except KeyboardInterrupt:
            canvas.clear()
            self.say("(cancelled)", DIM)
            return None
        canvas.clear()
        self.out.write(f"{BOLD}{label}{RESET}" if self.colour else label)
        self.say(result.text)
        self.say(f"[{result.summary()}]", DIM)
        self.history += [turn, {"role": "assistant", "content": result.text}]
        self.pending = []
        return result

    def run(self, read: Callable[[str], str]) -> int:
        """Read lines until /quit or end of input; Ctrl-C at the prompt discards the line."""
        while True:
            try:
                line = read("you> ")
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\n")
                continue
            if not self.handle(line):
                return 0


def run_chat(
    model: str,
    image: str | None,
    runtime_options: dict[str, Any],
    options: dict[str, Any],
    *,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """``dimple-rt chat``: load ``model``, attach ``image`` (if any) to the first message, and chat on ``out``
    (stdout), reading lines with ``read``. Live drawing and colour follow whether ``out`` is a terminal."""
    out = sys.stdout if out is None else out
    terminal = out.isatty()
    if terminal and read is input:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    out.write(f"loading {model} ...\n")
    out.flush()
    runtime = Runtime(model, **runtime_options)
    chat = Chat(runtime, options, out, live=terminal, colour=terminal and "NO_COLOR" not in os.environ)
    if image is not None:
        chat.attach(image)
    chat.say(f"dimple-rt chat with {runtime.path.name} ({runtime.config.model_type}).")
    chat.say(COMMANDS, DIM)
    if image is not None:
        chat.say(f"(picture attached to your first message: {image})", DIM)
    return chat.run(read)
