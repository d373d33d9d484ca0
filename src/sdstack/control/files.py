"""Load SD1.x ControlNet files offline: the original ldm layout or diffusers', one file or a folder.

Inputs (reference extension ``controlnet_model_guess.py``, spec controlnet.md):

- a single ``.safetensors`` (only its header is read before the shapes are checked) or a
  weights-only ``.pth``/``.pt``/``.ckpt``/``.bin`` (``torch_file.load_torch_file``; a
  pickle that wants any code is refused) holding
  - ldm keys (``input_hint_block.0.weight`` present) with or without the
    ``control_model.`` prefix; when the prefix is present only those keys count, as the
    extension does (full v1.0 files also hold an SD model), or
  - diffusers keys (``controlnet_cond_embedding.conv_in.weight``);
- a diffusers folder: ``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``
  (or ``.bin``).

Single files are built from the packaged SD1.5 ControlNet config with the sizes the
tensors show (``control_config``), so any SD1-family ControlNet, the tiny test model
included, loads with no config; ``config_dir`` (a folder with ``config.json``) replaces
it. Every shape is checked before any tensor is read or converted. T2I-Adapters, SDXL and
SD2 ControlNets, Control-LoRAs, whole SD checkpoints, LoRAs and unknown files are refused
with what they look like.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstack.control.keys import (
    DIFFUSERS_HINT_KEY,
    LDM_HINT_KEY,
    ControlNetKeyError,
    context_width,
    control_config,
    ldm_names,
    strip_control_prefix,
)
from sdstack.control.names import KnownControlModel, known_control_model, model_stem
from sdstack.models.detect import SD1, SD1_CONTEXT_WIDTH, CheckpointError, detect_kind
from sdstack.models.key_map.ldm import UNET_PREFIX

FOLDER_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
CONFIG_HINT = "if it is an SD1.x-family ControlNet of other sizes, give its config with config_dir="


class ControlNetFileError(CheckpointError):
    """A file or folder that is not a loadable SD1.x ControlNet: says what it is instead."""


@dataclass(frozen=True)
class ControlFileInfo:
    """What ``identify_control_file`` found: the key layout ("ldm" or "diffusers"), the hint
    image channels (3 for every published model) and the cross-attention width (768)."""

    path: Path
    layout: str
    hint_channels: int
    context_dim: int


@dataclass
class LoadedControlNet:
    """A loaded ControlNet: the diffusers ``ControlNetModel`` (eval, no grad), its name (file
    stem, folder name), path, the reference's 8-hex legacy ``model_hash`` (the extension's
    label ``name [hash]``) and the published model it is, if recognised."""

    model: Any
    name: str
    path: Path
    short_hash: str
    known: KnownControlModel | None

    @property
    def label(self) -> str:
        """``name [hash]`` as the extension shows and writes it in infotext."""
        return f"{self.name} [{self.short_hash}]"


@contextmanager
def _as_control_error(path: Path) -> Iterator[None]:
    """Re-raise the loaders' errors as ``ControlNetFileError`` naming ``path``."""
    try:
        yield
    except ControlNetFileError:
        raise
    except ControlNetKeyError as error:
        raise ControlNetFileError(f"{path}: {error}") from error
    except CheckpointError as error:
        raise ControlNetFileError(str(error)) from error


def _foreign(
    every: Mapping[str, Sequence[int]], shapes: Mapping[str, Sequence[int]], hint: str | None
) -> str | None:
    """What a non-SD1 file is (None: an SD1.x ControlNet). ``every``: all the file's
    shapes; ``shapes``: those of the control model (``control_model.`` removed);
    ``hint``: its hint-conv key, None when there is none."""
    if "lora_controlnet" in every:
        return "a Control-LoRA (a ControlNet stored as a LoRA: 'lora_controlnet' key)"
    if "difference" in every:
        return (
            "a difference ControlNet ('difference' key: it stores the change from a base SD "
            "model, which sdstack does not apply)"
        )
    keys = list(shapes)
    context = context_width(shapes)
    if hint is not None:
        if any(k.startswith(("label_emb.", "add_embedding.")) for k in keys) or context == 2048:
            return "an SDXL ControlNet (label_emb/add_embedding keys or context width 2048)"
        if context == 1024:
            return "an SD 2.x ControlNet (context width 1024)"
        if context is None:
            return "a ControlNet without cross-attention layers (no attn2.to_k weights)"
        return None
    if any("lllite" in k for k in keys):
        return "a ControlNet-LLLite model (SDXL)"
    t2i = ("adapter.", "body.", "style_embedding", "transformer_layes.")
    if any(k.startswith(t2i) for k in keys):
        return "a T2I-Adapter (adapter./body. keys), not a ControlNet"
    unet = [key for key in keys if key.startswith(UNET_PREFIX)]
    width = context_width({key: shapes[key] for key in unet})
    kind = detect_kind(shapes, width if width not in (None, 1024) else SD1_CONTEXT_WIDTH)
    if unet or kind.startswith(("an SDXL checkpoint", "an SD 2.x checkpoint")):
        what = "an SD1.x checkpoint" if kind == SD1 else kind.split(" (")[0]
        return f"a full Stable Diffusion model ({what}), not a ControlNet"
    return kind


def _classify(path: Path, shapes: Mapping[str, Sequence[int]]) -> ControlFileInfo:
    """Layout, hint channels and context of an SD1.x ControlNet's tensor shapes.

    Raises:
        ControlNetFileError: anything else (``_foreign`` says what it looks like).
    """
    bare = {k: shapes[v] for k, v in strip_control_prefix(shapes).items()}
    if LDM_HINT_KEY in bare:
        layout, found, hint = "ldm", bare, LDM_HINT_KEY
    elif DIFFUSERS_HINT_KEY in shapes:
        layout, found, hint = "diffusers", shapes, DIFFUSERS_HINT_KEY
    else:
        layout, found, hint = "", shapes, None
    kind = _foreign(shapes, found, hint)
    if kind is None and len(found[hint]) != 4:
        kind = f"an unknown model ({hint} has shape {list(found[hint])}, expected a 3x3 conv)"
    if kind is not None:
        raise ControlNetFileError(
            f"{path}: cannot load as an SD1.x ControlNet: this looks like {kind}; expected an "
            "SD1.5 ControlNet (control_v11p_sd15_canny and the like)"
        )
    return ControlFileInfo(path, layout, int(found[hint][1]), int(context_width(found) or 0))


def _folder_kind(config: Mapping[str, Any]) -> str | None:
    """What a diffusers folder's config.json describes, when it is not an SD1 ControlNet."""
    name = config.get("_class_name")
    if name in ("T2IAdapter", "MultiAdapter"):
        return f"a T2I-Adapter ({name}), not a ControlNet"
    if name not in (None, "ControlNetModel"):
        return f"a {name!s:.60}, not an SD1.x ControlNetModel"
    if (
        config.get("addition_embed_type") == "text_time"
        or config.get("cross_attention_dim") == 2048
    ):
        return "an SDXL ControlNet (addition_embed_type 'text_time' / cross_attention_dim 2048)"
    if config.get("cross_attention_dim") == 1024:
        return "an SD 2.x ControlNet (cross_attention_dim 1024)"
    return None


def _open(path: Path) -> tuple[Any, dict[str, Any] | None]:
    """The weights of ``path`` (a ``TensorFile``) and, for a diffusers folder, its config.

    Raises:
        ControlNetFileError: missing, special file, unknown suffix, corrupt, refused
            pickle, a folder without config.json or weights, a foreign folder config.
    """
    from sdstack.models.assemble import read_json
    from sdstack.models.diffusers_folder import open_weights_in
    from sdstack.models.hashes import file_type_name
    from sdstack.models.single_file import open_tensor_file

    try:
        mode = path.stat().st_mode
    except OSError as error:
        problem = "not found" if isinstance(error, FileNotFoundError) else error.strerror
        raise ControlNetFileError(f"{path}: ControlNet model {problem}") from error
    with _as_control_error(path):
        if stat.S_ISDIR(mode):
            if not (path / "config.json").is_file():
                raise ControlNetFileError(
                    f"{path}: a folder without config.json; expected a ControlNet file or a "
                    f"diffusers ControlNet folder (config.json + {FOLDER_WEIGHTS[0]})"
                )
            config = read_json(path / "config.json")
            kind = _folder_kind(config)
            if kind is not None:
                raise ControlNetFileError(
                    f"{path}: cannot load as an SD1.x ControlNet: config.json describes {kind}"
                )
            source = open_weights_in(path, FOLDER_WEIGHTS)
            if source is None:
                raise ControlNetFileError(
                    f"{path}: diffusers ControlNet folder without weights: expected one of "
                    f"{', '.join(FOLDER_WEIGHTS)}"
                )
            return source, config
        if not stat.S_ISREG(mode):
            raise ControlNetFileError(f"{path}: {file_type_name(mode)}, not a ControlNet file")
        return open_tensor_file(path), None


def identify_control_file(path: str | os.PathLike[str]) -> ControlFileInfo:
    """Whether ``path`` is an SD1.x ControlNet, and its layout, from key names and shapes.

    Only the header of a ``.safetensors`` file is read (a pickle is mapped, not read).

    Raises:
        ControlNetFileError: not found, corrupt, or not an SD1.x ControlNet: the message
            names what it is (T2I-Adapter, SDXL or SD2 ControlNet, Control-LoRA, full SD
            checkpoint, LoRA, VAE, embedding, unknown).
    """
    path = Path(path)
    source, _ = _open(path)
    with source:
        return _classify(path, source)


def _diffusers_names(source: Mapping[str, Any], layout: str) -> dict[str, str]:
    """file key -> diffusers key (``control_model.`` keys only, when present)."""
    if layout == "diffusers":
        return {key: key for key in source}
    files = strip_control_prefix(source)
    return {files[bare]: name for bare, name in ldm_names(files).items()}


def _fitted(shape: Sequence[int], expected: Sequence[int] | None) -> tuple[int, ...]:
    """``expected`` when ``shape`` is the same 1x1 conv stored the other way (``[C, C]`` vs
    ``[C, C, 1, 1]``: linear-projection files, or a config with ``use_linear_projection``);
    else ``shape``."""
    shape = tuple(shape)
    if expected is not None:
        expected = tuple(expected)
        if (*shape, 1, 1) == expected or shape == (*expected, 1, 1):
            return expected
    return shape


def _config_for(
    path: Path,
    shapes: Mapping[str, Sequence[int]],
    folder_config: dict[str, Any] | None,
    config_dir: str | os.PathLike[str] | None,
    known: KnownControlModel | None,
) -> tuple[dict[str, Any], str, str | None]:
    """(config, its name for messages, hint): ``config_dir``, the folder's, or derived."""
    from sdstack.models.assemble import read_json

    if config_dir is not None:
        where = Path(config_dir)
        file = where / "config.json" if where.is_dir() else where
        if not file.is_file():
            raise ControlNetFileError(f"config_dir: no config.json in {where}")
        return read_json(file), f"{file} (config_dir)", None
    if folder_config is not None:
        hint = "the folder's config.json does not match its weights"
        return {k: v for k, v in folder_config.items() if not k.startswith("_")}, "folder's", hint
    return control_config(shapes, global_pool=_pooled(path, known)), "packaged SD1.5", CONFIG_HINT


_POOLING = re.compile(r"^\s*global_average_pooling:\s*true\s*$", re.IGNORECASE | re.MULTILINE)


def _pooled(path: Path, known: KnownControlModel | None) -> bool:
    """Whether a single file's residuals are global-average-pooled (the shuffle model).

    The extension reads ``global_average_pooling`` from the ``<stem>.yaml`` beside the
    model (the v1.1 shuffle yaml sets it); without one, a known model says it, else a
    stem that ends in ``shuffle`` (ComfyUI's rule, precision tags dropped).
    """
    yaml = path.with_suffix(".yaml")
    if yaml.is_file() and yaml.stat().st_size < 2**20:
        try:
            return bool(_POOLING.search(yaml.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            pass  # unreadable: fall back to the name
    if known is not None:
        return known.global_average_pooling
    return model_stem(path.name).lower().removesuffix("_fp16").endswith("shuffle")


def _build(path: Path, source: Any, configs: tuple, dtype: Any, device: Any) -> Any:
    """Build the ``ControlNetModel`` on the meta device, check shapes, assign the tensors."""
    from diffusers import ControlNetModel

    from sdstack.models.assemble import (
        Fit,
        assign_tensors,
        build_meta,
        check_fit,
        expected_shapes,
        prepare_weight,
    )

    names, config, origin, hint = configs
    model = build_meta(ControlNetModel, config, f"{origin} ControlNet config")
    expected = expected_shapes(model)
    found = {names[k]: _fitted(source[k], expected.get(names[k])) for k in names}
    check_fit(source.path, "ControlNet", found, Fit(expected, origin, hint))
    tensors = {}
    for key, name in names.items():
        tensor = source.tensor(key)
        if tuple(tensor.shape) != tuple(expected[name]):  # a 1x1 conv <-> linear (_fitted)
            tensor = tensor.reshape(expected[name])
        tensors[name] = prepare_weight(tensor, dtype, device, source.path, key)
    model = assign_tensors(model, tensors, path, "ControlNet")
    return model.requires_grad_(False).eval()


def load_controlnet(
    path: str | os.PathLike[str],
    *,
    device: Any = None,
    dtype: Any = None,
    config_dir: str | os.PathLike[str] | None = None,
) -> LoadedControlNet:
    """Load an SD1.x ControlNet file or diffusers folder (module docstring) as diffusers'
    ``ControlNetModel``.

    Args:
        path: the file or folder.
        device: ``"cpu"`` (None), ``"cuda[:N]"``, ``"mps"`` or a ``torch.device``.
        dtype: ``"fp32"`` (None), ``"fp16"``, ``"bf16"`` or a floating ``torch.dtype``.
        config_dir: a folder holding ``config.json`` (or that file) for the model,
            replacing the packaged config and the folder's own.

    Returns:
        ``LoadedControlNet``: the model in eval mode with ``requires_grad`` False, its name,
        path, legacy 8-hex hash (of the weights file) and ``known_control_model(name)``.
        A single file's ``global_pool_conditions`` (the shuffle model) follows
        ``global_average_pooling`` in a ``<stem>.yaml`` beside it, else the known model,
        else a stem ending in ``shuffle``.

    Raises:
        SettingError: unknown dtype or unavailable device.
        ControlNetFileError: missing, corrupt or truncated, refused pickle, not an SD1.x
            ControlNet (says what it is), tensors missing, unexpected or of other shapes
            (a few named).
    """
    from sdstack.models.assemble import resolve_device, resolve_dtype
    from sdstack.models.hashes import legacy_model_hash

    # 1. Check the arguments.
    torch_dtype = resolve_dtype("fp32" if dtype is None else dtype)
    torch_device = resolve_device("cpu" if device is None else device)
    path = Path(path)
    name = path.name if path.is_dir() else path.stem
    known = known_control_model(name)
    # 2. Identify the file from its keys and shapes, then build and fill the model.
    source, folder_config = _open(path)
    with source, _as_control_error(path):
        info = _classify(path, source)
        names = _diffusers_names(source, info.layout)
        shapes = {names[key]: source[key] for key in names}
        config, origin, hint = _config_for(path, shapes, folder_config, config_dir, known)
        configs = (names, config, origin, hint)
        model = _build(path, source, configs, torch_dtype, torch_device)
        # 3. The reference's short hash of the weights file.
        short_hash = legacy_model_hash(source.path if path.is_dir() else path)
    return LoadedControlNet(model, name, path, short_hash, known)
