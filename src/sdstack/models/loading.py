"""``load_model``: an SD1.x checkpoint file or diffusers folder -> ``ModelComponents``.

Single files (``.safetensors``, or ``.ckpt``/``.pt`` through a weights-only unpickler) hold
the original LDM layout; ``ldm_keys`` maps it to diffusers' module names. Each network is
built on the meta device from its config (the packaged SD1.5 configs, or those in
``config_dir``) and receives the file's tensors by assignment (``assemble``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdstack.models.assemble import (
    assign_tensors,
    build_meta,
    packaged_config,
    prepare_tensor,
    read_json,
    read_mapped,
    resolve_device,
    resolve_dtype,
)
from sdstack.models.components import ModelComponents
from sdstack.models.detect import CheckpointError, check_sd1
from sdstack.models.diffusers_folder import (
    check_sd1_unet_config,
    component_config,
    is_diffusers_folder,
    open_component_weights,
    scheduler_config_of,
)
from sdstack.models.ldm_keys import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, unet_key_map, vae_key_map
from sdstack.models.single_file import TensorFile, open_tensor_file
from sdstack.models.vae_file import fill_vae, load_vae_weights


@dataclass
class ModelConfigs:
    """The diffusers configs the networks are built from (``text`` None = packaged SD1.x)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any] | None
    scheduler: dict[str, Any]


def model_configs(config_dir: str | Path | None) -> ModelConfigs:
    """Packaged SD1.5 configs, each replaced by ``config_dir/<part>/config.json`` if present.

    Raises:
        FileNotFoundError: ``config_dir`` is given but is not a folder.
    """
    packaged_scheduler = packaged_config("scheduler/scheduler_config.json")
    configs = ModelConfigs(
        unet=packaged_config("unet/config.json"),
        vae=packaged_config("vae/config.json"),
        text=None,
        scheduler={k: v for k, v in packaged_scheduler.items() if not k.startswith("_")},
    )
    if config_dir is None:
        return configs
    folder = Path(config_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"config_dir: folder not found: {folder}")
    for part in ("unet", "vae", "text_encoder"):
        path = folder / part / "config.json"
        if path.is_file():
            setattr(configs, "text" if part == "text_encoder" else part, read_json(path))
    configs.scheduler = scheduler_config_of(folder) or configs.scheduler
    return configs


def _text_encoder(
    tensors: dict[str, torch.Tensor],
    path: Path,
    config: dict[str, Any] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Any:
    from sdstack.models.text_encoder import build_text_encoder

    try:
        return build_text_encoder(tensors, config=config, dtype=dtype, device=device)
    except ValueError as error:
        raise CheckpointError(f"{path}: text encoder: {error}") from error


def _vae(
    source: TensorFile,
    vae_path: Path | None,
    configs: ModelConfigs,
    dtype: torch.dtype,
    device: torch.device,
) -> Any:
    from diffusers import AutoencoderKL

    vae = build_meta(AutoencoderKL, configs.vae)
    if vae_path is not None:
        return load_vae_weights(vae_path, vae, dtype, device)
    tensors = read_mapped(source, VAE_PREFIX, vae_key_map(vae), dtype, device, "VAE")
    return assign_tensors(vae, tensors, source.path, "VAE")


def load_single_file(
    path: Path,
    vae_path: Path | None,
    configs: ModelConfigs,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) from an LDM-layout single-file checkpoint."""
    from diffusers import UNet2DConditionModel

    with open_tensor_file(path) as source:
        # 1. Refuse other architectures from key names and shapes alone.
        check_sd1(path, source, configs.unet.get("cross_attention_dim", 768))
        # 2. UNet: meta build, LDM -> diffusers names, assign.
        unet = build_meta(UNet2DConditionModel, configs.unet)
        tensors = read_mapped(source, UNET_PREFIX, unet_key_map(unet), dtype, device, "UNet")
        unet = assign_tensors(unet, tensors, path, "UNet")
        # 3. VAE from the checkpoint or the separate file.
        vae = _vae(source, vae_path, configs, dtype, device)
        # 4. Text encoder (key layouts handled by build_text_encoder).
        text = {key: source.tensor(key) for key in source if key.startswith(TEXT_PREFIX)}
        text_encoder = _text_encoder(text, path, configs.text, dtype, device)
    return unet, vae, text_encoder


def load_folder(
    folder: Path, vae_path: Path | None, dtype: torch.dtype, device: torch.device
) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) from a diffusers-layout folder (its own configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = component_config(folder, "unet")
    check_sd1_unet_config(folder, unet_config)
    unet = build_meta(UNet2DConditionModel, unet_config)
    with open_component_weights(folder, "unet") as source:
        tensors = {key: prepare_tensor(source.tensor(key), dtype, device) for key in source}
    unet = assign_tensors(unet, tensors, source.path, "UNet")
    vae = build_meta(AutoencoderKL, component_config(folder, "vae"))
    if vae_path is not None:
        vae = load_vae_weights(vae_path, vae, dtype, device)
    else:
        with open_component_weights(folder, "vae") as source:
            vae = fill_vae(source, vae, dtype, device)
    with open_component_weights(folder, "text_encoder") as source:
        text = {key: source.tensor(key) for key in source}
    text_encoder = _text_encoder(
        text, source.path, component_config(folder, "text_encoder"), dtype, device
    )
    return unet, vae, text_encoder


def load_model(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    config_dir: str | Path | None = None,
) -> ModelComponents:
    """Load an SD1.x model the way the reference UI does: single file or diffusers folder.

    Args:
        path: ``.safetensors`` / ``.ckpt`` / ``.pt`` single-file checkpoint (LDM keys), or a
            diffusers folder (``unet/``, ``vae/``, ``text_encoder/``).
        vae: a separate VAE file replacing the model's own (LDM keys with or without the
            ``first_stage_model.`` prefix, or diffusers keys).
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` or a floating ``torch.dtype``.
        device: ``"cpu"``, ``"cuda"`` (``"cuda:N"``) or ``"mps"``.
        config_dir: a diffusers-layout folder whose ``unet``/``vae``/``text_encoder``
            ``config.json`` (and ``scheduler/scheduler_config.json``) replace the packaged
            SD1.5 configs for a single-file checkpoint.

    Returns:
        ``ModelComponents`` with ``name`` = the file stem (folder name), ``path``,
        ``vae_path``, the packaged tokenizer and the scheduler config.

    Raises:
        FileNotFoundError: ``path``, ``vae`` or ``config_dir`` does not exist.
        ValueError: unknown ``dtype`` or unavailable ``device``.
        CheckpointError: not an SD1.x model (says what it looks like), corrupt or
            truncated file, refused pickle, missing tensors.
    """
    from sdstack.prompt.tokenizer import load_tokenizer

    # 1. Check the arguments.
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    vae_path = None if vae is None else Path(vae)
    if vae_path is not None and not vae_path.is_file():
        raise FileNotFoundError(f"VAE file not found: {vae_path}")
    configs = model_configs(config_dir)
    # 2. Build and fill the three networks.
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(
                f"{path}: a folder but not a diffusers model (no model_index.json or "
                "unet/config.json); expected a checkpoint file or a diffusers folder"
            )
        configs.scheduler = scheduler_config_of(path) or configs.scheduler
        unet, vae_model, text_encoder = load_folder(path, vae_path, torch_dtype, torch_device)
    else:
        unet, vae_model, text_encoder = load_single_file(
            path, vae_path, configs, torch_dtype, torch_device
        )
    # 3. Assemble.
    return ModelComponents(
        unet=unet,
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(),
        scheduler_config=dict(configs.scheduler),
        name=path.stem if path.is_file() else path.name,
        path=path,
        vae_path=vae_path,
    )
