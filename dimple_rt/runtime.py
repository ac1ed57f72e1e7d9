# SPDX-License-Identifier: Apache-2.0
"""Runtime: owns the model, tokenizer, image processor, device and backend of one checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backend import BACKENDS, Backend, backend_for
from .config import MAX_NEW_TOKENS, DimpleConfig, GenerationConfig, check_int
from .generation.loop import DecodeRequest, LogitsHook, Step, TokensHook, denoise
from .generation.priors import build_canvas, parse_template
from .model.dimple import DimpleModel
from .model.layers import cpu_has_bf16_gemm
from .model.packed import pack_after_file, pack_bf16_model
from .model.quant import check_quantize, quantize_after_file, quantize_model
from .presets import Preset, options_over_preset, preset_named
from .processor import VIDEO_INPUT_KEYS, ImageProcessor, check_no_video, expand_image_placeholder_ids
from .tokenizer import DimpleTokenizer
from .weights import load_state_dict_into, resolve_dtype, resolve_model

Message = dict[str, Any]
Prompt = str | Sequence[Message] | Sequence[str | Sequence[Message]]
MODEL_INPUT_FIELDS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


@dataclass
class ModelInputs:
    """Exactly what the authors' processor returns: input_ids and attention_mask (batch, len), left padded;
    pixel_values (patches, patch_dim) and image_grid_thw (images, 3), or None without images."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


def _images_of(messages: Sequence[Message]) -> list[Any]:
    """Image items of a conversation in order: ``{"type": "image", "image": ...}`` (or an ``image`` key).
    Video items raise NotImplementedError: neither we nor the authors' code implement video."""
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and (item.get("type") == "video" or "video" in item):
                    raise NotImplementedError("video items are not supported (Dimple has no video projector)")
                if isinstance(item, dict) and (item.get("type") == "image" or "image" in item):
                    if "image" not in item:
                        raise ValueError(f"image item without an 'image' field: {item!r}")
                    found.append(item["image"])
    return found


def _is_batch(conversations: Prompt) -> bool:
    """A list of conversations or of prompt strings is a batch; a string or a list of messages is one input."""
    return not isinstance(conversations, str) and bool(conversations) and not isinstance(conversations[0], dict)


def _as_batch(conversations: Prompt) -> list[list[Message]]:
    """Conversations of a prompt string, one conversation, or a batch of either."""
    items = list(conversations) if _is_batch(conversations) else [conversations]  # type: ignore[list-item]
    return [[{"role": "user", "content": item}] if isinstance(item, str) else list(item) for item in items]


@dataclass
class RunStats:
    """Where one generate call's time went, for one row. A batch shares its seconds (its rows run together).

    total_seconds: the whole call (templating, image preprocessing, vision tower, steps, detokenising);
    vision_seconds: the vision tower (0 without images); decode_seconds: the step loop (forwards and decisions);
    seconds_per_forward: decode_seconds over the batch's forwards; forward_passes: the steps this row needed,
    up to and including the one that left its canvas without a mask (the batch's count if none did);
    answer_tokens / canvas_tokens: the answer's length and the canvas's; tokens_per_second: answer tokens over
    total_seconds.
    """

    total_seconds: float
    vision_seconds: float
    decode_seconds: float
    seconds_per_forward: float
    forward_passes: int
    answer_tokens: int
    canvas_tokens: int
    tokens_per_second: float


@dataclass
class GenerationResult:
    """The outcome for one input of :meth:`Runtime.generate`.

    text: the answer, cut at the first ``<|endoftext|>``/``<|im_end|>``; token_ids: its ids; sequences:
    (1, prompt_len + max_new_tokens) prompt (with the batch's left padding) and canvas, as the authors return
    them; num_forward_passes: steps executed for the batch; finish_reason: "stop" when the answer ended with a
    terminator, "length" when it filled the canvas (OpenAI's names); stats: timings and counts
    (:class:`RunStats`); history: the sequences after every step, if asked.
    """

    text: str
    token_ids: list[int]
    sequences: torch.Tensor
    num_forward_passes: int
    finish_reason: str
    stats: RunStats
    history: list[torch.Tensor] | None = None

    def summary(self) -> str:
        """The stats in one line, for people (the CLI and the chat print it after the answer)."""
        s = self.stats
        tokens = f"{s.answer_tokens} token{'' if s.answer_tokens == 1 else 's'}"
        passes = f"{s.forward_passes} forward pass{'' if s.forward_passes == 1 else 'es'}"
        return (
            f"{tokens} (finish: {self.finish_reason}) in {s.total_seconds:.2f} s "
            f"(vision {s.vision_seconds:.3f} s), {passes} at "
            f"{1000 * s.seconds_per_forward:.1f} ms, {s.tokens_per_second:.1f} tokens/s"
        )


class Runtime:
    """A loaded Dimple checkpoint.

    ``model`` is an alias (``"dimple-7b"``), a folder in Hugging Face layout, or a repo id found in the
    local Hugging Face cache. ``dtype`` (a torch dtype, a name such as "bfloat16", or "auto": the checkpoint's
    stored dtype) defaults to fp32 on CPU; ``backend`` is ``"kernels"`` (the C++/CUDA
    ops) or ``"reference"`` (plain torch); ``self.backend`` holds the chosen :class:`~dimple_rt.backend.Backend`.
    A bf16 model on a CPU with bf16 dot products gets its decoder and LM-head weights prepacked for oneDNN
    (:mod:`dimple_rt.model.packed`: the same outputs, faster for few-token steps). Either makes
    ``self.model`` inference-only. ``quantize="int8"`` (CPU, fp32/bf16) quantizes the decoder's linears and the LM head after loading: int8
    weights per output channel, int8 activations per token (:mod:`dimple_rt.model.quant`); inference only.
    ``preset`` ("exact" or "fast", :mod:`dimple_rt.presets`) sets the quantization (on CPU, unless
    ``quantize`` is given) and the decoding options every call starts from; "fast" is int8 + Fast-dLLM's dual
    cache in blocks of 8, and is not the authors' tokens (see :data:`dimple_rt.presets.FAST`).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str = "kernels",
        quantize: str | None = None,
        preset: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.preset: Preset | None = preset_named(preset)
        self.device = torch.device(device if device is not None else "cpu")
        if quantize is None and self.preset is not None and self.device.type == "cpu":
            quantize = self.preset.quantize
        self.backend: Backend = backend_for(backend)
        self.path: Path = resolve_model(model)
        self.dtype: torch.dtype = resolve_dtype(dtype, self.path) or torch.float32
        check_quantize(quantize, self.dtype, self.device)
        self.quantize = quantize
        self.config = DimpleConfig.from_json_file(self.path / "config.json")
        with torch.device("meta"):
            self.model = DimpleModel(self.config)
        # int8 or packed bf16 (same outputs as F.linear, without its per-call weight reorder) are made file by
        # file as the loader reads them, so one file's float pages are resident at a time.
        pack = quantize is None and self.dtype == torch.bfloat16 and self.device.type == "cpu" and cpu_has_bf16_gemm()
        after_file = pack_after_file(self.model) if pack else quantize_after_file(self.model, quantize)
        load_state_dict_into(self.model, self.path, dtype=self.dtype, device=self.device, after_file=after_file)
        self.model.eval().requires_grad_(False)
        quantize_model(self.model, quantize)
        if pack:
            pack_bf16_model(self.model)  # the tied weights the per-file hook leaves
        self.tokenizer = DimpleTokenizer.from_pretrained(self.path)
        self.processor: ImageProcessor | None = None
        if self.config.vision_config is not None:
            self.processor = ImageProcessor.from_pretrained(self.path)

    def prepare(self, conversations: Prompt, *, parse_special_tokens: bool = False) -> ModelInputs:
        """Chat template → token ids → image placeholder expansion, left padded, as the authors' processor.

        A plain string is one user turn; a list of messages is one conversation; a list of conversations (or of
        strings) is a batch. Images are the conversation's image items (paths, PIL images or uint8 arrays).
        Only the template makes structure: special-token strings in message text (``<|im_end|>``, a typed
        ``<|image_pad|>``) stay plain text, unless ``parse_special_tokens=True`` says the caller built a raw
        prompt on purpose.
        """
        batch = _as_batch(conversations)
        if not batch or any(not conv for conv in batch):
            raise ValueError("prepare needs at least one non-empty conversation")
        images = [image for conv in batch for image in _images_of(conv)]
        ids = [self.tokenizer.encode_chat(conv, parse_special_tokens=parse_special_tokens) for conv in batch]
        pixel_values = image_grid_thw = None
        if images:
            if self.processor is None:
                raise ValueError("this checkpoint has no vision tower (text-only model): it cannot take images")
            processed = self.processor(images)
            pixel_values, image_grid_thw = processed.pixel_values, processed.image_grid_thw
            ids = expand_image_placeholder_ids(
                ids, image_grid_thw, self.config.image_token_id, self.processor.merge_size
            )
        input_ids, attention_mask = self.tokenizer.pad_batch(ids)
        return ModelInputs(input_ids, attention_mask, pixel_values, image_grid_thw)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unshifted logits ``(batch, len, vocab)`` of one full-sequence forward, as the authors'
        ``DimpleModel.forward`` returns them (bidirectional attention with Dimple's mask)."""
        inputs = ModelInputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        self._check_model_inputs(inputs, canvas_length=0)
        features = self._image_features(inputs)
        out = self.model(
            inputs.input_ids.to(self.device),
            self.backend,
            attention_mask=inputs.attention_mask.to(self.device),
            image_features=features,
            image_grid_thw=image_grid_thw,
        )
        return out.logits

    def _check_model_inputs(self, inputs: ModelInputs, canvas_length: int) -> None:
        """ValueError/TypeError naming the problem in pre-tokenised inputs, before anything runs: shapes, dtypes,
        token ids outside the vocabulary, right padding, images without their grid, and a prompt plus a canvas
        of ``canvas_length`` longer than the model's positions."""
        input_ids, attention_mask = inputs.input_ids, inputs.attention_mask
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() or tensor.is_complex():
                raise TypeError(f"{name} must be an integer tensor, got {getattr(tensor, 'dtype', type(tensor))}")
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or input_ids.shape[1] < 1:
            raise ValueError(
                f"input_ids and attention_mask must both be (batch, len) with len >= 1, got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        vocab = self.config.vocab_size
        if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
            raise ValueError(f"input_ids hold token ids outside the vocabulary [0, {vocab})")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        mask = attention_mask.to(torch.bool)
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise ValueError("inputs need left padding: a 0 of attention_mask follows a 1 (right padding?)")
        if (inputs.pixel_values is None) != (inputs.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw go together: give both or neither")
        total, limit = input_ids.shape[1] + canvas_length, self.config.max_position_embeddings
        if total > limit:
            raise ValueError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({canvas_length}) = {total} exceeds "
                f"max_position_embeddings {limit}"
            )

    def _image_features(self, inputs: ModelInputs) -> torch.Tensor | None:
        """Projected features of the inputs' images (once per request), or None without images."""
        if inputs.pixel_values is None:
            return None
        return self.model.encode_images(inputs.pixel_values.to(self.device), inputs.image_grid_thw, self.backend)

    def _seconds_since(self, start: float) -> float:
        """Seconds since ``start`` (``time.perf_counter``) once the device's queued work is done: CUDA runs
        asynchronously, so without the sync a timing would stop before its kernels do."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # Generation ---------------------------------------------------------------------------------------------------

    def _model_inputs(
        self, inputs: Prompt | ModelInputs | Mapping[str, Any] | None, tensors: dict[str, Any], raw: bool
    ) -> ModelInputs:
        """ModelInputs from a prompt/conversation(s), a ModelInputs or processor dict, or input_ids & co."""
        if inputs is not None and tensors:
            raise ValueError(f"give either inputs or {sorted(tensors)}, not both")
        if isinstance(inputs, ModelInputs):
            return inputs
        if isinstance(inputs, Mapping):
            tensors = dict(inputs)
        elif inputs is not None:
            return self.prepare(inputs, parse_special_tokens=raw)
        check_no_video(tensors)
        unknown = set(tensors) - set(MODEL_INPUT_FIELDS)
        if unknown:
            raise TypeError(f"unknown model inputs {sorted(unknown)}")
        if tensors.get("input_ids") is None:
            raise ValueError("generate needs a prompt, conversation(s), or input_ids")
        if tensors.get("attention_mask") is None:
            raise ValueError("input_ids need an attention_mask (1 = token, 0 = left padding), as in the authors' code")
        return ModelInputs(**{key: torch.as_tensor(value) for key, value in tensors.items() if value is not None})

    def _decode_request(
        self,
        inputs: Prompt | ModelInputs | Mapping[str, Any] | None,
        template: str | None,
        response_length: int | None,
        parse_special_tokens: bool,
        options: dict[str, Any],
    ) -> tuple[DecodeRequest, GenerationConfig, float]:
        """Validate everything and encode the images once, before the first step; also return the seconds the
        vision tower took. ``options`` may carry the pre-tokenised ``input_ids``, ``attention_mask``,
        ``pixel_values``, ``image_grid_thw`` (video inputs are refused by name) and a ``preset`` name (default:
        the Runtime's) whose options the others override; the rest are GenerationConfig fields."""
        options = options_over_preset(options, self.preset)
        tensors = {key: options.pop(key) for key in (*MODEL_INPUT_FIELDS, *VIDEO_INPUT_KEYS) if key in options}
        tensors = {key: value for key, value in tensors.items() if value is not None}
        model_inputs = self._model_inputs(inputs, tensors, parse_special_tokens)
        max_new_tokens = options.pop("max_new_tokens", None)
        if max_new_tokens is not None:
            check_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
        if response_length is not None:
            check_int("response_length", response_length, 0, MAX_NEW_TOKENS)
        mask_id = self.config.mask_token_id
        template_ids = None
        if template is not None:
            encode = functools.partial(self.tokenizer.encode, parse_special_tokens=parse_special_tokens)
            template_ids = parse_template(template, encode, mask_id)  # its text, like a message's, stays text
        canvas = build_canvas(mask_id, self.config.pad_token_id, max_new_tokens, template_ids, response_length)
        try:
            config = GenerationConfig(max_new_tokens=len(canvas), **options)
        except TypeError as err:
            names = sorted(f.name for f in dataclasses.fields(GenerationConfig))
            raise TypeError(f"{err}; generate's options are {names}, preset, template and response_length") from None
        self._check_model_inputs(model_inputs, canvas_length=len(canvas))
        input_ids, attention_mask = model_inputs.input_ids, model_inputs.attention_mask
        vision_start = time.perf_counter()
        features = self._image_features(model_inputs)
        vision_seconds = 0.0 if features is None else self._seconds_since(vision_start)
        batch = input_ids.shape[0]
        request = DecodeRequest(
            input_ids=input_ids.to(self.device, torch.long),
            attention_mask=attention_mask.to(self.device, torch.long),
            canvas=torch.tensor(canvas, dtype=torch.long, device=self.device).expand(batch, -1),
            image_features=features,
            image_grid_thw=model_inputs.image_grid_thw,
        )
        return request, config, vision_seconds

    def decode_request(
        self,
        inputs: Prompt | ModelInputs | Mapping[str, Any] | None = None,
        *,
        template: str | None = None,
        response_length: int | None = None,
        parse_special_tokens: bool = False,
        **options: Any,
    ) -> tuple[DecodeRequest, GenerationConfig]:
        """What :meth:`generate` would decode, checked, with the images encoded: for the step engine
        (:class:`~dimple_rt.generation.engine.Engine`), which decodes many such requests side by side."""
        with torch.inference_mode():
            request, config, _ = self._decode_request(inputs, template, response_length, parse_special_tokens, options)
        return request, config

    @torch.inference_mode()
    def generate(
        self,
        inputs: Prompt | ModelInputs | Mapping[str, Any] | None = None,
        *,
        template: str | None = None,
        response_length: int | None = None,
        parse_special_tokens: bool = False,
        tokens_hook: TokensHook | None = None,
        logits_hook: LogitsHook | None = None,
        on_step: Callable[[StreamStep], None] | None = None,
        **options: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Answer a prompt string, a conversation, or a batch of them, by Dimple's discrete diffusion.

        ``inputs`` may also be pre-tokenised: a ModelInputs, the authors' processor dict, or ``input_ids`` +
        ``attention_mask`` (+ ``pixel_values``, ``image_grid_thw``) keyword tensors; these are a batch.
        ``options`` are the fields of :class:`~dimple_rt.config.GenerationConfig` with Dimple's meaning:
        max_new_tokens (64), steps (= max_new_tokens), eps (1e-3), temperature (0: greedy), top_p, top_k, alg
        ("maskgit_plus"; also origin, origin-ratio, autoregressive, topk_margin, entropy), alg_temp, threshold
        (0.95 in 'dim': confident decoding), use_original_confidence (True), pipeline ("dim" | "dream"), prefill
        (True: Dimple's use_cache), seed, batch_coupled (False), validate_categorical, return_history.
        ``preset`` ("exact" | "fast", :mod:`dimple_rt.presets`): start from that preset's options instead of
        the Runtime's preset (int8 weights come only from the Runtime's). Structure priors: ``template`` (text with ``<mask:N>`` spans, placed at the canvas start) and
        ``response_length=k`` (``<|endoftext|>`` from position k). Special-token strings in message text stay
        text unless ``parse_special_tokens=True`` (a raw prompt built on purpose). Hooks: ``tokens_hook(step, x,
        logits) -> x`` and ``logits_hook(step, x, logits) -> logits``, the authors' signatures and shapes.
        ``on_step(StreamStep)`` is called after every step with what :meth:`stream` yields (a live display, a
        trace); its time is left out of the result's stats.
        Returns one GenerationResult, or a list for a batch.
        """
        start = time.perf_counter()
        request, config, vision_seconds = self._decode_request(
            inputs, template, response_length, parse_special_tokens, options
        )
        history: list[torch.Tensor] = []
        sequences = torch.cat([request.input_ids, request.canvas], dim=1)
        prompt_len, mask_id = request.input_ids.shape[1], self.config.mask_token_id
        needed = torch.zeros(sequences.shape[0], dtype=torch.long)  # (batch,) steps until no mask; 0: not yet
        passes, observer_seconds = 0, 0.0
        decode_start = time.perf_counter()
        for step in denoise(self.model, self.backend, request, config, tokens_hook, logits_hook):
            sequences, passes = step.sequences, passes + 1
            if config.return_history:
                history.append(step.sequences.cpu())
            complete = ~(step.sequences[:, prompt_len:] == mask_id).any(dim=1).cpu()  # (batch,)
            needed[complete & (needed == 0)] = passes
            if on_step is not None:
                observer_start = time.perf_counter()
                on_step(_stream_step(step, prompt_len))
                observer_seconds += time.perf_counter() - observer_start
        decode_seconds = self._seconds_since(decode_start) - observer_seconds
        needed[needed == 0] = passes
        results = self._results(
            sequences.cpu(),
            prompt_len,
            passes,
            history if config.return_history else None,
            needed.tolist(),
            (start, observer_seconds, vision_seconds, decode_seconds),
        )
        one_input = isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and not _is_batch(inputs))
        return results[0] if one_input else results

    def _results(
        self,
        sequences: torch.Tensor,
        prompt_len: int,
        passes: int,
        history: list[torch.Tensor] | None,
        needed: list[int],
        timing: tuple[float, float, float, float],
    ) -> list[GenerationResult]:
        """One result per row; ``timing`` is (the call's perf_counter start, on_step's seconds, vision seconds,
        decode seconds)."""
        start, observer_seconds, vision_seconds, decode_seconds = timing
        canvas_tokens = sequences.shape[1] - prompt_len
        answers = [self.tokenizer.answer_ids(sequences[row, prompt_len:]) for row in range(sequences.shape[0])]
        texts = [self.tokenizer.decode(answer) for answer in answers]
        total = time.perf_counter() - start - observer_seconds
        results = []
        for row, (answer, text) in enumerate(zip(answers, texts)):
            stats = RunStats(
                total_seconds=total,
                vision_seconds=vision_seconds,
                decode_seconds=decode_seconds,
                seconds_per_forward=decode_seconds / passes if passes else 0.0,
                forward_passes=needed[row],
                answer_tokens=len(answer),
                canvas_tokens=canvas_tokens,
                tokens_per_second=len(answer) / total if total > 0 else 0.0,
            )
            results.append(
                GenerationResult(
                    text=text,
                    token_ids=answer,
                    sequences=sequences[row : row + 1],
                    num_forward_passes=passes,
                    finish_reason="stop" if len(answer) < canvas_tokens else "length",
                    stats=stats,
                    history=None if history is None else [h[row : row + 1] for h in history],
                )
            )
        return results

    def stream(
        self,
        inputs: Prompt | ModelInputs | Mapping[str, Any] | None = None,
        *,
        template: str | None = None,
        response_length: int | None = None,
        parse_special_tokens: bool = False,
        tokens_hook: TokensHook | None = None,
        logits_hook: LogitsHook | None = None,
        **options: Any,
    ) -> Iterator[StreamStep]:
        """Like :meth:`generate`, but yield the canvas after every step (a batch: one row per input)."""
        request, config, _ = self._decode_request(inputs, template, response_length, parse_special_tokens, options)
        prompt_len = request.input_ids.shape[1]
        with torch.inference_mode():
            for step in denoise(self.model, self.backend, request, config, tokens_hook, logits_hook):
                yield _stream_step(step, prompt_len)

    def render_canvas(self, canvas: torch.Tensor) -> str:
        """Text of one canvas row ``(max_new_tokens,)`` with each mask shown as "␣", as the authors' demo does."""
        mask_id = self.config.mask_token_id
        pieces, run = [], []
        for token in canvas.tolist():
            if token == mask_id:
                pieces.append(self.tokenizer.decode(run) + "␣")
                run = []
            else:
                run.append(token)
        return "".join(pieces) + self.tokenizer.decode(run)


@dataclass
class StreamStep:
    """One step of :meth:`Runtime.stream`: canvas (batch, max_new_tokens) after the step; committed: tokens
    written by the step over the batch; positions (committed, 2): (row, canvas position) of each; confidences
    (committed,): the probability the step's logits gave each committed token (plain softmax, for display)."""

    step: int
    canvas: torch.Tensor
    committed: int
    positions: torch.Tensor
    confidences: torch.Tensor


def _stream_step(step: Step, prompt_len: int) -> StreamStep:
    """The caller's view of a loop step: the canvas only, on the CPU."""
    return StreamStep(step.step, step.sequences[:, prompt_len:].cpu(), step.committed, step.positions, step.confidences)
