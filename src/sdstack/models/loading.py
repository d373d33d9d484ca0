"""``load_model``: an SD1.x checkpoint file or diffusers folder -> ``ModelComponents``.

Single files (``.safetensors``, or ``.ckpt``/``.pt`` through a weights-only unpickler) hold
the original LDM layout; ``key_map.ldm`` maps it to diffusers' module names. Each network is
built on the meta device from its config (the packaged SD1.5 configs, or those in
``config_dir``) and receives the file's tensors by assignment (``assemble``); every shape is
checked against the config before any tensor is converted. Each network gets its own dtype
(``ComponentDtypes``; ``"auto"`` picks them per device, ``precision.auto_dtypes``), and
each tensor is converted on its own from the file's dtype straight to its network's (an
fp16 file loaded for bf16 never exists as fp32). ``progress(done, total)`` counts the
tensors handed to the three networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdstack.models.assemble import (
    Fit,
    assign_tensors,
    build_meta,
    check_fit,
    expected_shapes,
    packaged_config,
    prepare_weight,
    read_json,
    read_mapped,
    resolve_device,
)
from sdstack.models.components import ModelComponents
from sdstack.models.detect import CONFIG_DIR_HINT, CheckpointError, check_sd1
from sdstack.models.diffusers_folder import (
    check_sd1_unet_config,
    component_config,
    is_diffusers_folder,
    open_component_weights,
    scheduler_config_of,
)
from sdstack.models.key_map.ldm import (
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    unet_key_map,
    vae_key_map,
)
from sdstack.models.layout import channels_last_default, use_channels_last
from sdstack.models.precision import ComponentDtypes, resolve_dtypes
from sdstack.models.single_file import TensorFile, open_tensor_file
from sdstack.models.streaming import ConvertingReader
from sdstack.models.vae_file import fill_vae, load_vae_weights

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``: tensors handed to the networks so far, out of all of them."""


@dataclass
class ModelConfigs:
    """The diffusers configs the networks are built from (``text`` None = packaged SD1.x).

    ``origin`` names them in messages; ``hint`` says what to do when a file does not fit;
    ``channels_last``: the UNet's and VAE's 4-D weights are read in channels-last order.
    """

    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any] | None
    scheduler: dict[str, Any]
    origin: str = "packaged SD1.5"
    hint: str | None = CONFIG_DIR_HINT
    channels_last: bool = False


class _Progress:
    """Calls ``progress(done, total)`` once at 0, then after every tensor (``step``)."""

    def __init__(self, progress: ProgressCallback, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        progress(0, total)

    def step(self) -> None:
        if self.done < self.total:
            self.done += 1
            self.progress(self.done, self.total)


def _counter(progress: ProgressCallback | None, total: int) -> Callable[[], None] | None:
    """``on_tensor`` for the readers: None (no overhead) without a ``progress``."""
    return None if progress is None else _Progress(progress, total).step


def _text_count(keys: Iterable[str]) -> int:
    """Tensors ``build_text_encoder`` will install (``position_ids`` are rebuilt)."""
    return sum(not key.endswith("position_ids") for key in keys)


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
    configs.origin, configs.hint = f"{folder} (config_dir)", None
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
    hint: str | None,
    on_tensor: Callable[[], None] | None,
) -> Any:
    from sdstack.models.text_encoder import build_text_encoder

    try:
        return build_text_encoder(
            tensors, config=config, dtype=dtype, device=device, on_tensor=on_tensor
        )
    except ValueError as error:
        raise CheckpointError(
            f"{path}: text encoder: {error}{f'; {hint}' if hint else ''}"
        ) from error


def _vae(
    source: TensorFile,
    vae: Any,
    vae_path: Path | None,
    configs: ModelConfigs,
    dtype: torch.dtype,
    device: torch.device,
    on_tensor: Callable[[], None] | None,
) -> Any:
    if vae_path is not None:
        return load_vae_weights(
            vae_path,
            vae,
            dtype,
            device,
            config=configs.origin,
            hint=configs.hint,
            on_tensor=on_tensor,
        )
    fit = Fit(expected_shapes(vae), configs.origin, configs.hint)
    rows = vae_key_map(vae)
    tensors = read_mapped(
        source, VAE_PREFIX, rows, dtype, device, "VAE", fit=fit, on_tensor=on_tensor,
        channels_last=configs.channels_last,
    )  # fmt: skip
    return assign_tensors(vae, tensors, source.path, "VAE")


def _read_all(
    source: TensorFile, keys: list[str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """``keys`` of ``source`` through a ``ConvertingReader`` (floating tensors converted
    one by one; the rest as stored, for ``build_text_encoder``'s checks)."""
    with ConvertingReader(source) as reader:
        return {key: reader.tensor(key, dtype, device) for key in keys}


def load_single_file(
    path: Path,
    vae_path: Path | None,
    configs: ModelConfigs,
    dtypes: ComponentDtypes,
    device: torch.device,
    progress: ProgressCallback | None = None,
) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) from an LDM-layout single-file checkpoint, each network
    in its ``dtypes`` entry."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with open_tensor_file(path) as source:
        # 1. Refuse other architectures from key names and shapes alone.
        check_sd1(path, source, configs.unet.get("cross_attention_dim", 768), configs.hint)
        # 2. Build the networks on the meta device; count the tensors they will take.
        unet = build_meta(UNet2DConditionModel, configs.unet, f"{configs.origin} UNet")
        vae = build_meta(AutoencoderKL, configs.vae, f"{configs.origin} VAE")
        unet_rows, vae_rows = unet_key_map(unet), vae_key_map(vae)
        text_keys = [key for key in source if key.startswith(TEXT_PREFIX)]
        tick = _counter(progress, len(unet_rows) + len(vae_rows) + _text_count(text_keys))
        # 3. UNet: shapes checked, LDM -> diffusers names, assign.
        fit = Fit(expected_shapes(unet), configs.origin, configs.hint)
        tensors = read_mapped(
            source, UNET_PREFIX, unet_rows, dtypes.unet, device, "UNet", fit=fit,
            on_tensor=tick, channels_last=configs.channels_last,
        )  # fmt: skip
        unet = assign_tensors(unet, tensors, path, "UNet")
        # 4. VAE from the checkpoint or the separate file.
        vae = _vae(source, vae, vae_path, configs, dtypes.vae, device, tick)
        # 5. Text encoder (key layouts handled by build_text_encoder).
        text = _read_all(source, text_keys, dtypes.text_encoder, device)
        text_encoder = _text_encoder(
            text, path, configs.text, dtypes.text_encoder, device, configs.hint, tick
        )
    return unet, vae, text_encoder


def load_folder(
    folder: Path,
    vae_path: Path | None,
    dtypes: ComponentDtypes,
    device: torch.device,
    progress: ProgressCallback | None = None,
    channels_last: bool = False,
) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) from a diffusers-layout folder (its own configs), each
    network in its ``dtypes`` entry (UNet 4-D weights channels-last with ``channels_last``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_config = component_config(folder, "unet")
    check_sd1_unet_config(folder, unet_config)
    unet = build_meta(UNet2DConditionModel, unet_config, folder / "unet" / "config.json")
    vae_config = component_config(folder, "vae")
    vae = build_meta(AutoencoderKL, vae_config, folder / "vae" / "config.json")
    text_config = component_config(folder, "text_encoder")
    origin, hint = f"{folder}'s", "the folder's config.json files do not match its weights"
    with (
        open_component_weights(folder, "unet") as unet_source,
        open_component_weights(folder, "text_encoder") as text_source,
    ):
        vae_count = len(expected_shapes(vae))
        tick = _counter(progress, len(unet_source) + vae_count + _text_count(text_source))
        # 1. UNet: shapes checked against the folder's config before any tensor is read.
        check_fit(unet_source.path, "UNet", unet_source, Fit(expected_shapes(unet), origin, hint))
        tensors = {}
        with ConvertingReader(unet_source, channels_last=channels_last) as reader:
            for key in unet_source:
                tensor = reader.tensor(key, dtypes.unet, device)
                tensors[key] = prepare_weight(tensor, dtypes.unet, device, unet_source.path, key)
                if tick is not None:
                    tick()
        unet = assign_tensors(unet, tensors, unet_source.path, "UNet")
        # 2. VAE: the separate file or the folder's.
        if vae_path is not None:
            vae = load_vae_weights(vae_path, vae, dtypes.vae, device, config=origin, on_tensor=tick)
        else:
            with open_component_weights(folder, "vae") as source:
                vae = fill_vae(
                    source, vae, dtypes.vae, device, config=origin, hint=hint, on_tensor=tick
                )
        # 3. Text encoder.
        text = _read_all(text_source, list(text_source), dtypes.text_encoder, device)
        text_encoder = _text_encoder(
            text, text_source.path, text_config, dtypes.text_encoder, device, None, tick
        )
    return unet, vae, text_encoder


def load_model(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    dtype: str | torch.dtype | ComponentDtypes = "fp32",
    device: str | torch.device = "cpu",
    config_dir: str | Path | None = None,
    progress: ProgressCallback | None = None,
    channels_last: bool | None = None,
) -> ModelComponents:
    """Load an SD1.x model the way the reference UI does: single file or diffusers folder.

    Args:
        path: ``.safetensors`` / ``.ckpt`` / ``.pt`` single-file checkpoint (LDM keys), or a
            diffusers folder (``unet/``, ``vae/``, ``text_encoder/``).
        vae: a separate VAE file replacing the model's own (LDM keys with or without the
            ``first_stage_model.`` prefix, or diffusers keys).
        dtype: ``"auto"`` (a dtype per network for ``device``: ``precision.auto_dtypes``),
            ``"fp32"``, ``"fp16"``, ``"bf16"`` or a floating ``torch.dtype`` (every network
            in it), or a ``ComponentDtypes`` (UNet, text encoder, VAE). Default fp32.
        device: ``"cpu"``, ``"cuda"`` (``"cuda:N"``) or ``"mps"``.
        config_dir: a diffusers-layout folder whose ``unet``/``vae``/``text_encoder``
            ``config.json`` (and ``scheduler/scheduler_config.json``) replace the packaged
            SD1.5 configs for a single-file checkpoint.
        progress: called as ``progress(done, total)`` in tensors: once with ``done = 0``
            when the networks are built and the total is known, then after each tensor is
            handed over (cast and moved when needed), ending at ``done == total``. None
            (default) costs nothing.
        channels_last: put the UNet and VAE weights in channels-last memory order
            (``layout.use_channels_last``); None = where it measured faster
            (``layout.channels_last_default``). Results agree up to float rounding.

    Returns:
        ``ModelComponents`` with ``name`` = the file stem (folder name), ``path``,
        ``vae_path``, the packaged tokenizer and the scheduler config; ``dtypes`` says
        the dtype of each network.

    Raises:
        FileNotFoundError: ``path``, ``vae`` or ``config_dir`` does not exist.
        ValueError: unknown ``dtype`` or unavailable ``device``.
        CheckpointError: not an SD1.x model (says what it looks like), corrupt or
            truncated file, refused pickle, missing tensors, shapes that do not fit the
            configs (suggesting ``config_dir``).
    """
    from sdstack.prompt.tokenizer import load_tokenizer

    # 1. Check the arguments.
    torch_device = resolve_device(device)
    dtypes = resolve_dtypes(dtype, torch_device)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    vae_path = None if vae is None else Path(vae)
    if vae_path is not None and not vae_path.is_file():
        raise FileNotFoundError(f"VAE file not found: {vae_path}")
    configs = model_configs(config_dir)
    if channels_last is None:
        channels_last = channels_last_default(torch_device)
    configs.channels_last = channels_last
    # 2. Build and fill the three networks (4-D weights re-laid as they are read).
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(
                f"{path}: a folder but not a diffusers model (no model_index.json or "
                "unet/config.json); expected a checkpoint file or a diffusers folder"
            )
        configs.scheduler = scheduler_config_of(path) or configs.scheduler
        unet, vae_model, text_encoder = load_folder(
            path, vae_path, dtypes, torch_device, progress, channels_last
        )
    else:
        unet, vae_model, text_encoder = load_single_file(
            path, vae_path, configs, dtypes, torch_device, progress
        )
    # 3. Assemble.
    components = ModelComponents(
        unet=unet,
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(),
        scheduler_config=dict(configs.scheduler),
        name=path.stem if path.is_file() else path.name,
        path=path,
        vae_path=vae_path,
    )
    # 4. Memory layout of what the readers left (a separate VAE file, a folder's VAE).
    return use_channels_last(components, channels_last)
