"""kohya sd-scripts' ``ss_*`` training metadata (``train_network.py``), every value ``str()``-ed.

:func:`training_metadata` is what kohya writes once at the start of a run (folder mode:
no dataset config): the run, network, model, noise and caption settings, the dataset
counts, ``ss_dataset_dirs`` / ``ss_tag_frequency`` / ``ss_bucket_info`` as JSON, and the
model's identity (``ss_sd_model_name``; ``ss_sd_model_hash`` = the legacy 8-hex hash and
``ss_new_sd_model_hash`` = the full-file sha256 when the model is a file; the same three
for a separate VAE). :func:`save_metadata` adds what kohya adds at each save
(``ss_training_finished_at``, ``ss_steps``, ``ss_epoch``) and the SAI model-spec keys
(``modelspec.*``, ``modelspec.encoder_layer`` = the clip skip). Values follow kohya's
types: a float option is written as Python writes a float (``"8.0"``), an unset one as
``"None"``, a flag as ``"True"``/``"False"``. Options sdstack does not have are written
with kohya's defaults, so readers that expect the full key set find it.

Nothing here imports torch.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError

NETWORK_MODULE = "networks.lora"
BASE_MODEL_VERSION = "sd_v1"
ADAMW = "torch.optim.adamw.AdamW"
"""kohya's ``ss_optimizer``: ``optimizer_class.__module__ + "." + __name__``."""
TORCH_ADAMW_WEIGHT_DECAY = 0.01
SD_SCRIPTS_COMMIT = "(unknown)"
"""``ss_sd_scripts_commit_hash``: kohya's value when it is not run from a git checkout."""
MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)
"""kohya's ``SS_METADATA_MINIMUM_KEYS`` (what ``--no_metadata`` keeps)."""

# Options kohya records that sdstack does not offer, at kohya's defaults.
KOHYA_DEFAULTS: dict[str, object] = {
    "ss_num_validation_images": 0,
    "ss_num_reg_images": 0,
    "ss_network_dropout": None,
    "ss_full_fp16": False,
    "ss_v2": False,
    "ss_max_token_length": None,
    "ss_lowram": False,
    "ss_multires_noise_iterations": None,
    "ss_multires_noise_discount": 0.3,
    "ss_adaptive_noise_scale": None,
    "ss_zero_terminal_snr": False,
    "ss_sd_scripts_commit_hash": SD_SCRIPTS_COMMIT,
    "ss_caption_dropout_every_n_epochs": 0,
    "ss_face_crop_aug_range": None,
    "ss_prior_loss_weight": 1.0,
    "ss_scale_weight_norms": None,
    "ss_ip_noise_gamma": None,
    "ss_debiased_estimation": False,
    "ss_noise_offset_random_strength": False,
    "ss_ip_noise_gamma_random_strength": False,
    "ss_loss_type": "l2",
    "ss_huber_schedule": "snr",
    "ss_huber_scale": 1.0,
    "ss_huber_c": 0.1,
    "ss_fp8_base": False,
    "ss_fp8_base_unet": False,
    "ss_validation_seed": None,
    "ss_validation_split": 0.0,
    "ss_max_validation_steps": None,
    "ss_validate_every_n_epochs": None,
    "ss_validate_every_n_steps": None,
    "ss_resize_interpolation": None,
    "ss_color_aug": False,
    "ss_random_crop": False,
}


class TrainMetadataError(SdstackError):
    """Metadata that cannot be made: a count that is not a whole number >= 0."""


def _float(value: float | None) -> float | None:
    """kohya's float options (``type=float``) print as floats: 8 -> "8.0"."""
    return None if value is None else float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TrainMetadataError(f"training metadata: {name} is {value!r}; expected an int >= 0")
    return value


def optimizer_name(weight_decay: float = TORCH_ADAMW_WEIGHT_DECAY) -> str:
    """kohya's ``ss_optimizer`` for AdamW: the class path, plus ``(weight_decay=x)`` as
    kohya appends the optimizer args when they are not torch's default."""
    if float(weight_decay) == TORCH_ADAMW_WEIGHT_DECAY:
        return ADAMW
    return f"{ADAMW}(weight_decay={weight_decay})"


def _run_keys(settings: Any, counts: Mapping[str, int]) -> dict[str, object]:
    """The run: learning rates, counts, schedule, precision, noise, seed."""
    return {
        "ss_output_name": settings.output_name,
        "ss_learning_rate": _float(settings.learning_rate),
        "ss_text_encoder_lr": _float(settings.text_encoder_lr),
        "ss_unet_lr": _float(settings.unet_lr),
        "ss_num_batches_per_epoch": counts["num_batches_per_epoch"],
        "ss_num_epochs": counts["num_epochs"],
        "ss_gradient_checkpointing": bool(settings.gradient_checkpointing),
        "ss_gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "ss_max_train_steps": counts["max_train_steps"],
        "ss_lr_warmup_steps": settings.lr_warmup_steps,
        "ss_lr_scheduler": settings.lr_scheduler,
        "ss_mixed_precision": settings.mixed_precision,
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_clip_skip": settings.clip_skip,
        "ss_cache_latents": bool(settings.cache_latents),
        "ss_seed": settings.seed,
        "ss_noise_offset": _float(settings.noise_offset),
        "ss_training_comment": settings.training_comment,
        "ss_optimizer": optimizer_name(settings.weight_decay),
        "ss_max_grad_norm": _float(settings.max_grad_norm),
        "ss_caption_dropout_rate": _float(settings.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": _float(settings.caption_tag_dropout_rate),
        "ss_min_snr_gamma": _float(settings.min_snr_gamma),
    }


def _network_keys(settings: Any, network_args: Mapping[str, str] | None) -> dict[str, object]:
    """``ss_network_*``; ``ss_network_args`` only when there are arguments (LoCon's
    ``conv_dim``/``conv_alpha``), as kohya writes it."""
    keys: dict[str, object] = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": settings.rank,
        "ss_network_alpha": _float(settings.alpha),
    }
    if network_args is None and settings.network == "locon":
        conv_rank = settings.rank if settings.conv_rank is None else settings.conv_rank
        conv_alpha = 1.0 if settings.conv_alpha is None else settings.conv_alpha
        network_args = {"conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"}
    if network_args:
        keys["ss_network_args"] = json.dumps(dict(network_args))
    return keys


def _dataset_keys(settings: Any, data: Any, bucket_info: Any) -> dict[str, object]:
    """Folder mode: batch sizes, resolution, augmentation, buckets, and the dataset JSON."""
    low, high = settings.bucket_limits
    width, height = settings.resolution
    return {
        "ss_num_train_images": data.num_train_images,
        "ss_batch_size_per_device": settings.batch_size,
        "ss_total_batch_size": settings.batch_size * settings.gradient_accumulation_steps,
        "ss_resolution": str((int(width), int(height))),
        "ss_flip_aug": bool(settings.flip_aug),
        "ss_shuffle_caption": bool(settings.shuffle_caption),
        "ss_enable_bucket": bool(settings.enable_bucket),
        "ss_bucket_no_upscale": bool(settings.bucket_no_upscale),
        "ss_min_bucket_reso": low,
        "ss_max_bucket_reso": high,
        "ss_keep_tokens": settings.keep_tokens,
        "ss_dataset_dirs": json.dumps(data.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps(data.tag_frequency),
        "ss_bucket_info": json.dumps(bucket_info),
    }


def model_identity(path: str | os.PathLike[str] | None, prefix: str = "sd_model") -> dict[str, str]:
    """``ss_<prefix>_name`` (the basename of a path, else the name given) and, only when
    ``path`` is a file, ``ss_<prefix>_hash`` (legacy 8-hex: sha256 of 0x10000 bytes at
    0x100000) and ``ss_new_<prefix>_hash`` (sha256 of the whole file, cached)."""
    if path is None:
        return {}
    from sdstack.models.hashes import file_sha256, legacy_model_hash

    keys = {f"ss_{prefix}_name": os.path.basename(os.fspath(path).rstrip("/\\")) or str(path)}
    if Path(path).is_file():
        keys[f"ss_{prefix}_hash"] = legacy_model_hash(path)
        keys[f"ss_new_{prefix}_hash"] = file_sha256(path)
    return keys


def training_metadata(
    settings: Any,
    data: Any,
    *,
    num_batches_per_epoch: int,
    max_train_steps: int,
    num_epochs: int,
    bucket_info: Mapping[str, Any] | None = None,
    model: str | os.PathLike[str] | None = None,
    vae: str | os.PathLike[str] | None = None,
    network_args: Mapping[str, str] | None = None,
    session_id: int | None = None,
    training_started_at: float | None = None,
) -> dict[str, str]:
    """kohya ``train_network.py``'s ``ss_*`` metadata of a folder-mode run, ``str()``-ed.

    Args:
        settings: the run (``sdstack.train.settings.TrainSettings``, checked).
        data: the scanned folder (``sdstack.train.dataset.TrainingData``):
            ``num_train_images`` (with repeats), ``dataset_dirs``, ``tag_frequency``.
        num_batches_per_epoch, max_train_steps, num_epochs: the run's length.
        bucket_info: kohya's ``bucket_info`` (``sdstack.train.buckets.bucket_info``).
        model: the checkpoint path (hashed when it is a file) or the model's name.
        vae: a separate VAE file (``ss_vae_name``/``ss_vae_hash``/``ss_new_vae_hash``).
        network_args: ``ss_network_args`` (default: LoCon's ``conv_dim``/``conv_alpha``,
            nothing for LoRA); ``TrainableLora.network_args`` gives them.
        session_id: ``ss_session_id`` (default: a random int in 0..2**32, as kohya).
        training_started_at: ``ss_training_started_at`` (default: ``time.time()``).

    Returns:
        ``{key: str(value)}``, keys sorted.

    Raises:
        TrainMetadataError: a count that is not a whole number >= 0.
        FileNotFoundError, HashError: the model file vanished or is not a regular file.
    """
    counts = {
        "num_batches_per_epoch": _count("num_batches_per_epoch", num_batches_per_epoch),
        "max_train_steps": _count("max_train_steps", max_train_steps),
        "num_epochs": _count("num_epochs", num_epochs),
    }
    values: dict[str, object] = {
        "ss_session_id": secrets.randbelow(2**32 + 1) if session_id is None else session_id,
        "ss_training_started_at": time.time()
        if training_started_at is None
        else training_started_at,
        **KOHYA_DEFAULTS,
        **_run_keys(settings, counts),
        **_network_keys(settings, network_args),
        **_dataset_keys(settings, data, bucket_info),
        **model_identity(model, "sd_model"),
        **model_identity(vae, "vae"),
    }
    return {key: str(values[key]) for key in sorted(values)}


def save_metadata(
    metadata: Mapping[str, str],
    *,
    steps: int,
    epoch: int,
    finished_at: float | None = None,
) -> dict[str, str]:
    """What kohya adds at each save: ``ss_training_finished_at``, ``ss_steps``,
    ``ss_epoch`` and the SAI model spec (``modelspec.sai_model_spec`` 1.0.0,
    ``architecture`` ``stable-diffusion-v1/lora``, ``implementation`` ``diffusers``,
    ``title`` = ``ss_output_name``, ``resolution`` ``WxH``, ``date``, ``prediction_type``
    ``epsilon``, ``encoder_layer`` = ``ss_clip_skip`` when set).

    Returns:
        A new dict: ``metadata`` plus those keys.

    Raises:
        TrainMetadataError: steps or epoch not a whole number >= 0.
    """
    _count("steps", steps)
    _count("epoch", epoch)
    finished = time.time() if finished_at is None else finished_at
    out = dict(metadata)
    out["ss_training_finished_at"] = str(finished)
    out["ss_steps"] = str(steps)
    out["ss_epoch"] = str(epoch)
    out.update(model_spec(metadata, finished))
    return out


def model_spec(metadata: Mapping[str, str], timestamp: float) -> dict[str, str]:
    """The SAI model-spec keys of an SD1 LoRA (kohya's ``get_sai_model_spec``), from the
    ``ss_*`` values already in ``metadata``."""
    resolution = str(metadata.get("ss_resolution", "(512, 512)")).strip("()").split(",")
    width, height = (part.strip() for part in (resolution * 2)[:2])
    date = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": str(metadata.get("ss_output_name", "LoRA")),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": date.replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "epsilon",
    }
    clip_skip = str(metadata.get("ss_clip_skip", "None"))
    if clip_skip != "None":
        spec["modelspec.encoder_layer"] = clip_skip
    return spec
