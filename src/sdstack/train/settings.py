"""What a LoRA training run is asked to do (:class:`TrainSettings`) and its check.

Defaults follow kohya sd-scripts ``train_network.py`` where it has one (AdamW with
torch's weight decay 0.01, ``max_grad_norm`` 1.0, 1600 steps when neither steps nor
epochs are given, ``constant`` schedule, no clip skip = the last layer), except rank 16 /
alpha 8 (the issue's CLI defaults) and buckets on. Everything is checked by
:func:`check_train_settings` before any model or image is read; nothing here imports
torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from sdstack.errors import UnknownNameError
from sdstack.registry import Registry
from sdstack.validate import SettingError, check_bool, check_int, check_number

DEFAULT_STEPS = 1600
"""kohya's ``--max_train_steps`` default, used when neither steps nor epochs are set."""
MAX_STEPS = 10_000_000
MAX_RANK = 1024
MAX_RESOLUTION = 4096
MAX_BATCH_SIZE = 256
MAX_SEED = 2**32 - 1


class UnknownTrainOptionError(UnknownNameError, SettingError):
    """An unknown schedule, network type, precision or sampler name."""


LR_SCHEDULERS = Registry[str]("learning-rate schedule", UnknownTrainOptionError)
for _name in ("constant", "constant_with_warmup", "cosine"):
    LR_SCHEDULERS.register(_name, _name)
NETWORK_TYPES = Registry[str]("network type", UnknownTrainOptionError)
NETWORK_TYPES.register("lora", "lora")
NETWORK_TYPES.register("locon", "locon", aliases=("lora-c3lier", "c3lier"))
MIXED_PRECISIONS = Registry[str]("mixed precision", UnknownTrainOptionError)
for _name, _aliases in (("no", ("fp32", "none")), ("fp16", ("float16",)), ("bf16", ())):
    MIXED_PRECISIONS.register(_name, _name, aliases=_aliases)
SAVE_PRECISIONS = Registry[str]("save precision", UnknownTrainOptionError)
for _name in ("fp32", "fp16", "bf16"):
    SAVE_PRECISIONS.register(_name, _name)


@dataclass(frozen=True)
class TrainSettings:
    """A kohya-style LoRA training run (names as kohya's options, ``_`` for ``-``).

    Attributes:
        clip_skip: reference numbering (1 = last layer, 2 = penultimate + final LN);
            None = kohya's default (the last layer, recorded as ``ss_clip_skip: None``).
        network: ``"lora"`` (Linear/1x1 layers) or ``"locon"`` (adds the 3x3 convs).
        rank, alpha: LoRA rank and alpha of the Linear/1x1 layers (scale alpha/rank).
        conv_rank, conv_alpha: LoCon 3x3 convs (default: rank, and kohya's 1.0).
        train_unet, train_text_encoder: which networks get a LoRA.
        steps, epochs: length of the run (at most one; neither: 1600 steps).
        learning_rate: AdamW learning rate; ``unet_lr`` / ``text_encoder_lr`` override it.
        lr_scheduler: ``constant``, ``constant_with_warmup`` or ``cosine`` (to 0).
        lr_warmup_steps: linear warm-up steps (not with ``constant``, as in kohya).
        weight_decay, max_grad_norm: AdamW decay; gradient-norm clip (0 = none).
        gradient_accumulation_steps: micro-batches per optimizer step.
        gradient_checkpointing: recompute activations in the backward pass.
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (autocast, CUDA only; CPU runs fp32).
        min_snr_gamma: min-SNR loss weight ``min(snr, gamma) / snr``; None = off.
        noise_offset: ``noise += offset * randn(B, C, 1, 1)``; None = off.
        resolution: (width, height) of the training area.
        enable_bucket: aspect-ratio buckets (else one bucket of ``resolution``).
        min_bucket_reso, max_bucket_reso: bucket side limits (None: 256 / 1024, widened to
            the resolution); bucket_reso_steps: bucket side multiple (64).
        bucket_no_upscale: never enlarge an image to fit a bucket.
        batch_size: images per micro-batch.
        seed: every random draw of the run derives from it (reproducible, resumable).
        shuffle_caption, keep_tokens, caption_dropout_rate, caption_tag_dropout_rate,
            caption_separator: caption processing (kohya ``process_caption``).
        caption_extensions: caption file suffixes tried, in order.
        flip_aug: random horizontal flips (each flip has its own cached latents).
        cache_latents: encode each (image, bucket, flip) once, cached on disk.
        latent_cache_dir: where (None: ``<out stem>-latents`` beside ``output``).
        output: the final LoRA ``.safetensors``; None = nothing written.
        save_every: also save the LoRA and the training state every N steps.
        save_every_epochs: the same every N epochs.
        save_precision: dtype of the saved LoRA tensors (``fp16``, ``bf16``, ``fp32``).
        resume: a training state file to continue from.
        sample_prompts: prompts sampled every ``sample_every`` steps (and at the end).
        sample_every: None = only at the end.
        sample_steps, sample_sampler, sample_cfg, sample_negative, sample_seed: sampling
            (``sample_seed`` None = ``seed``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        training_comment: ``ss_training_comment``.
    """

    clip_skip: int | None = None
    network: str = "lora"
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = True
    steps: int | None = None
    epochs: int | None = None
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    min_snr_gamma: float | None = None
    noise_offset: float | None = None
    resolution: tuple[int, int] = (512, 512)
    enable_bucket: bool = True
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    batch_size: int = 1
    seed: int = 0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_separator: str = ","
    caption_extensions: tuple[str, ...] = (".txt", ".caption")
    flip_aug: bool = False
    cache_latents: bool = True
    latent_cache_dir: Path | None = None
    output: Path | None = None
    save_every: int | None = None
    save_every_epochs: int | None = None
    save_precision: str = "fp16"
    resume: Path | None = None
    sample_prompts: tuple[str, ...] = ()
    sample_every: int | None = None
    sample_steps: int = 20
    sample_sampler: str = "Euler a"
    sample_cfg: float = 7.0
    sample_negative: str = ""
    sample_seed: int | None = None
    device: str = "cpu"
    training_comment: str | None = None

    @property
    def effective_clip_skip(self) -> int:
        """The clip skip the text encoder runs at: ``clip_skip`` or 1."""
        return 1 if self.clip_skip is None else self.clip_skip

    @property
    def unet_learning_rate(self) -> float:
        """``unet_lr`` or ``learning_rate``."""
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    @property
    def te_learning_rate(self) -> float:
        """``text_encoder_lr`` or ``learning_rate``."""
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    @property
    def output_name(self) -> str | None:
        """kohya's ``ss_output_name``: the output file's stem."""
        return None if self.output is None else Path(self.output).stem

    @property
    def bucket_limits(self) -> tuple[int, int]:
        """(min, max) bucket side: kohya's 256 / 1024 widened to hold ``resolution``, min
        floored and max ceiled to ``bucket_reso_steps``."""
        step = self.bucket_reso_steps
        low = (
            self.min_bucket_reso if self.min_bucket_reso is not None else min(256, *self.resolution)
        )
        high = (
            self.max_bucket_reso
            if self.max_bucket_reso is not None
            else max(1024, *self.resolution)
        )
        return low // step * step, -(-high // step) * step

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: ``steps``, else ``epochs * steps_per_epoch``, else
        kohya's 1600."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return self.epochs * steps_per_epoch
        return DEFAULT_STEPS


_NAMES = {f.name: f.name for f in fields(TrainSettings)}


def _optional_int(names: dict[str, str], key: str, value: Any, low: int, high: int) -> None:
    if value is not None:
        check_int(names[key], value, low, high)


def _optional_number(names: dict[str, str], key: str, value: Any, low: float, high: float) -> None:
    if value is not None:
        check_number(names[key], value, low, high)


def _named(registry: Registry[str], names: dict[str, str], key: str, value: Any) -> str:
    return registry.checked(value, names[key])


def _check_network(s: TrainSettings, n: dict[str, str]) -> None:
    check_int(n["rank"], s.rank, 1, MAX_RANK)
    check_number(n["alpha"], s.alpha, 0.0, 1e6)
    _optional_int(n, "conv_rank", s.conv_rank, 1, MAX_RANK)
    _optional_number(n, "conv_alpha", s.conv_alpha, 0.0, 1e6)
    if s.network == "lora" and (s.conv_rank is not None or s.conv_alpha is not None):
        raise SettingError(
            f"{n['conv_rank']} / {n['conv_alpha']} set with {n['network']} lora: the 3x3 "
            f"convs are trained only by {n['network']} locon"
        )
    check_bool(n["train_unet"], s.train_unet)
    check_bool(n["train_text_encoder"], s.train_text_encoder)
    if not (s.train_unet or s.train_text_encoder):
        raise SettingError(
            f"{n['train_unet']} and {n['train_text_encoder']} are both off: nothing to train"
        )
    if s.clip_skip is not None:
        check_int(n["clip_skip"], s.clip_skip, 1, 12, hint=" (1 = last layer, 2 = penultimate)")


def _check_length(s: TrainSettings, n: dict[str, str]) -> None:
    if s.steps is not None and s.epochs is not None:
        raise SettingError(f"{n['steps']} {s.steps} and {n['epochs']} {s.epochs}: give one")
    _optional_int(n, "steps", s.steps, 1, MAX_STEPS)
    _optional_int(n, "epochs", s.epochs, 1, MAX_STEPS)
    for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
        _optional_number(n, key, getattr(s, key), 0.0, 10.0)
    check_int(n["lr_warmup_steps"], s.lr_warmup_steps, 0, MAX_STEPS)
    if s.lr_scheduler == "constant" and s.lr_warmup_steps:
        raise SettingError(
            f"{n['lr_scheduler']} constant has no warm-up, got {n['lr_warmup_steps']} "
            f"{s.lr_warmup_steps}: use {n['lr_scheduler']} constant_with_warmup or cosine"
        )
    if s.steps is not None and s.lr_warmup_steps > s.steps:
        raise SettingError(
            f"{n['lr_warmup_steps']} {s.lr_warmup_steps} is more than {n['steps']} {s.steps}"
        )
    check_number(n["weight_decay"], s.weight_decay, 0.0, 10.0)
    check_number(n["max_grad_norm"], s.max_grad_norm, 0.0, 1e6, hint=" (0 = no clipping)")
    check_int(n["gradient_accumulation_steps"], s.gradient_accumulation_steps, 1, 4096)
    check_bool(n["gradient_checkpointing"], s.gradient_checkpointing)
    _optional_number(n, "min_snr_gamma", s.min_snr_gamma, 1e-6, 1e6)
    _optional_number(n, "noise_offset", s.noise_offset, 0.0, 10.0)
    check_int(n["seed"], s.seed, 0, MAX_SEED)


def _check_resolution(s: TrainSettings, n: dict[str, str]) -> None:
    size = s.resolution
    if not isinstance(size, tuple) or len(size) != 2:
        raise SettingError(f"{n['resolution']} must be (width, height), got {size!r}")
    step = check_int(n["bucket_reso_steps"], s.bucket_reso_steps, 8, 1024)
    if step % 8:
        raise SettingError(f"{n['bucket_reso_steps']} must be a multiple of 8, got {step}")
    for side in size:
        check_int(n["resolution"], side, step, MAX_RESOLUTION)
        if side % step:
            raise SettingError(
                f"{n['resolution']} {size[0]}x{size[1]}: each side must be a multiple of "
                f"{n['bucket_reso_steps']} {step}, got {side}"
            )
    _optional_int(n, "min_bucket_reso", s.min_bucket_reso, step, MAX_RESOLUTION)
    _optional_int(n, "max_bucket_reso", s.max_bucket_reso, step, MAX_RESOLUTION)
    low, high = s.bucket_limits
    if min(size) < low or max(size) > high:
        raise SettingError(
            f"{n['resolution']} {size[0]}x{size[1]} must lie within the bucket limits "
            f"{low}..{high} ({n['min_bucket_reso']} / {n['max_bucket_reso']})"
        )
    check_bool(n["enable_bucket"], s.enable_bucket)
    check_bool(n["bucket_no_upscale"], s.bucket_no_upscale)
    check_int(n["batch_size"], s.batch_size, 1, MAX_BATCH_SIZE)


def _check_captions(s: TrainSettings, n: dict[str, str]) -> None:
    check_bool(n["shuffle_caption"], s.shuffle_caption)
    check_int(n["keep_tokens"], s.keep_tokens, 0, 1000)
    check_number(n["caption_dropout_rate"], s.caption_dropout_rate, 0.0, 1.0)
    check_number(n["caption_tag_dropout_rate"], s.caption_tag_dropout_rate, 0.0, 1.0)
    if not isinstance(s.caption_separator, str) or not s.caption_separator:
        raise SettingError(f"{n['caption_separator']} must be a non-empty string")
    exts = s.caption_extensions
    if not exts or not all(isinstance(e, str) and e.startswith(".") and len(e) > 1 for e in exts):
        raise SettingError(f"{n['caption_extensions']} must be suffixes like '.txt', got {exts!r}")
    check_bool(n["flip_aug"], s.flip_aug)
    check_bool(n["cache_latents"], s.cache_latents)


def _check_outputs(s: TrainSettings, n: dict[str, str]) -> None:
    if s.output is not None and Path(s.output).suffix.lower() != ".safetensors":
        raise SettingError(f"{n['output']} {str(s.output)!r}: a LoRA is written as .safetensors")
    _optional_int(n, "save_every", s.save_every, 1, MAX_STEPS)
    _optional_int(n, "save_every_epochs", s.save_every_epochs, 1, MAX_STEPS)
    if s.output is None and (s.save_every or s.save_every_epochs or s.sample_prompts):
        raise SettingError(
            f"{n['save_every']} / {n['sample_prompts']} write files next to the output: "
            f"give {n['output']}"
        )
    if s.resume is not None and not Path(s.resume).is_file():
        raise SettingError(f"{n['resume']} {str(s.resume)!r}: no such training state file")
    _optional_int(n, "sample_every", s.sample_every, 1, MAX_STEPS)
    check_int(n["sample_steps"], s.sample_steps, 1, 1000)
    check_number(n["sample_cfg"], s.sample_cfg, 0.0, 100.0)
    _optional_int(n, "sample_seed", s.sample_seed, 0, MAX_SEED)
    for prompt in s.sample_prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise SettingError(f"{n['sample_prompts']}: an empty prompt, got {prompt!r}")
    if s.sample_prompts:
        from sdstack.generate.samplers import UnknownSamplerError, resolve_sampler

        try:
            resolve_sampler(s.sample_sampler)
        except UnknownSamplerError as error:
            raise UnknownTrainOptionError(f"{n['sample_sampler']}: {error}") from None


def check_train_settings(
    settings: TrainSettings, names: dict[str, str] | None = None
) -> TrainSettings:
    """Check every field before any work; returns the settings with names made canonical.

    Args:
        settings: the run.
        names: field -> the name used in messages (the CLI passes ``--steps`` ...).

    Raises:
        SettingError: a value of the wrong type or out of range (named, with the range),
            steps together with epochs, warm-up with ``constant``, conv options with
            ``lora``, nothing to train, save/sample options without an output, a resume
            file that does not exist.
        UnknownTrainOptionError: unknown schedule, network, precision (nearest names).
    """
    n = {**_NAMES, **(names or {})}
    canonical = {
        "network": _named(NETWORK_TYPES, n, "network", settings.network),
        "lr_scheduler": _named(LR_SCHEDULERS, n, "lr_scheduler", settings.lr_scheduler),
        "mixed_precision": _named(MIXED_PRECISIONS, n, "mixed_precision", settings.mixed_precision),
        "save_precision": _named(SAVE_PRECISIONS, n, "save_precision", settings.save_precision),
    }
    settings = replace(settings, **canonical)
    _check_network(settings, n)
    _check_length(settings, n)
    _check_resolution(settings, n)
    _check_captions(settings, n)
    _check_outputs(settings, n)
    if not isinstance(settings.device, str) or not settings.device:
        raise SettingError(f"{n['device']} must be a device name like cpu or cuda")
    return settings


def learning_rate_factor(settings: TrainSettings, step: int, total: int) -> float:
    """The schedule's multiplier of the base learning rate at optimizer step ``step``.

    diffusers/transformers schedules as kohya uses them (``step`` 0-based, ``w`` warm-up
    steps, ``T`` total): warm-up ``step / w`` for ``step < w``; then ``constant*`` 1,
    ``cosine`` ``0.5 * (1 + cos(pi * (step - w) / (T - w)))``.
    """
    warmup = settings.lr_warmup_steps
    if step < warmup:
        return step / max(1, warmup)
    if settings.lr_scheduler != "cosine":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
