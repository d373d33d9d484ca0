"""Deprojector folders: ``model.safetensors`` + ``config.json``, and the CLIP fingerprint.

Layout written by :func:`save_deprojector` (both files replaced atomically, weights first)::

    DIR/config.json        DeprojectorConfig.to_dict(), UTF-8 JSON
    DIR/model.safetensors  the module's state_dict (float32), metadata format=sdstack-deprojector

:func:`load_deprojector` reads it strictly: ``config.json`` at most 1 MB and a valid
config; the safetensors header checked (``check_safetensors_layout``) and its tensor
names and shapes compared with the ones the config implies (worked out on the meta
device, so a hostile config allocates nothing) before any tensor is read; every value
finite. A folder holding the author's ``pytorch_model.bin`` instead is read by
:mod:`~sdstack.text.deprojector.v1_layout`.

:func:`clip_fingerprint`: sha256 over the text encoder's floating tensors, sorted by name
(``text_model.`` prefix dropped, so transformers 4.x and 5.x agree), each as
``name:shape;`` then its float16 bytes (so float16 and float32 loads of one checkpoint
agree). About 0.2 s for SD1's 123M-parameter CLIP.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackWarning
from sdstack.text.deprojector import DeprojectorError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_CONFIG_BYTES = 1_000_000
FORMAT_TAG = "sdstack-deprojector"
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class DeprojectorFileError(DeprojectorError):
    """A deprojector folder that cannot be read: missing, corrupt or hostile files."""


def clip_fingerprint(text_encoder: Any) -> str:
    """sha256 hex digest of a CLIP text model's weights (see the module docstring)."""
    import torch

    digest = hashlib.sha256()
    state = text_encoder.state_dict()
    for key in sorted(state, key=lambda k: k.removeprefix("text_model.")):
        tensor = state[key]
        if not tensor.is_floating_point():
            continue
        data = tensor.detach().to("cpu", torch.float16).contiguous()
        digest.update(f"{key.removeprefix('text_model.')}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy())  # the buffer, not a copy
    return digest.hexdigest()


def save_deprojector(model: Any, folder: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``folder`` (created if needed); returns the folder.

    Raises:
        DeprojectorFileError: the folder cannot be written.
    """
    import torch
    from safetensors.torch import save_file

    from sdstack.atomic_files import replace, temporary_file

    folder = Path(folder)
    config = model.config.check().to_dict()
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    try:
        with temporary_file(folder, suffix=".safetensors") as temporary:
            save_file(state, str(temporary), metadata={"format": FORMAT_TAG})
            replace(temporary, folder / WEIGHTS_NAME)
        with temporary_file(folder, suffix=".json") as temporary:
            temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
            replace(temporary, folder / CONFIG_NAME)
    except OSError as error:
        raise DeprojectorFileError(
            f"cannot write the deprojector to {folder}: {error.strerror or error}"
        ) from error
    return folder


def read_json_file(path: Path, what: str) -> Any:
    """The parsed JSON of a regular file of at most 1 MB.

    Raises:
        DeprojectorFileError: missing, not a regular file, too big, not UTF-8 JSON.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DeprojectorFileError(f"{path}: no {what} (expected a JSON file)") from None
    except OSError as error:
        raise DeprojectorFileError(f"{path}: cannot read the {what}: {error}") from error
    if not stat.S_ISREG(info.st_mode):
        raise DeprojectorFileError(f"{path}: the {what} is not a regular file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise DeprojectorFileError(
            f"{path}: the {what} has {info.st_size} bytes, more than the {MAX_CONFIG_BYTES} "
            "a deprojector config can need"
        )
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise DeprojectorFileError(f"{path}: the {what} is not valid JSON: {error}") from None
    except OSError as error:
        raise DeprojectorFileError(f"{path}: cannot read the {what}: {error}") from error


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise DeprojectorFileError(f"deprojector folder {folder} does not exist")
    if not folder.is_dir():
        raise DeprojectorFileError(
            f"deprojector {folder} is not a folder (expected a folder holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME})"
        )


def load_deprojector(
    folder: str | os.PathLike[str],
    *,
    text_encoder: Any = None,
    clip_skip: int | None = None,
    device: Any = None,
    tokenizer: Any = None,
) -> Any:
    """The :class:`~sdstack.text.deprojector.model.Deprojector` saved in ``folder`` (eval mode).

    ``text_encoder``: warn (SdstackWarning) when its fingerprint differs from the
    config's ``clip_hash``; ``clip_skip``: warn when it differs from the one the
    deprojector was trained for. A folder with ``pytorch_model.bin`` and no
    ``model.safetensors`` is read as the author's v1 layout (``tokenizer`` with
    ``text_encoder`` then computes its null embedding if the file has none).

    Raises:
        DeprojectorFileError: missing, corrupt or hostile files.
    """
    from sdstack.text.deprojector import v1_layout

    folder = Path(folder)
    _check_folder(folder)
    # 1. which layout
    if not (folder / WEIGHTS_NAME).exists() and (folder / v1_layout.WEIGHTS_NAME).exists():
        model = v1_layout.load_v1_layout(folder, text_encoder=text_encoder, tokenizer=tokenizer)
    else:
        model = _load_sdstack_layout(folder)
    # 2. warnings about the CLIP and clip skip it is used with
    _warn_mismatch(model, folder, text_encoder, clip_skip)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _load_sdstack_layout(folder: Path) -> Any:
    import torch

    from sdstack.text.deprojector.model import Deprojector, DeprojectorConfig

    config_path = folder / CONFIG_NAME
    data = read_json_file(config_path, "deprojector config")
    try:
        config = DeprojectorConfig.from_dict(data)
    except DeprojectorError as error:
        raise DeprojectorFileError(f"{config_path}: {error}") from None
    except TypeError as error:  # cls(**data) with a non-string key cannot happen in JSON
        raise DeprojectorFileError(f"{config_path}: {error}") from None
    with torch.device("meta"):
        model = Deprojector(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = read_checked_safetensors(folder / WEIGHTS_NAME, expected)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model


def read_checked_safetensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict:
    """The float32 tensors of ``path`` when its names and shapes are exactly ``expected``.

    Raises:
        DeprojectorFileError: unreadable, missing/unexpected keys, wrong shape or dtype,
            NaN/infinite values.
    """
    import torch
    from safetensors.torch import load_file

    from sdstack.models.safetensors_header import SafetensorsHeaderError, check_safetensors_layout

    try:
        entries, _ = check_safetensors_layout(path)
    except FileNotFoundError:
        raise DeprojectorFileError(f"{path}: missing (expected the deprojector weights)") from None
    except SafetensorsHeaderError as error:
        raise DeprojectorFileError(str(error)) from None
    except OSError as error:
        raise DeprojectorFileError(f"{path}: cannot read: {error}") from error
    check_tensor_names(path, {k: (e.dtype, e.shape) for k, e in entries.items()}, expected)
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError
        raise DeprojectorFileError(f"{path}: cannot read the tensors: {error}") from None
    out = {}
    for key, tensor in state.items():
        tensor = tensor.to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise DeprojectorFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
        out[key] = tensor
    return out


def check_tensor_names(
    path: Path, found: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple]
) -> None:
    """``found`` (name -> (dtype, shape)) must hold exactly ``expected``'s names and shapes."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            shown = ", ".join(repr(k)[:60] for k in extra[:5])
            parts.append(f"unexpected {shown}{' ...' if len(extra) > 5 else ''}")
        raise DeprojectorFileError(f"{path}: tensors do not match the config ({'; '.join(parts)})")
    for key, shape in expected.items():
        dtype, got = found[key]
        if dtype not in _FLOAT_DTYPES:
            raise DeprojectorFileError(
                f"{path}: tensor {key!r} has dtype {dtype}, expected one of "
                f"{', '.join(_FLOAT_DTYPES)}"
            )
        if tuple(got) != tuple(shape):
            raise DeprojectorFileError(
                f"{path}: tensor {key!r} has shape {list(got)}, the config implies {list(shape)}"
            )


def _warn_mismatch(model: Any, folder: Path, text_encoder: Any, clip_skip: int | None) -> None:
    config = model.config
    if text_encoder is not None and config.clip_hash is not None:
        fingerprint = clip_fingerprint(text_encoder)
        if fingerprint != config.clip_hash:
            warnings.warn(
                f"deprojector {folder} was trained on CLIP {config.clip_hash[:12]}, but this "
                f"text encoder is {fingerprint[:12]}; its conditioning may be poor (train one "
                "for this model with `sdstack deproject train`)",
                SdstackWarning,
                stacklevel=3,
            )
    if clip_skip is not None and clip_skip != config.clip_skip:
        warnings.warn(
            f"deprojector {folder} was trained for clip skip {config.clip_skip}, used at clip "
            f"skip {clip_skip:g}; train one with --clip-skip {clip_skip:g} for this",
            SdstackWarning,
            stacklevel=3,
        )
