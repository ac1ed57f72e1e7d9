# SPDX-License-Identifier: Apache-2.0
"""Model configuration read from a checkpoint's ``config.json``.

Dimple's ``config.json`` (``model_type`` ``"dimple"``) holds the Dream/Qwen2 decoder fields at the top level
and the Qwen2.5-VL vision tower under ``vision_config``. A Dream text-only checkpoint (``model_type``
``"Dream"``) has the same decoder fields and no vision tower. Values are validated on creation so that a bad
checkpoint fails here, with the field named, rather than as a shape error deep inside a forward.

Sizes come from a file, so they are bounded before anything is built: every size field has a stated upper
limit (:data:`FIELD_LIMITS`, far above any model of the family), and the parameter count the config implies
must not exceed :data:`MAX_PARAMETERS`; the error gives the memory such a model would need. The loader
(:func:`dimple_rt.weights.load_state_dict_into`) checks the exact bytes against the target device's memory too.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .files import MAX_JSON_BYTES, read_json

MODEL_TYPES = {"dimple": "dimple", "dream": "Dream"}
"""Accepted ``model_type`` spellings (compared case-insensitively) → canonical name. ``"dimple"`` is
rp-yu/Dimple-7B's; ``"Dream"`` is Dream-org/Dream-v0-*-7B's (and DiffuCoder's), a text-only decoder."""
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES.values())
SUPPORTED_ROPE_TYPES = ("default", "mrope")
"""``rope_scaling``/``rope_parameters`` types that mean plain RoPE frequencies (all dimple_rt implements)."""
SILU_NAMES = ("silu", "swish")
"""Activation names meaning SiLU (transformers' ACT2FN maps both to nn.SiLU)."""

MAX_PARAMETERS = 100_000_000_000
"""Largest model a config may describe: 1e11 parameters (186 GiB in bf16), 14x Dimple-7B's 8.3e9. Above it the
config is refused before anything is built, with the memory it would need."""
FIELD_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "max_position_embeddings": 1 << 24,
    "depth": 1024,
    "num_heads": 1024,
    "in_channels": 16,
    "patch_size": 1024,
    "temporal_patch_size": 16,
    "spatial_merge_size": 16,
    "window_size": 1 << 16,
    "out_hidden_size": 1 << 16,
}
"""Upper bound of each size field (decoder and vision_config), inclusive. Each is at least 16x the largest
value in a published checkpoint of the family, and bounds the loops that build the model."""


class ConfigError(ValueError):
    """A config.json that cannot describe a model we can run."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(obj: object, prefix: str, *names: str) -> None:
    """Each field is an integer in [1, FIELD_LIMITS[name]]."""
    for name in names:
        value = getattr(obj, name)
        high = FIELD_LIMITS[name]
        if not _is_int(value) or not 1 <= value <= high:
            raise ConfigError(f"{prefix}{name} must be an integer in [1, {high}], got {value!r}")


def _check_bool(obj: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if type(value) is not bool:
            raise ConfigError(f"{prefix}{name} must be true or false, got {value!r}")


def _check_float(obj: object, prefix: str, name: str, low: float, high: float, low_open: bool) -> float:
    """A finite real in (low, high] or [low, high]; returned as float."""
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            number = float(value)  # an int beyond float range overflows: refused below
        except OverflowError:
            number = math.inf
        ok = math.isfinite(number) and (number > low if low_open else number >= low) and number <= high
    if not ok:
        bracket = "(" if low_open else "["
        shown = (
            value if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of {len(str(value))} digits"
        )
        raise ConfigError(f"{prefix}{name} must be a finite number in {bracket}{low:g}, {high:g}], got {shown!r}")
    return number


def _check_activation(value: object, name: str) -> None:
    if value not in SILU_NAMES:
        raise ConfigError(f"{name} must be one of {SILU_NAMES} (the gated SiLU MLP), got {value!r}")


def _known_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 30):,.1f} GiB"


@dataclass
class VisionConfig:
    """The Qwen2.5-VL vision tower (``visual``) of Dimple; defaults are Dimple-7B's values."""

    depth: int = 32
    """Number of transformer blocks."""
    hidden_size: int = 1280
    """Width of the vision transformer."""
    num_heads: int = 16
    """Attention heads per block (head_dim = hidden_size / num_heads, 80 for Dimple-7B)."""
    intermediate_size: int = 3420
    """Width of the gated SiLU MLP."""
    hidden_act: str = "silu"
    """Activation of the gated MLP; Qwen2.5-VL uses SiLU."""
    in_channels: int = 3
    """Image channels."""
    patch_size: int = 14
    """Spatial patch side in pixels."""
    temporal_patch_size: int = 2
    """Frames per patch; a still image is tiled to this many frames."""
    spatial_merge_size: int = 2
    """Side of the square of patches merged into one LLM token."""
    window_size: int = 112
    """Window side in pixels for windowed attention blocks."""
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    """Blocks that attend over the whole image instead of a window."""
    out_hidden_size: int = 3584
    """Output width of the merger; the projector maps it to the decoder's hidden_size (they may differ)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the blocks' and the merger's RMSNorm, in (0, 1]."""

    def __post_init__(self) -> None:
        p = "vision_config."
        _check_sizes(
            self,
            p,
            "depth",
            "hidden_size",
            "num_heads",
            "intermediate_size",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "window_size",
            "out_hidden_size",
        )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"
            )
        if (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(
                f"vision_config head_dim (hidden_size / num_heads = {self.hidden_size // self.num_heads}) must be a "
                "multiple of 4 (2-D rotary over row and column)"
            )
        _check_activation(self.hidden_act, "vision_config.hidden_act")
        self.rms_norm_eps = _check_float(self, p, "rms_norm_eps", 0.0, 1.0, low_open=True)
        indexes = self.fullatt_block_indexes
        if not isinstance(indexes, (list, tuple)) or not all(_is_int(i) for i in indexes):
            raise ConfigError(f"vision_config.fullatt_block_indexes must be a list of integers, got {indexes!r}")
        self.fullatt_block_indexes = list(indexes)
        bad = [i for i in indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision_config.fullatt_block_indexes {bad} are outside [0, depth={self.depth})")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ConfigError(
                "vision_config.window_size must be a multiple of patch_size * spatial_merge_size "
                f"({self.patch_size * self.spatial_merge_size}), got {self.window_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of ``pixel_values`` (1176 for Dimple-7B)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def num_parameters(self) -> int:
        """Parameters of the tower (patch embed, blocks, merger), from the config alone."""
        d, i = self.hidden_size, self.intermediate_size
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * (i * d + i) + (d * i + d)
        merged = d * self.spatial_merge_size**2
        merger = d + (merged * merged + merged) + (self.out_hidden_size * merged + self.out_hidden_size)
        return d * self.patch_dim + self.depth * block + merger

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"vision_config must be an object or null, got {data!r}")
        data = dict(data)
        if "in_chans" in data and "in_channels" not in data:
            data["in_channels"] = data["in_chans"]
        return cls(**_known_fields(cls, data))


VISION_TOKEN_DEFAULTS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
"""Dimple-7B's vision token ids: the defaults of a config *with* a vision tower only. A text-only model has none
(None), and they are neither defaulted into it nor checked against its vocabulary."""


@dataclass
class DimpleConfig:
    """Decoder (Dream / Qwen2) fields plus the optional vision tower; defaults are Dimple-7B's values."""

    model_type: str = "dimple"
    """``"dimple"`` (decoder + vision tower) or ``"Dream"`` (decoder only); any case of either is accepted."""
    vocab_size: int = 152064
    """Rows of the embedding and the LM head."""
    hidden_size: int = 3584
    """Decoder width."""
    intermediate_size: int = 18944
    """Width of the decoder's gated SiLU MLP."""
    num_hidden_layers: int = 28
    """Decoder layers."""
    num_attention_heads: int = 28
    """Query heads."""
    num_key_value_heads: int = 4
    """Key/value heads (GQA)."""
    hidden_act: str = "silu"
    """Decoder MLP activation."""
    max_position_embeddings: int = 131072
    """Longest sequence the model accepts (prompt + canvas)."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon, in (0, 1]."""
    rope_theta: float = 1_000_000.0
    """RoPE base, a finite number > 0."""
    rope_scaling: dict[str, Any] | None = None
    """Only ``None`` or a ``{"type"/"rope_type": "default" | "mrope"}`` object: Dimple uses plain RoPE frequencies."""
    tie_word_embeddings: bool = False
    """Whether the LM head shares the embedding matrix (False for Dimple and Dream)."""
    attention_bias: bool = True
    """Whether q/k/v projections carry a bias (True for Qwen2)."""
    mask_token_id: int = 151666
    """The diffusion ``<|mask|>`` token."""
    pad_token_id: int = 151643
    """Padding id (``<|endoftext|>``), also the answer terminator in practice."""
    bos_token_id: int | list[int] | None = 151643
    """Unused by generation; kept for completeness."""
    eos_token_id: int | list[int] | None = 151643
    """Unused by generation; kept for completeness."""
    image_token_id: int | None = None
    """``<|image_pad|>``, one per merged vision token; 151655 with a vision tower, None without."""
    video_token_id: int | None = None
    """``<|video_pad|>`` (video is not supported); 151656 with a vision tower, None without."""
    vision_start_token_id: int | None = None
    """``<|vision_start|>``; 151652 with a vision tower, None without."""
    vision_end_token_id: int | None = None
    """``<|vision_end|>``; 151653 with a vision tower, None without."""
    mrope_section: list[int] | None = None
    """Rotary channel pairs per M-RoPE stream (temporal, height, width); sums to head_dim / 2. None: Dimple's
    [16, 24, 24] proportion of head_dim / 2 (text-only models: any split is plain 1-D RoPE)."""
    full_attn_mask: bool = True
    """Bidirectional (Dimple) attention if True, causal (AR training stages) if False."""
    initializer_range: float = 0.02
    """Std of the normal init used for fresh weights."""
    torch_dtype: str | None = None
    """The dtype the checkpoint says it is stored in (config ``torch_dtype``/``dtype``), used by ``dtype="auto"``."""
    vision_config: VisionConfig | None = None
    """The vision tower, or None for a text-only (Dream) model."""

    def __post_init__(self) -> None:
        canonical = MODEL_TYPES.get(self.model_type.lower()) if isinstance(self.model_type, str) else None
        if canonical is None:
            raise ConfigError(
                f"model_type must be one of {SUPPORTED_MODEL_TYPES} (any letter case), got {self.model_type!r}: "
                "dimple_rt runs Dimple ('dimple') and text-only Dream ('Dream') checkpoints"
            )
        self.model_type = canonical
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        elif self.vision_config is not None and not isinstance(self.vision_config, VisionConfig):
            raise ConfigError(f"vision_config must be an object or null, got {self.vision_config!r}")
        _check_sizes(
            self,
            "",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim (hidden_size / num_attention_heads = {self.head_dim}) must be even for RoPE")
        _check_activation(self.hidden_act, "hidden_act")
        _check_bool(self, "", "tie_word_embeddings", "attention_bias", "full_attn_mask")
        self.rms_norm_eps = _check_float(self, "", "rms_norm_eps", 0.0, 1.0, low_open=True)
        self.rope_theta = _check_float(self, "", "rope_theta", 0.0, 1e30, low_open=True)
        self.initializer_range = _check_float(self, "", "initializer_range", 0.0, 1e6, low_open=False)
        self._check_rope_scaling()
        self._check_mrope_section()
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(f"torch_dtype must be a dtype name such as 'bfloat16', got {self.torch_dtype!r}")

        if self.model_type == "dimple" and self.vision_config is None:
            raise ConfigError("a 'dimple' config needs a vision_config (or model_type 'Dream' for a text-only model)")
        if self.vision_config is not None:
            for name, default in VISION_TOKEN_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        for name in ("mask_token_id", "pad_token_id", *VISION_TOKEN_DEFAULTS):
            value = getattr(self, name)
            if value is None and name in VISION_TOKEN_DEFAULTS:
                continue  # a text-only model has no vision tokens
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(_is_int(i) and i >= 0 for i in ids):
                raise ConfigError(f"{name} must be null, a token id or a list of token ids, got {value!r}")
        self._check_size()

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None or scaling == {}:
            return
        if not isinstance(scaling, dict):
            raise ConfigError(
                f"rope_scaling must be null or an object such as {{'type': 'default'}}, got {scaling!r}: scaled RoPE "
                f"(linear, dynamic, yarn, ...) is not supported, only {SUPPORTED_ROPE_TYPES}"
            )
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {kind!r} is not supported: dimple_rt implements only plain RoPE "
                f"{SUPPORTED_ROPE_TYPES}; remove rope_scaling or set it to null"
            )

    def _check_mrope_section(self) -> None:
        pairs = self.head_dim // 2
        if self.mrope_section is None:
            h = w = (pairs * 3) // 8  # Dimple's 16:24:24 split of head_dim/2 = 64
            self.mrope_section = [pairs - h - w, h, w]
        section = self.mrope_section
        if (
            not isinstance(section, (list, tuple))
            or len(section) != 3
            or not all(_is_int(v) and v >= 0 for v in section)
            or sum(section) != pairs
        ):
            raise ConfigError(
                f"mrope_section must be 3 non-negative integers (temporal, height, width) summing to head_dim/2 = "
                f"{pairs}, got {section!r}"
            )
        self.mrope_section = list(section)

    def num_parameters(self) -> int:
        """Parameters of the whole model (decoder, LM head, vision tower and projector), from the config alone."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        bias = (h + 2 * kv) if self.attention_bias else 0
        layer = (h * h + 2 * h * kv + bias) + h * h + 3 * h * i + 2 * h
        total = v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h
        if self.vision_config is not None:
            out = self.vision_config.out_hidden_size
            total += self.vision_config.num_parameters() + (out * h + h) + (h * h + h)
        return total

    def _check_size(self) -> None:
        params = self.num_parameters()
        if params > MAX_PARAMETERS:
            raise ConfigError(
                f"the config describes a model of {params:.3g} parameters, which needs {_gib(params * 2)} in bfloat16 "
                f"({_gib(params * 4)} in float32); dimple_rt refuses configs above {MAX_PARAMETERS:.0e} parameters "
                f"({_gib(MAX_PARAMETERS * 2)} in bfloat16). Sizes: num_hidden_layers={self.num_hidden_layers}, "
                f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"vocab_size={self.vocab_size}"
                + (
                    f", vision depth={self.vision_config.depth}, hidden_size={self.vision_config.hidden_size}"
                    if self.vision_config is not None
                    else ""
                )
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DimpleConfig:
        """From the fields of a ``config.json`` object; unknown keys are ignored.

        ``mrope_section`` may also sit in ``rope_scaling``; transformers 5's ``rope_parameters`` (``rope_type``,
        ``rope_theta``) and ``dtype`` are read as ``rope_scaling``, ``rope_theta`` and ``torch_dtype``.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        if data.get("model_type") is None:
            raise ConfigError(f"no 'model_type' field: expected one of {SUPPORTED_MODEL_TYPES} (any letter case)")
        parameters = data.get("rope_parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ConfigError(f"rope_parameters must be an object or null, got {parameters!r}")
            data.setdefault("rope_theta", parameters.get("rope_theta", cls.rope_theta))
            if data.get("rope_scaling") is None:
                data["rope_scaling"] = {k: v for k, v in parameters.items() if k != "rope_theta"} or None
        scaling = data.get("rope_scaling")
        if isinstance(scaling, dict) and "mrope_section" in scaling and data.get("mrope_section") is None:
            data["mrope_section"] = scaling["mrope_section"]
        if data.get("torch_dtype") is None and data.get("dtype") is not None:
            data["torch_dtype"] = data["dtype"]
        return cls(**_known_fields(cls, data))

    @classmethod
    def from_json_file(cls, path: str | Path) -> DimpleConfig:
        """Read and validate ``config.json``; every error is a ConfigError naming the file (a missing file stays
        FileNotFoundError)."""
        path = Path(path)
        try:
            data = read_json(path, "the model config", MAX_JSON_BYTES, dict, ConfigError)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except ConfigError:
            raise
        except ValueError as err:  # not a regular file, too large, not UTF-8
            raise ConfigError(str(err)) from None
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` form, in the layout of ``rp-yu/Dimple-7B``."""
        data = dataclasses.asdict(self)
        if self.vision_config is None:
            data.pop("vision_config")
            for name in VISION_TOKEN_DEFAULTS:
                if data[name] is None:
                    data.pop(name)
        else:
            data["vision_config"]["model_type"] = "dimple"
        if self.model_type == "dimple":
            data["architectures"] = ["DimpleModel"]
        else:
            data["architectures"] = ["DreamModel"]
        data["torch_dtype"] = self.torch_dtype or "bfloat16"
        return data


PIPELINES = ("dim", "dream", "fast_dllm")
CACHES = ("prefix", "block", "dual")
BLOCK_STARTS = ("first", "threshold")

ConfidenceKind = Literal["plain", "margin", "neg_entropy"]

ALG_CONFIDENCE: dict[str, ConfidenceKind] = {
    "origin": "plain",
    "origin-ratio": "plain",
    "autoregressive": "plain",
    "maskgit_plus": "plain",
    "topk_margin": "margin",
    "entropy": "neg_entropy",
}
"""The decoding algs, each with the confidence it ranks by (spec §4.4, "Algorithm mapping")."""

MAX_NEW_TOKENS = 8192
"""Longest response canvas: 64x Dimple's usual answer, far past what one diffusion canvas decodes well."""
MAX_STEPS = 8192
"""Most denoising steps (one forward each) a request may ask for."""
MIN_TEMPERATURE = 1e-3
"""Smallest positive temperature: below it ``logits / temperature`` overflows 16-bit floats and sampling is
greedy in all but name (pass 0 for greedy)."""
MAX_TEMPERATURE = 100.0
"""Largest temperature: beyond it every distribution is uniform to fp32 precision."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, low: int, high: int) -> None:
    """ValueError unless ``value`` is an int (not a bool or a float) in ``[low, high]``; names the option."""
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def check_real(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    """ValueError unless ``value`` is a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    ok = _is_real(value) and math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


@dataclass
class GenerationConfig:
    """Decoding options of :meth:`dimple_rt.Runtime.generate`, with Dimple's meaning (spec §4.1).

    Defaults differ from the authors' (steps 512, 20 new tokens, alg 'origin' without threshold) where theirs
    are never what anyone runs: 64 new tokens, one step per token, greedy, confident decoding (threshold 0.95)
    with maskgit_plus as the deterministic fallback, prefilling on, per-sequence decisions.

    Every option is resolved here, once: after ``__post_init__`` ``steps`` is an int and ``threshold`` is
    a float in (0, 1] or None (off), and every value lies in its documented range.
    """

    max_new_tokens: int = 64
    """Length of the response canvas (masks appended after the prompt), 1 to ``MAX_NEW_TOKENS``."""
    steps: int | None = None
    """Denoising steps, 1 to ``MAX_STEPS``; None means one per new token (``max_new_tokens``)."""
    eps: float = 1e-3
    """Last timestep of ``linspace(1, eps, steps + 1)``, in (0, 1)."""
    temperature: float = 0.0
    """0 is greedy (lowest token id on ties); in [MIN_TEMPERATURE, MAX_TEMPERATURE] it samples from the
    filtered distribution."""
    top_p: float | None = None
    """Nucleus filter in (0, 1]; None or 1 disables it (a tiny value such as 0.01 keeps only the argmax)."""
    top_k: int | None = None
    """Keep the k most likely tokens (ties at the k-th value kept); None disables it."""
    alg: str = "maskgit_plus"
    """How positions are ranked: origin, origin-ratio, autoregressive, maskgit_plus, topk_margin, entropy.
    entropy's confidence (the negative entropy) is <= 0, so a positive threshold never selects anything with
    it (the authors' semantics): every step falls back to the schedule's count, and a warning says so."""
    alg_temp: float | None = None
    """> 0: draw the fallback positions by ``multinomial(softmax(confidence / alg_temp))`` instead of top-n.
    Only the confidence algs use it; origin, origin-ratio and autoregressive ignore it, as the authors' code
    does (their demo passes alg_temp=0.4 with origin)."""
    threshold: float | str | None = "auto"
    """Confident decoding (Dimple's ``alg_p_threshold``): commit every position above it; None/0 disables it.
    "auto" is 0.95 in the 'dim' pipeline, None in 'dream', which has no threshold, and 0.9 in 'fast_dllm'
    (Fast-dLLM's default), where it is required."""
    use_original_confidence: bool = True
    """'dim': read confidences from the unfiltered, untempered softmax ('dream' always uses the filtered one)."""
    pipeline: str = "dim"
    """'dim' (Dimple's confident decoding with early stop), 'dream' (Dream's original schedule) or 'fast_dllm'
    (Fast-dLLM's block-wise threshold decoding, as its Dream ``generation_utils_block.py``): the canvas is
    decoded block by block (``block_length``); a block's first step commits its first masked position,
    every later step its most confident masked position plus every other one whose confidence (of the
    filtered, tempered distribution) is >= ``threshold``; a block ends when it has no mask, so ``steps`` is
    not used. Per-sequence decisions only; ``alg`` picks the confidence (maskgit_plus is Fast-dLLM's). Fast-dLLM's
    Dream code runs with top_k=50 unless told otherwise (transformers' default, read from the model config), so
    its confidences come from the top-50 softmax: pass top_k=50 to reproduce its tokens."""
    prefill: bool = True
    """Reuse the prompt K/V computed at step 0 (Dimple's ``use_cache``, an approximation the paper measures).
    False computes every position at every step (and allows only ``cache="prefix"``, meaning no cache)."""
    cache: str = "prefix"
    """Which K/V a step reuses. 'prefix': Dimple's prompt cache (``prefill``; exact when prefill=False).
    'fast_dllm' only: 'block' (Fast-dLLM's PrefixCache: each block starts with a full forward that refreshes
    every K/V, then a step computes the block and everything after it over the prefix K/V frozen at the
    refresh) or 'dual' (Fast-dLLM's DualCache: a step computes only the block, over the prefix and the
    suffix frozen at the refresh, and overwrites the block's K/V in place). Both are approximations."""
    block_length: int | None = None
    """'fast_dllm': canvas positions per block (the last block may be shorter); None is one block."""
    refresh_every: int | None = None
    """'block'/'dual' caches: also refresh every K/V with a full forward every this many steps inside a block
    (a refresh is a decoding step too); None refreshes only at block starts, as Fast-dLLM."""
    block_start: str = "first"
    """'fast_dllm': what a block's first step commits. 'first' (Fast-dLLM's rule): the block's first masked
    position, whatever its confidence, so a block takes at least two steps unless it has one mask; 'threshold':
    the rule of every other step (the most confident masked position of the block plus every other one above
    ``threshold``), so a block whose positions are all confident is done in one step (not in Fast-dLLM)."""
    refresh_prompt: bool = True
    """'block'/'dual' caches: a refresh recomputes the prompt's K/V too, as Fast-dLLM does. False keeps the
    prompt K/V of the first forward (Dimple's prefill approximation, applied to the block caches), so a refresh
    computes only the last prompt token and the canvas: cheaper by the prompt's length, not in Fast-dLLM."""
    early_stop: bool = False
    """'fast_dllm': once a finished block holds ``<|endoftext|>``, every later position of that sequence is
    set to ``<|endoftext|>`` instead of decoded (Dimple pads answers with it), and decoding ends when no mask
    is left. Not in Fast-dLLM; it changes the answer only if the model would write text after its end."""
    seed: int | None = None
    """Seed of a private RNG stream, in [0, 2**64); None: torch's global RNG, as the authors' code."""
    batch_coupled: bool = False
    """True: the authors' batch-global decisions; False: each sequence decides alone (batch-independent)."""
    validate_categorical: bool = True
    """Keep the authors' quirk: a sampled step whose bf16 probabilities fail torch's check becomes greedy."""
    return_history: bool = False
    """Also return the sequences after every step."""

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        if self.steps is None:
            self.steps = self.max_new_tokens
        check_int("steps", self.steps, 1, MAX_STEPS)
        if not (_is_real(self.eps) and 0 < self.eps < 1):
            raise ValueError(f"eps must be a number in (0, 1), got {self.eps!r}")
        check_real("temperature", self.temperature, 0, MAX_TEMPERATURE)
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {self.temperature!r}"
            )
        if self.top_p is not None:
            check_real("top_p", self.top_p, 0, 1, low_open=True)
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1, 2**31 - 1)
        if self.alg not in ALG_CONFIDENCE:
            raise ValueError(f"alg must be one of {tuple(ALG_CONFIDENCE)}, got {self.alg!r}")
        if self.alg_temp is not None:
            check_real("alg_temp", self.alg_temp, 0, MAX_TEMPERATURE)
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.pipeline == "dream" and self.alg == "origin-ratio":
            raise ValueError("alg 'origin-ratio' exists only in the 'dim' pipeline")
        if self.threshold == "auto":
            self.threshold = {"dim": 0.95, "dream": None, "fast_dllm": 0.9}[self.pipeline]
        if self.threshold is not None:
            if isinstance(self.threshold, str):
                raise ValueError(f"threshold must be None, 'auto' or a number in [0, 1], got {self.threshold!r}")
            check_real("threshold", self.threshold, 0, 1)
            self.threshold = float(self.threshold) or None  # 0 turns confident decoding off, as None does
        if self.pipeline == "dream" and self.threshold is not None:
            raise ValueError("the 'dream' pipeline has no threshold: pass threshold=None (or 'auto')")
        if self.alg == "entropy" and self.threshold is not None:
            warnings.warn(
                "alg='entropy' ranks by the negative entropy (<= 0), which never exceeds a positive threshold: "
                "every step uses the fallback count (the authors' semantics); pass threshold=None to say so",
                stacklevel=3,
            )
        if self.seed is not None:
            check_int("seed", self.seed, 0, 2**64 - 1)
        flags = ("use_original_confidence", "prefill", "batch_coupled", "validate_categorical", "return_history")
        for name in (*flags, "early_stop", "refresh_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._check_blocks()

    def _check_blocks(self) -> None:
        """The block options: valid alone, and only where the pipeline and the cache can take them."""
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {self.cache!r}")
        if self.block_length is not None:
            check_int("block_length", self.block_length, 1, MAX_NEW_TOKENS)
        if self.refresh_every is not None:
            check_int("refresh_every", self.refresh_every, 1, MAX_STEPS)
        if self.pipeline != "fast_dllm":
            for name, off in (
                ("cache", "prefix"),
                ("block_length", None),
                ("early_stop", False),
                ("block_start", "first"),
            ):
                if getattr(self, name) != off:
                    raise ValueError(f"{name}={getattr(self, name)!r} needs pipeline='fast_dllm'")
        else:
            if self.threshold is None:
                raise ValueError("the 'fast_dllm' pipeline needs a threshold in (0, 1] (its default is 0.9)")
            if ALG_CONFIDENCE[self.alg] == "plain" and self.alg != "maskgit_plus":
                raise ValueError(
                    f"alg {self.alg!r} has no confidence ranking: 'fast_dllm' takes maskgit_plus (Fast-dLLM's), "
                    "topk_margin or entropy"
                )
            if self.alg_temp:
                raise ValueError("alg_temp has no meaning in the 'fast_dllm' pipeline (it never draws positions)")
            if self.batch_coupled:
                raise ValueError("the 'fast_dllm' pipeline decides per sequence: pass batch_coupled=False")
            if self.block_start not in BLOCK_STARTS:
                raise ValueError(f"block_start must be one of {BLOCK_STARTS}, got {self.block_start!r}")
        if self.cache != "prefix" and not self.prefill:
            raise ValueError(f"cache={self.cache!r} reuses K/V: it cannot be combined with prefill=False")
        if self.cache == "prefix":
            for name, off in (("refresh_every", None), ("refresh_prompt", True)):
                if getattr(self, name) != off:
                    raise ValueError(f"{name}={getattr(self, name)!r} needs cache='block' or 'dual'")
