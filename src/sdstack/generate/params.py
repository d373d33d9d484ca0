"""Generation settings (the reference UI's txt2img/img2img fields) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sdstack.errors import SdstackError
from sdstack.generate.samplers import resolve_sampler
from sdstack.text.emphasis import EMPHASIS_MODES

MIN_SIZE = 64
MAX_SIZE = 4096
MAX_STEPS = 1000
MAX_BATCH_SIZE = 64
MAX_SEED = 2**32 - 1


class GenerationParamsError(SdstackError):
    """A generation setting out of range: the message names the field, value and range."""


@dataclass
class GenerationParams:
    """What to generate; the fields and defaults of the reference UI's txt2img/img2img.

    Attributes:
        prompt: positive prompt (reference prompt language: emphasis, ``[a:b:when]``,
            ``[a|b]``, ``AND``, ``BREAK``, embeddings by file stem).
        negative: negative prompt (scheduling applies, no AND split).
        steps: sampling steps (img2img runs fewer, see ``denoising_strength``).
        cfg_scale: classifier-free guidance scale.
        sampler: reference sampler name, e.g. "Euler a", "DPM++ 2M"; old combined names
            such as "DPM++ 2M Karras" are accepted.
        schedule_type: "Automatic" (the sampler's reference default), "Uniform",
            "Karras" or "Exponential".
        seed: base seed, ``-1`` = random (drawn once); image ``i`` of the job uses
            ``seed + i``.
        width, height: pixels, multiples of 8 in [64, 4096].
        batch_size: images denoised together per UNet call.
        batch_count: batches run one after another.
        clip_skip: reference "Clip skip" (1 = last layer, up to 12 on SD1.x); a fractional
            value blends the two neighbouring layers (see ``sdstack.text.clip_skip``).
        emphasis: "original", "no-norm", "ignore" or "comfy".
        init_image: a PIL image for img2img (resized to width x height), or None.
        denoising_strength: img2img strength in [0, 1]; ignored for txt2img.
        pad_conds: reference option "Pad prompt/negative prompt" (off by default): when
            prompt and negative have different token lengths, pad the shorter with
            empty-prompt chunks and run one UNet call instead of two (changes the image;
            infotext ``Pad conds: True``).
    """

    prompt: str
    negative: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    schedule_type: str = "Automatic"
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: float = 1
    emphasis: str = "original"
    init_image: Any = None
    denoising_strength: float = 0.75
    pad_conds: bool = False

    @property
    def is_img2img(self) -> bool:
        """True when an init image is set."""
        return self.init_image is not None

    @property
    def n_images(self) -> int:
        """Images the job makes: ``batch_size * batch_count``."""
        return self.batch_size * self.batch_count


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenerationParamsError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise GenerationParamsError(f"{name} must be in [{low}, {high}], got {value}")


def _check_size(name: str, value: Any) -> None:
    _check_int(name, value, MIN_SIZE, MAX_SIZE)
    if value % 8:
        raise GenerationParamsError(
            f"{name} must be a multiple of 8, got {value} (nearest: {value // 8 * 8} or "
            f"{value // 8 * 8 + 8})"
        )


def check_inputs(params: GenerationParams) -> None:
    """Check every field; the first bad one raises, naming field, value and expected range.

    Raises:
        GenerationParamsError: a value out of range or of the wrong type.
        UnknownSamplerError: unknown sampler or schedule type (with suggestions).
    """
    if not isinstance(params.prompt, str) or not isinstance(params.negative, str):
        raise GenerationParamsError("prompt and negative must be strings")
    _check_int("steps", params.steps, 1, MAX_STEPS)
    if not isinstance(params.cfg_scale, (int, float)) or not math.isfinite(params.cfg_scale):
        raise GenerationParamsError(f"cfg_scale must be a finite number, got {params.cfg_scale!r}")
    resolve_sampler(params.sampler, params.schedule_type)
    if params.seed != -1:
        _check_int("seed", params.seed, 0, MAX_SEED)
    _check_size("width", params.width)
    _check_size("height", params.height)
    _check_int("batch_size", params.batch_size, 1, MAX_BATCH_SIZE)
    _check_int("batch_count", params.batch_count, 1, 10_000)
    clip_skip = params.clip_skip
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, float)):
        raise GenerationParamsError(f"clip_skip must be a number, got {clip_skip!r}")
    if not 1 <= clip_skip <= 12:
        raise GenerationParamsError(f"clip_skip must be in [1, 12], got {clip_skip}")
    if params.emphasis not in EMPHASIS_MODES:
        raise GenerationParamsError(
            f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {params.emphasis!r}"
        )
    strength = params.denoising_strength
    if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise GenerationParamsError(f"denoising_strength must be in [0, 1], got {strength!r}")
    if not isinstance(params.pad_conds, bool):
        raise GenerationParamsError(f"pad_conds must be True or False, got {params.pad_conds!r}")
    if params.init_image is not None and not hasattr(params.init_image, "convert"):
        raise GenerationParamsError(
            f"init_image must be a PIL image, got {type(params.init_image).__name__}"
        )
