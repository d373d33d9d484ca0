"""SD1.x models saved in the diffusers folder layout.

::

    <folder>/unet/config.json           + diffusion_pytorch_model[.fp16].safetensors (or .bin,
    <folder>/vae/config.json              or a sharded *.safetensors.index.json)
    <folder>/text_encoder/config.json   + model[.fp16].safetensors (or pytorch_model.bin)
    <folder>/scheduler/scheduler_config.json   (optional; packaged SD1.x values otherwise)

``tokenizer/`` is ignored: the packaged SD1.x tokenizer is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdstack.models.assemble import read_json
from sdstack.models.detect import CheckpointError
from sdstack.models.single_file import TensorFile, open_tensor_file

WEIGHT_NAMES = {
    "unet": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ),
    "vae": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ),
    "text_encoder": (
        "model.safetensors",
        "model.fp16.safetensors",
        "pytorch_model.bin",
        "pytorch_model.fp16.bin",
    ),
}


def is_diffusers_folder(path: Path) -> bool:
    """A folder with ``model_index.json`` or a ``unet/config.json``."""
    return path.is_dir() and (
        (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()
    )


class ShardedFile(TensorFile):
    """Several weight files read as one (a sharded diffusers/transformers checkpoint)."""

    def __init__(self, path: Path, shards: list[TensorFile]) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        self._owner: dict[str, TensorFile] = {}
        for shard in shards:
            for key, shape in shard.items():
                shapes[key] = shape
                self._owner[key] = shard
        super().__init__(path, shapes)
        self._shards = shards

    def tensor(self, key: str) -> torch.Tensor:
        return self._owner[key].tensor(key)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def shard_files(index: Path) -> list[Path]:
    """The files a shard index's ``weight_map`` names, each checked to lie in its folder.

    A name must be relative, without ``..``, and must resolve (symlinks followed) to an
    existing file inside the index's folder: an index names its neighbours, never a file
    elsewhere on the machine.

    Raises:
        CheckpointError: no ``weight_map`` object of strings, a name outside the folder
            (absolute, ``..``, a symlink out), or a shard that does not exist.
    """
    folder = index.parent
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index}: corrupt shard index: expected a 'weight_map' object of tensor name -> "
            "shard file name"
        )
    root = folder.resolve()
    shards = []
    for name in sorted(set(weight_map.values())):
        try:
            candidate = folder / name
            inside = not Path(name).is_absolute() and ".." not in Path(name).parts
            inside = inside and candidate.resolve().is_relative_to(root)
            exists = candidate.is_file()
        except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops
            inside = exists = False
        if not inside:
            raise CheckpointError(
                f"{index}: shard index names {name!r:.120}, which is outside {folder}; a "
                "shard index may only name files in its own folder"
            )
        if not exists:
            raise CheckpointError(
                f"{index}: shard index names {name!r:.120}, which does not exist in {folder}"
            )
        shards.append(candidate)
    return shards


def open_weights_in(folder: Path, names: tuple[str, ...]) -> TensorFile | None:
    """The weights in one component folder: its sharded ``*.safetensors.index.json`` (shards
    checked by ``shard_files``), else the first of ``names`` that exists; ``None`` when
    there is neither.

    Raises:
        CheckpointError: a bad shard index, a corrupt/truncated weight file or a refused
            pickle.
    """
    for index in sorted(folder.glob("*.safetensors.index.json")):
        return ShardedFile(index, [open_tensor_file(shard) for shard in shard_files(index)])
    for name in names:
        if (folder / name).is_file():
            return open_tensor_file(folder / name)
    return None


def open_component_weights(folder: Path, part: str) -> TensorFile:
    """The weights of ``folder/part`` (first file found in ``WEIGHT_NAMES[part]``, or shards).

    Raises:
        CheckpointError: no weight file in the component folder.
    """
    source = open_weights_in(folder / part, WEIGHT_NAMES[part])
    if source is not None:
        return source
    raise CheckpointError(
        f"{folder}: diffusers folder without {part} weights: expected {part}/ to hold one of "
        f"{', '.join(WEIGHT_NAMES[part])}"
    )


def component_config(folder: Path, part: str) -> dict[str, Any]:
    """``folder/part/config.json``; ``CheckpointError`` when it is missing."""
    path = folder / part / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: diffusers folder without {part}/config.json")
    return read_json(path)


def check_sd1_unet_config(folder: Path, config: dict[str, Any]) -> None:
    """Refuse SDXL/SD2/inpainting/pix2pix UNet configs with what they look like."""
    width = config.get("cross_attention_dim")
    channels = config.get("in_channels")
    kind = None
    if config.get("addition_embed_type") == "text_time":
        kind = "an SDXL model (addition_embed_type 'text_time')"
    elif width == 1024:
        kind = "an SD 2.x model (cross_attention_dim 1024)"
    elif channels == 9:
        kind = "an SD1.x inpainting model (in_channels 9)"
    elif channels == 8:
        kind = "an instruct-pix2pix model (in_channels 8)"
    elif channels != 4:
        kind = f"an unknown UNet (in_channels {channels!r}, SD1.x has 4)"
    if kind is not None:
        raise CheckpointError(
            f"{folder}: cannot load as an SD1.x model: this looks like {kind}; "
            "expected an SD1.x text-to-image diffusers folder"
        )


def scheduler_config_of(folder: Path) -> dict[str, Any] | None:
    """``folder/scheduler/scheduler_config.json`` without ``_``-keys, or ``None``."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    return {k: v for k, v in read_json(path).items() if not k.startswith("_")}
