"""Generation settings (the reference UI's txt2img/img2img fields) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sdstack.generate.samplers import resolve_sampler
from sdstack.prompt.errors import check_text
from sdstack.prompt.limits import MAX_STEPS
from sdstack.validate import (
    SettingError,
    check_bool,
    check_clip_skip,
    check_emphasis,
    check_int,
    check_number,
)

MIN_SIZE = 64
MAX_SIZE = 4096
MAX_PIXELS = 2048 * 2048
"""Pixels per image: 4.2 megapixels, the reference UI's 2048x2048 slider maximum. An SD1
model was trained at 512x512; larger jobs take hours on a CPU and tens of GB."""
MAX_CFG = 100.0
"""CFG scale range [0, 100] (the reference slider goes to 30)."""
MAX_BATCH_COUNT = 10_000
MAX_BATCH_SIZE = 64
MAX_SEED = 2**32 - 1


GenerationParamsError = SettingError
"""A generation setting out of range (the shared :class:`~sdstack.validate.SettingError`)."""


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
            value blends the two neighbouring layers (see ``sdstack.text.clip_skip``);
            ``"auto"``: the clip skip the active LoRAs were trained with when they agree,
            else 1 (see ``sdstack.lora.trained_clip_skip``).
        emphasis: "original", "no-norm", "ignore" or "comfy".
        init_image: a PIL image for img2img (resized to width x height), or None.
        denoising_strength: img2img strength in [0, 1]; ignored for txt2img.
        pad_conds: reference option "Pad prompt/negative prompt" (off by default): when
            prompt and negative have different token lengths, pad the shorter with
            empty-prompt chunks and run one UNet call instead of two (changes the image;
            infotext ``Pad conds: True``).
        encoding: how the prompt becomes conditioning: "standard" (the prompt language
            above) or "deprojected": the prompt is an embedding expression
            (``{"a cat" + 0.5*"a hat" - "blurry"}``, ``{"a cat" ~0.3~ "a dog"}``,
            ``{pooled("a, b")}``; plain text = one text) deprojected by the job's
            deprojector (``GenerationJob.deprojector``, ``prepare(deprojector=...)``);
            its texts are encoded plainly (no emphasis, schedules, AND, BREAK),
            ``<lora:...>`` tags still apply. The negative prompt is encoded the standard
            way. See ``sdstack.generate.encoding``.
        token_merging: the reference's "Token merging ratio" (ToMe for SD via ``tomesd``,
            self-attention at the highest resolution): 0 (off) .. 0.9; infotext
            ``Token merging ratio`` when not 0. See ``sdstack.generate.token_merging``.
        vae_tiling: "auto" (tiled VAE decode/encode above 1024x1024 pixels), "on" or
            "off"; not in the infotext. See ``sdstack.generate.vae_tiling``.
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
    clip_skip: float | str = 1
    emphasis: str = "original"
    init_image: Any = None
    denoising_strength: float = 0.75
    pad_conds: bool = False
    encoding: str = "standard"
    token_merging: float = 0.0
    vae_tiling: str = "auto"

    @property
    def is_img2img(self) -> bool:
        """True when an init image is set."""
        return self.init_image is not None

    @property
    def n_images(self) -> int:
        """Images the job makes: ``batch_size * batch_count``."""
        return self.batch_size * self.batch_count


AUTO_CLIP_SKIP = "auto"
"""``clip_skip="auto"``: decided at generation from the active LoRAs' metadata."""


def _check_size(params: GenerationParams, names: dict[str, str]) -> None:
    for field in ("width", "height"):
        value = check_int(names[field], getattr(params, field), MIN_SIZE, MAX_SIZE)
        if value % 8:
            raise GenerationParamsError(
                f"{names[field]} must be a multiple of 8, got {value} (nearest: "
                f"{value // 8 * 8} or {value // 8 * 8 + 8})"
            )
    if params.width * params.height > MAX_PIXELS:
        raise GenerationParamsError(
            f"{names['width']} x {names['height']} = {params.width}x{params.height} is "
            f"{params.width * params.height:,} pixels; at most {MAX_PIXELS:,} (2048x2048) per "
            "image: SD1 models are made for 512x512"
        )


def check_inputs(params: GenerationParams, names: dict[str, str] | None = None) -> None:
    """Check every field before any work; the first bad one raises, naming it, the value
    and the range expected.

    Ranges: steps 1..1000; cfg_scale 0..100; seed -1 (random) or 0..2**32-1; width and
    height multiples of 8 in 64..4096 with at most 2048x2048 pixels; batch_size 1..64;
    batch_count 1..10000; clip_skip 1..12; denoising_strength 0..1; encoding "standard"
    or "deprojected"; token_merging 0..0.9; vae_tiling auto, on or off.

    Args:
        params: the settings.
        names: field -> the name used in messages (the CLI passes ``--steps`` ...);
            fields not given are named as the field itself.

    Raises:
        GenerationParamsError / SettingError: a value out of range or of the wrong type.
        PromptEncodingError: a prompt that is not valid UTF-8.
        UnknownSamplerError: unknown sampler or schedule type (with suggestions).
        UnknownEncodingError: an encoding other than "standard" or "deprojected".
    """
    from sdstack.generate.encoding import check_encoding
    from sdstack.generate.tiling_modes import check_tiling_mode
    from sdstack.generate.token_merging import check_ratio

    names = {**{f.name: f.name for f in fields(GenerationParams)}, **(names or {})}
    if not isinstance(params.prompt, str) or not isinstance(params.negative, str):
        raise GenerationParamsError("prompt and negative must be strings")
    check_text(params.prompt)
    check_text(params.negative, "negative prompt")
    check_int(names["steps"], params.steps, 1, MAX_STEPS)
    check_number(names["cfg_scale"], params.cfg_scale, 0.0, MAX_CFG)
    resolve_sampler(params.sampler, params.schedule_type)
    if params.seed != -1:
        check_int(names["seed"], params.seed, 0, MAX_SEED, hint=" (or -1 for a random seed)")
    _check_size(params, names)
    check_int(names["batch_size"], params.batch_size, 1, MAX_BATCH_SIZE)
    check_int(names["batch_count"], params.batch_count, 1, MAX_BATCH_COUNT)
    if params.clip_skip != AUTO_CLIP_SKIP:
        check_clip_skip(params.clip_skip, name=names["clip_skip"])
    check_emphasis(params.emphasis, names["emphasis"])
    check_number(names["denoising_strength"], params.denoising_strength, 0.0, 1.0)
    check_bool(names["pad_conds"], params.pad_conds)
    check_encoding(params.encoding, names["encoding"])
    check_ratio(params.token_merging, names["token_merging"])
    check_tiling_mode(params.vae_tiling, names["vae_tiling"])
    if params.init_image is not None and not hasattr(params.init_image, "convert"):
        raise GenerationParamsError(
            f"{names['init_image']} must be a PIL image, got {type(params.init_image).__name__}"
        )
