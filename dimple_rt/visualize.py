# SPDX-License-Identifier: Apache-2.0
"""Decoding visualisation: what every denoising step committed, and how sure the model was of each token.

A diffusion answer does not grow left to right: the canvas starts as masks and each step commits some of them,
anywhere. :func:`record` runs :meth:`~dimple_rt.Runtime.generate` with an ``on_step`` observer and keeps, per
step, the canvas and the positions committed with the probability the step's logits gave each token (taken
from the step loop as it decides, so recording changes no decision). :func:`write_gif` draws one frame per
step with Pillow; :func:`write_html` writes one self-contained page (no external assets) with a step slider
and the trace embedded as JSON. Both write atomically (:mod:`dimple_rt.io`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from .io import write_bytes, write_text

if TYPE_CHECKING:
    from .runtime import GenerationResult, Prompt, Runtime, StreamStep

FORMATS = (".gif", ".html")
"""File suffixes :func:`write` understands."""


@dataclass
class TraceStep:
    """One step: the canvas after it (token ids), the canvas positions it committed and each one's confidence
    (the probability the step's logits gave the committed token)."""

    step: int
    canvas: list[int]
    committed: list[int]
    confidences: list[float]


@dataclass
class Trace:
    """A recorded generation: its steps, the text of every token id that appears (``pieces``), which ids are
    the mask and the answer terminators, and the result with its stats."""

    steps: list[TraceStep]
    pieces: dict[int, str]
    mask_token_id: int
    terminator_ids: list[int]
    result: GenerationResult

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the HTML page embeds)."""
        return {
            "mask": self.mask_token_id,
            "terminators": self.terminator_ids,
            "pieces": {str(token): text for token, text in self.pieces.items()},
            "steps": [dataclasses.asdict(step) for step in self.steps],
            "text": self.result.text,
            "finish_reason": self.result.finish_reason,
            "stats": dataclasses.asdict(self.result.stats),
        }


def record(runtime: Runtime, inputs: Prompt, **options: Any) -> Trace:
    """Generate an answer to one prompt or conversation (``options`` as :meth:`Runtime.generate`'s) and keep
    every step. A batch is refused: a trace shows one canvas."""
    steps: list[TraceStep] = []

    def observe(step: StreamStep) -> None:
        if step.canvas.shape[0] != 1:
            raise ValueError(f"record traces one prompt or conversation, got a batch of {step.canvas.shape[0]}")
        steps.append(
            TraceStep(step.step, step.canvas[0].tolist(), step.positions[:, 1].tolist(), step.confidences.tolist())
        )

    result = runtime.generate(inputs, on_step=observe, **options)
    if isinstance(result, list):  # pre-tokenised inputs of one row come back as a batch of one
        result = result[0]
    tokenizer = runtime.tokenizer
    ids = sorted({token for step in steps for token in step.canvas})
    pieces = {token: tokenizer.decode([token]) for token in ids}
    mask_id = runtime.config.mask_token_id
    return Trace(steps, pieces, mask_id, sorted(tokenizer.answer_terminator_ids), result)


def write(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` as a GIF or an HTML page, by the suffix of ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        return write_gif(trace, path)
    if suffix == ".html":
        return write_html(trace, path)
    raise ValueError(f"a visualisation is written as {' or '.join(FORMATS)}, got {str(path)!r}")


# GIF --------------------------------------------------------------------------------------------------------------

COLUMNS = 12
"""Canvas positions per row of a frame."""
CELL_W, CELL_H, GAP, MARGIN, HEADER = 70, 30, 2, 8, 22
BACKGROUND, INK, FAINT = (255, 255, 255), (20, 20, 20), (120, 120, 120)
MASK_FILL, DONE_FILL = (205, 205, 215), (242, 242, 242)
LOW, HIGH = (255, 236, 179), (27, 158, 90)
"""A new commit's fill runs from LOW (confidence 0) to HIGH (confidence 1)."""
FRAME_MS, LAST_FRAME_MS = 400, 2500


def _shade(confidence: float) -> tuple[int, int, int]:
    t = min(max(confidence, 0.0), 1.0)
    return tuple(round(a + (b - a) * t) for a, b in zip(LOW, HIGH))  # type: ignore[return-value]


def _label(trace: Trace, token: int) -> str:
    """A token as a cell shows it: terminators as <end>, whitespace visible."""
    if token in trace.terminator_ids:
        return "<end>"
    text = trace.pieces[token].replace("\n", "\\n").replace("\t", "\\t")
    return text.replace(" ", "\u00b7") if text.strip() == "" else text.strip()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels; characters the font cannot encode become '?'."""
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow's bitmap font is latin-1 only
        text = text.encode("latin-1", "replace").decode("latin-1")
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _frame(trace: Trace, index: int, font: Any) -> Image.Image:
    step = trace.steps[index]
    rows = -(-len(step.canvas) // COLUMNS)
    width = 2 * MARGIN + COLUMNS * (CELL_W + GAP) - GAP
    height = 2 * MARGIN + HEADER + rows * (CELL_H + GAP) - GAP
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    masks = step.canvas.count(trace.mask_token_id)
    header = (
        f"step {index + 1}/{len(trace.steps)}: {len(step.committed)} committed, {masks} masks left"
        "   (new: pale = unsure, green = sure)"
    )
    draw.text((MARGIN, MARGIN), _fit(draw, header, font, width - 2 * MARGIN), fill=INK, font=font)
    new = dict(zip(step.committed, step.confidences))
    for position, token in enumerate(step.canvas):
        row, column = divmod(position, COLUMNS)
        x0 = MARGIN + column * (CELL_W + GAP)
        y0 = MARGIN + HEADER + row * (CELL_H + GAP)
        box = (x0, y0, x0 + CELL_W - 1, y0 + CELL_H - 1)
        if token == trace.mask_token_id:
            draw.rectangle(box, fill=MASK_FILL)
            draw.line((x0 + 4, y0 + CELL_H - 5, x0 + CELL_W - 5, y0 + 4), fill=(185, 185, 195))
            continue
        confidence = new.get(position)
        draw.rectangle(box, fill=DONE_FILL if confidence is None else _shade(confidence))
        text_ink = BACKGROUND if confidence is not None and confidence > 0.6 else INK
        draw.text((x0 + 3, y0 + 2), _fit(draw, _label(trace, token), font, CELL_W - 6), fill=text_ink, font=font)
        if confidence is not None:
            draw.text((x0 + 3, y0 + CELL_H - 13), f"{confidence:.2f}", fill=text_ink, font=font)
        elif token in trace.terminator_ids:
            draw.rectangle(box, outline=FAINT)
    return image


def write_gif(trace: Trace, path: str | os.PathLike) -> Path:
    """An animated GIF of ``trace``, one frame per step (the last one held longer): masks hatched grey,
    earlier commits light grey, this step's commits shaded by confidence and labelled with it."""
    if not trace.steps:
        raise ValueError("the trace has no steps to draw")
    font = ImageFont.load_default()
    frames = [_frame(trace, index, font) for index in range(len(trace.steps))]
    durations = [FRAME_MS] * (len(frames) - 1) + [LAST_FRAME_MS]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return write_bytes(path, buffer.getvalue())


# HTML -------------------------------------------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dimple_rt decoding trace</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
#canvas { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 2; }
#canvas span { padding: 0.1em 0.05em; border-radius: 3px; }
.mask { color: #aab; background: #e4e4ec; }
.end { color: #999; }
.new { color: #fff; }
#controls { display: flex; gap: 1em; align-items: center; margin: 1em 0; }
#step { flex: 1; }
.stats { color: #555; }
</style>
</head>
<body>
<h1>Decoding trace</h1>
<p>Every denoising step commits some masked positions (grey) of the canvas, anywhere in it. Positions committed
at the shown step are shaded by the model's confidence in the token (pale: unsure, green: sure; hover for the
value).</p>
<div id="controls"><button id="play">play</button>
<input id="step" type="range" min="0" max="0" value="0" aria-label="step"><span id="label"></span></div>
<div id="canvas"></div>
<p>Answer: <b id="answer"></b></p>
<p class="stats" id="stats"></p>
<script type="application/json" id="trace">__TRACE__</script>
<script>
const data = JSON.parse(document.getElementById("trace").textContent);
const slider = document.getElementById("step"), label = document.getElementById("label");
const canvas = document.getElementById("canvas"), play = document.getElementById("play");
const terminators = new Set(data.terminators);
slider.max = data.steps.length - 1;
function shade(c) {
  const lo = [255, 236, 179], hi = [27, 158, 90];
  return "rgb(" + lo.map((a, i) => Math.round(a + (hi[i] - a) * c)).join(",") + ")";
}
function show(i) {
  const step = data.steps[i], fresh = new Map(step.committed.map((p, k) => [p, step.confidences[k]]));
  const cells = step.canvas.map((id, p) => {
    const cell = document.createElement("span");
    if (id === data.mask) { cell.className = "mask"; cell.textContent = "\\u2591"; return cell; }
    cell.textContent = terminators.has(id) ? "\\u00b7" : data.pieces[id];
    if (terminators.has(id)) cell.className = "end";
    if (fresh.has(p)) {
      const c = fresh.get(p);
      cell.className = c > 0.6 ? "new" : "";
      cell.style.background = shade(c);
      cell.title = "position " + p + ", confidence " + c.toFixed(3);
    }
    return cell;
  });
  canvas.replaceChildren(...cells);
  const left = step.canvas.filter((id) => id === data.mask).length;
  label.textContent = "step " + (i + 1) + "/" + data.steps.length + ": " + step.committed.length +
    " committed, " + left + " masks left";
}
let timer = null;
play.onclick = () => {
  if (timer) { clearInterval(timer); timer = null; play.textContent = "play"; return; }
  if (+slider.value === data.steps.length - 1) slider.value = 0;
  play.textContent = "pause"; show(+slider.value);
  timer = setInterval(() => {
    if (+slider.value >= data.steps.length - 1) { play.onclick(); return; }
    slider.value = +slider.value + 1; show(+slider.value);
  }, 400);
};
slider.oninput = () => show(+slider.value);
document.getElementById("answer").textContent = data.text;
const s = data.stats;
document.getElementById("stats").textContent = s.answer_tokens + " tokens (" + data.finish_reason + ") in " +
  s.total_seconds.toFixed(2) + " s, " + s.forward_passes + " forward passes, " +
  (1000 * s.seconds_per_forward).toFixed(1) + " ms per forward, vision " + (1000 * s.vision_seconds).toFixed(1) +
  " ms, " + s.tokens_per_second.toFixed(1) + " tokens/s";
show(0);
</script>
</body>
</html>
"""


def _script_json(data: Any) -> str:
    """JSON that cannot end its <script> element early: <, > and & escaped as JSON unicode escapes."""
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def write_html(trace: Trace, path: str | os.PathLike) -> Path:
    """A self-contained HTML page of ``trace``: a step slider (and a play button) over the canvas, this step's
    commits shaded by confidence; the trace is embedded as JSON in ``<script id="trace">``."""
    if not trace.steps:
        raise ValueError("the trace has no steps to show")
    return write_text(path, _PAGE.replace("__TRACE__", _script_json(trace.to_dict())))
