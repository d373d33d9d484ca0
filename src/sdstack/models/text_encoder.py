"""The SD1.x CLIP text encoder from a state dict, a diffusers folder or a safetensors file.

Checkpoints name the same tensors in four layouts; each key is read after stripping the
first prefix (longest first) that it starts with:

====================================================  ==========================================
prefix                                                where it occurs
====================================================  ==========================================
``cond_stage_model.transformer.text_model.``          original single-file SD1.x checkpoints
``cond_stage_model.transformer.``                     single files saved with transformers < 4.22
``text_model.``                                       diffusers folders saved with transformers 4.x
(none)                                                diffusers folders saved with transformers 5.x
====================================================  ==========================================

transformers 4.x keeps the modules under ``CLIPTextModel.text_model``; 5.x puts
``embeddings``, ``encoder`` and ``final_layer_norm`` on the model itself. The loader adds
whichever prefix the installed version wants. ``position_ids`` buffers in a checkpoint are
ignored and rebuilt as ``arange(max_position_embeddings)`` (some merged checkpoints hold
rounded float position ids, which shift every token's position embedding).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdstack.errors import SdstackError

if TYPE_CHECKING:
    from sdstack.models.single_file import TensorFile

TEXT_KEY_PREFIXES = (
    "cond_stage_model.transformer.text_model.",
    "cond_stage_model.transformer.",
    "text_model.",
)
"""Prefixes stripped from state-dict keys, longest first."""

FULL_CHECKPOINT_PREFIX = "cond_stage_model."
"""When any key starts with this, the state dict is a full checkpoint: only these keys count."""

MODULE_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
"""Top-level modules of the CLIP text transformer."""

_CONFIG_ONLY_KEYS = frozenset(
    {"architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "model_type"}
)


class TextEncoderError(SdstackError):
    """A state dict or file that is not an SD1.x CLIP text encoder."""


def sd15_text_config() -> dict[str, Any]:
    """The packaged SD1.x text-encoder config (CLIP ViT-L/14 text model, 12 layers, width 768)."""
    path = resources.files("sdstack.models") / "configs" / "sd15" / "text_encoder" / "config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _strip_prefix(key: str) -> str:
    for prefix in TEXT_KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def normalize_text_encoder_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys of a text encoder in any known layout -> keys without prefix (transformers 5.x).

    A full checkpoint (some key starts with ``cond_stage_model.``) contributes only its
    ``cond_stage_model.`` keys. ``position_ids`` entries are dropped.

    Raises:
        TextEncoderError: two keys that mean the same tensor.
    """
    full = any(key.startswith(FULL_CHECKPOINT_PREFIX) for key in state_dict)
    result: dict[str, Any] = {}
    for key, value in state_dict.items():
        if full and not key.startswith(FULL_CHECKPOINT_PREFIX):
            continue
        name = _strip_prefix(key)
        if name.endswith("position_ids"):
            continue
        if name in result:
            raise TextEncoderError(
                f"state dict holds tensor {name!r} twice (key {key!r} and another prefix); "
                "expected one layout per file"
            )
        result[name] = value
    return result


def _build_meta(config: Mapping[str, Any] | None) -> Any:
    """A ``CLIPTextModel`` on the meta device from ``config`` (None = packaged SD1.x)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstack.models.assemble import check_config_counts

    values = sd15_text_config() if config is None else dict(config)
    check_config_counts(values, "text-encoder config")
    try:
        clip = CLIPTextConfig(**{k: v for k, v in values.items() if k not in _CONFIG_ONLY_KEYS})
        with torch.device("meta"):
            return CLIPTextModel(clip)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as error:
        raise TextEncoderError(f"not a valid CLIP text config: {error!s:.200}") from error


def _key_report(keys: list[str]) -> str:
    shown = ", ".join(f"{k!r:.80}" for k in sorted(keys)[:5])
    return f"{shown}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"


def _check_shapes(tensors: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    for key, value in tensors.items():
        want = tuple(expected[key].shape)
        if not isinstance(value, torch.Tensor):
            raise TextEncoderError(
                f"text-encoder key {key!r:.100} holds {type(value).__name__}, not a tensor"
            )
        if not value.is_floating_point():
            raise TextEncoderError(
                f"text-encoder tensor {key!r:.100} is {value.dtype}, expected floating point"
            )
        if tuple(value.shape) != want:
            raise TextEncoderError(
                f"text-encoder tensor {key!r} has shape {tuple(value.shape)}, expected {want} "
                "from the config; check that the config (width, vocabulary) matches the checkpoint"
            )


def _check_keys(found: set[str], expected: set[str]) -> None:
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if not found & expected:
        raise TextEncoderError(
            "state dict holds no CLIP text-encoder tensors: expected keys such as "
            "'cond_stage_model.transformer.text_model.embeddings.token_embedding.weight' or "
            f"'text_model.embeddings.token_embedding.weight'; got {_key_report(list(found))}"
        )
    if missing:
        raise TextEncoderError(
            f"text-encoder state dict is missing {_key_report(missing)}; "
            "check that the config (layers, width) matches the checkpoint"
        )
    if unexpected:
        raise TextEncoderError(
            f"text-encoder state dict has unexpected keys {_key_report(unexpected)}; "
            "expected only CLIP text-model tensors"
        )


def _default_dtype(state_dict: Mapping[str, Any]) -> torch.dtype:
    weight = state_dict.get("embeddings.token_embedding.weight")
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return torch.float32


def _converted(
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str | None,
    on_tensor: Callable[[], None] | None,
) -> dict[str, torch.Tensor]:
    """Each (shape-checked, floating) tensor cast to ``dtype`` and moved to ``device``."""
    prepared = {}
    for key, value in tensors.items():
        try:
            prepared[key] = value.to(device=device, dtype=dtype)
        except (RuntimeError, NotImplementedError, TypeError) as error:  # float4
            raise TextEncoderError(
                f"text-encoder tensor {key!r:.100} cannot be converted from {value.dtype} to "
                f"{dtype}: {error!s:.100}"
            ) from error
        if on_tensor is not None:
            on_tensor()
    return prepared


def build_text_encoder(
    state_dict: Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    on_tensor: Callable[[], None] | None = None,
) -> Any:
    """A ``transformers.CLIPTextModel`` built on the meta device and given these tensors.

    The module tree is created without allocating weights (``torch.device("meta")``), then
    ``load_state_dict(strict=True, assign=True)`` installs the checkpoint tensors themselves
    (cast to ``dtype``, moved to ``device``), so building costs no extra copy: tensors that
    already have that dtype and device are shared with ``state_dict``, not copied.

    Args:
        state_dict: tensors in any layout of the module docstring's table.
        config: a ``CLIPTextConfig`` dict; ``None`` = the packaged SD1.x config.
        dtype: floating-point dtype of the model; ``None`` = the dtype of the checkpoint's
            token embedding.
        device: where the tensors go; ``None`` = leave them where they are (CPU for files).
        on_tensor: called after each tensor is cast and moved (progress reporting).

    Returns:
        The model, in eval mode.

    Raises:
        TextEncoderError: no text-encoder keys, missing or unexpected keys (a few named),
            a tensor whose shape differs from the config's (checked before any tensor is
            converted), a config that is not a valid CLIP text config.
    """
    # 1. Normalise the key layout and pick dtype/device.
    tensors = normalize_text_encoder_keys(state_dict)
    dtype = _default_dtype(tensors) if dtype is None else dtype
    # 2. Build without allocating; compare keys and shapes with the model's own.
    model = _build_meta(config)
    layout = "text_model." if hasattr(model, "text_model") else ""
    expected = {
        key[len(layout) :]: value
        for key, value in model.state_dict().items()
        if key.startswith(layout) and not key.endswith("position_ids")
    }
    _check_keys(set(tensors), set(expected))
    _check_shapes(tensors, expected)
    # 3. Install the tensors (cast, moved) and rebuild the position ids.
    prepared = _converted(tensors, dtype, device, on_tensor)
    model.load_state_dict({layout + k: t for k, t in prepared.items()}, strict=False, assign=True)
    embeddings = model.text_model.embeddings if layout else model.embeddings
    positions = embeddings.position_embedding.weight.shape[0]
    target = embeddings.position_embedding.weight.device
    embeddings.position_ids = torch.arange(positions, device=target).expand((1, -1))
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise TextEncoderError(f"text encoder left without tensors for {_key_report(left)}")
    return model.eval()


def _read_all(source: TensorFile) -> dict[str, torch.Tensor]:
    with source:
        return {key: source.tensor(key) for key in source}


def load_text_encoder(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Any:
    """The CLIP text encoder of a diffusers folder or of a text-encoder-only weight file.

    ``path`` may be a diffusers model folder (its ``text_encoder/`` subfolder is used), a
    ``text_encoder`` folder itself (``config.json`` + ``model.safetensors``), or a single
    ``.safetensors``/``.bin`` file holding the text encoder in any key layout (a full
    single-file checkpoint contributes its ``cond_stage_model.`` tensors).

    Args:
        path: the folder or file.
        dtype: as in ``build_text_encoder``.
        device: as in ``build_text_encoder``.
        config: a ``CLIPTextConfig`` dict overriding the folder's ``config.json`` or, for a
            single file, the packaged SD1.x config.

    Raises:
        FileNotFoundError: the path, or the weights inside the folder, do not exist.
        CheckpointError: a truncated or corrupt weight file, or a pickle that needs more
            than tensors (refused, never run): read as ``sdstack.models.load_model`` does.
        TextEncoderError: the tensors are not an SD1.x CLIP text encoder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text encoder path {str(path)!r} does not exist")
    from sdstack.models.diffusers_folder import WEIGHT_NAMES, open_weights_in
    from sdstack.models.single_file import open_tensor_file

    if path.is_file():
        tensors = _read_all(open_tensor_file(path))
        return build_text_encoder(tensors, config=config, dtype=dtype, device=device)
    folder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    config_file = folder / "config.json"
    if config is None and config_file.is_file():
        from sdstack.models.assemble import read_json

        config = read_json(config_file)
    source = open_weights_in(folder, WEIGHT_NAMES["text_encoder"])
    if source is None:
        raise FileNotFoundError(
            f"no text-encoder weights in folder {str(folder)!r}: expected one of "
            f"{', '.join(WEIGHT_NAMES['text_encoder'])} (or a sharded *.safetensors.index.json)"
        )
    return build_text_encoder(_read_all(source), config=config, dtype=dtype, device=device)
