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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


PIPELINES = ("dim", "dream")
DECODING_ALGS = ("origin", "origin-ratio", "autoregressive", "maskgit_plus", "topk_margin", "entropy")


@dataclass
class GenerationConfig:
    """Decoding options of :meth:`dimple_rt.Runtime.generate`, with Dimple's meaning (spec §4.1).

    Defaults differ from the authors' (steps 512, 20 new tokens, alg 'origin' without threshold) where theirs
    are never what anyone runs: 64 new tokens, one step per token, greedy, confident decoding (threshold 0.95)
    with maskgit_plus as the deterministic fallback, prefilling on, per-sequence decisions.
    """

    max_new_tokens: int = 64
    """Length of the response canvas (masks appended after the prompt)."""
    steps: int | None = None
    """Denoising steps; None means one per new token (``max_new_tokens``)."""
    eps: float = 1e-3
    """Last timestep of ``linspace(1, eps, steps + 1)``."""
    temperature: float = 0.0
    """0 is greedy (lowest token id on ties); > 0 samples from the filtered distribution."""
    top_p: float | None = None
    """Nucleus filter in (0, 1]; None or 1 disables it (a tiny value such as 0.01 keeps only the argmax)."""
    top_k: int | None = None
    """Keep the k most likely tokens (ties at the k-th value kept); None disables it."""
    alg: str = "maskgit_plus"
    """How positions are ranked: origin, origin-ratio, autoregressive, maskgit_plus, topk_margin, entropy."""
    alg_temp: float | None = None
    """> 0: draw the fallback positions by ``multinomial(softmax(confidence / alg_temp))`` instead of top-n.
    Only the confidence algs use it; origin, origin-ratio and autoregressive ignore it, as the authors' code
    does (their demo passes alg_temp=0.4 with origin)."""
    threshold: float | str | None = "auto"
    """Confident decoding (Dimple's ``alg_p_threshold``): commit every position above it; None/0 disables it.
    "auto" is 0.95 in the 'dim' pipeline and None in 'dream', which has no threshold."""
    use_original_confidence: bool = True
    """'dim': read confidences from the unfiltered, untempered softmax ('dream' always uses the filtered one)."""
    pipeline: str = "dim"
    """'dim' (Dimple's confident decoding with early stop) or 'dream' (Dream's original schedule)."""
    prefill: bool = True
    """Reuse the prompt K/V computed at step 0 (Dimple's ``use_cache``, an approximation the paper measures)."""
    seed: int | None = None
    """Seed of a private RNG stream (None: torch's global RNG, as the authors' code)."""
    batch_coupled: bool = False
    """True: the authors' batch-global decisions; False: each sequence decides alone (batch-independent)."""
    validate_categorical: bool = True
    """Keep the authors' quirk: a sampled step whose bf16 probabilities fail torch's check becomes greedy."""
    return_history: bool = False
    """Also return the sequences after every step."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.steps is None:
            self.steps = self.max_new_tokens
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.alg not in DECODING_ALGS:
            raise ValueError(f"alg must be one of {DECODING_ALGS}, got {self.alg!r}")
        if self.alg_temp is not None and self.alg_temp < 0:
            raise ValueError(f"alg_temp must be None or >= 0, got {self.alg_temp!r}")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.pipeline == "dream" and self.alg == "origin-ratio":
            raise ValueError("alg 'origin-ratio' exists only in the 'dim' pipeline")
        if self.threshold == "auto":
            self.threshold = 0.95 if self.pipeline == "dim" else None
        if isinstance(self.threshold, str) or (self.threshold is not None and not 0 <= self.threshold <= 1):
            raise ValueError(f"threshold must be None, 'auto' or in [0, 1], got {self.threshold!r}")
        if self.pipeline == "dream" and self.threshold:
            raise ValueError("the 'dream' pipeline has no threshold: pass threshold=None (or 'auto')")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
