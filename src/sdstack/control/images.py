"""Control images: read a file, run the preprocessor, resize to the job, make the tensor.

The whole path of one ControlNet unit's image, as the reference extension runs it
(Mikubill/sd-webui-controlnet ``scripts/controlnet.py``: the unit image as RGB, the
preprocessor at ``processor_res``, ``detectmap_proc`` to the job size,
``get_pytorch_control``):

    map    = resize_control_map(preprocess(module, hwc3(image), resolution, a, b), w, h, mode)
    tensor = float32(map) / 255, laid out 1 x 3 x h x w

Transparency: the reference's UI treats a partly transparent upload as a drawn canvas
(its alpha becomes the scribble); a file read here is composited on white instead
(``hwc3``), which is what the map looks like in an image viewer.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdstack.control.resize import ControlMapError
from sdstack.generate.images import ImageFileError

if TYPE_CHECKING:
    import numpy as np
    import torch

# What Pillow raises on broken data besides OSError (plugins parse headers by hand).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# One side longer than this is refused before decoding (a 1 x 100000 strip cannot be a
# useful control image, and cropping it to a square would take gigabytes).
MAX_SIDE = 16384
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ControlImageError(ImageFileError, ControlMapError):
    """A control image that cannot be used: missing, unreadable, not an image, a
    decompression bomb, an absurd size, a mode without an RGB form."""


def read_control_image(path: str | os.PathLike[str], *, option: str = "control image") -> Any:
    """The control image file as a decoded ``PIL.Image`` in mode RGB, RGBA or L.

    Pixels are decoded here, so a truncated file fails now. An animated file (GIF,
    APNG, WebP) gives its first frame. 16-bit gray (``I;16``, ``I`` within 0..65535,
    e.g. depth maps) becomes 8-bit as ``round(v / 257)``; palette and LA images with
    transparency become RGBA; CMYK, YCbCr, HSV, LAB become RGB.

    Args:
        path: the image file.
        option: how messages name it (``"--control-image"``).

    Raises:
        ControlImageError: ``<option> '<path>': <reason>``: no such file, a folder,
            unreadable, not an image, truncated or corrupt, more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bomb), a side over
            :data:`MAX_SIDE`, or a mode that has no 8-bit RGB form (32-bit float).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    prefix = f"{option} {str(path)!r}: "
    if path.is_dir():
        raise ControlImageError(f"{prefix}is a folder, expected an image file")
    with _open_stream(path, prefix) as stream:
        try:
            image = Image.open(stream)
        except UnidentifiedImageError as error:
            raise ControlImageError(f"{prefix}is not an image file Pillow can read") from error
        except Image.DecompressionBombError as error:
            raise ControlImageError(_too_many_pixels(prefix)) from error
        except _DECODE_ERRORS as error:
            raise ControlImageError(f"{prefix}is truncated or corrupt: {error}") from error
        with image:
            _check_size(image, prefix)
            try:
                image.seek(0)
                image.load()
            except _DECODE_ERRORS as error:
                raise ControlImageError(f"{prefix}is truncated or corrupt: {error}") from error
            return _eight_bit(image, prefix)


def _open_stream(path: Path, prefix: str) -> Any:
    """``open(path, "rb")``; a missing or unreadable file a :class:`ControlImageError`."""
    try:
        return open(path, "rb")  # the caller closes it (``with``)
    except FileNotFoundError as error:
        raise ControlImageError(f"{prefix}no such file") from error
    except OSError as error:
        raise ControlImageError(f"{prefix}cannot be read: {error.strerror or error}") from error


def _too_many_pixels(prefix: str) -> str:
    from PIL import Image

    return (
        f"{prefix}declares more than {Image.MAX_IMAGE_PIXELS} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS), which could be a decompression bomb; raise that "
        "limit only for a file you trust"
    )


def _check_size(image: Any, prefix: str) -> None:
    from PIL import Image

    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ControlImageError(_too_many_pixels(prefix))
    if max(width, height) > MAX_SIDE or min(width, height) < 1:
        raise ControlImageError(
            f"{prefix}is {width}x{height} pixels; expected sides of 1..{MAX_SIDE} "
            "(crop or scale it first)"
        )


def _eight_bit(image: Any, prefix: str) -> Any:
    """``image`` (decoded) as a new RGB, RGBA or L image."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ControlImageError(
                f"{prefix}has mode {mode} with values outside 0..65535; save it as an "
                "8-bit or 16-bit image"
            )
        gray = np.rint(values / 257.0).astype(np.uint8)
        return Image.fromarray(gray)
    if mode in ("RGB", "RGBA", "L"):
        return image.copy()
    if mode == "F":  # Pillow would clip it to 0..255 silently (a 0..1 map turns black)
        raise ControlImageError(
            f"{prefix}has mode F (32-bit float), which has no 8-bit RGB form; save it as "
            "an 8-bit or 16-bit image"
        )
    has_alpha = mode in ("LA", "PA", "La", "RGBa") or "transparency" in image.info
    try:
        return image.convert("RGBA" if has_alpha else "RGB")
    except (ValueError, OSError) as error:
        raise ControlImageError(
            f"{prefix}has mode {mode}, which has no 8-bit RGB form ({error}); save it as "
            "an 8-bit RGB or grayscale image"
        ) from error


def image_array(image: Any) -> np.ndarray:
    """A control image (PIL image, array, or path) as an H x W x 3 uint8 array.

    A path is read with :func:`read_control_image`; a PIL image in another mode goes
    through the same conversion; an array must be uint8 (``hwc3`` rules).

    Raises:
        ControlImageError: a bad file; ControlMapError: a bad array.
    """
    import numpy as np

    from sdstack.control.resize import hwc3

    if isinstance(image, (str, os.PathLike)):
        image = read_control_image(image)
    if hasattr(image, "mode") and hasattr(image, "size") and hasattr(image, "getbands"):
        if image.mode not in ("RGB", "RGBA", "L"):
            image = _eight_bit(image, "control image: ")
        return hwc3(np.asarray(image))
    if isinstance(image, np.ndarray):
        return hwc3(image)
    raise ControlMapError(
        f"control image of type {type(image).__name__}: expected a file path, a PIL image "
        "or a uint8 numpy array"
    )


def control_map(
    image: Any,
    *,
    module: str,
    width: int,
    height: int,
    resize_mode: str | int,
    resolution: int = 512,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
) -> np.ndarray:
    """The control map of one unit at the job size (reference: ``get_control`` then
    ``detectmap_proc``).

    Steps: read (if a path) -> H x W x 3 uint8 -> ``preprocess(module, ...)`` ->
    ``resize_control_map(map, width, height, resize_mode)``.

    Returns:
        ``(height // 8 * 8) x (width // 8 * 8) x 3`` uint8.

    Raises:
        ControlImageError, ControlMapError, UnknownResizeModeError,
        PreprocessorUnavailableError, UnknownPreprocessorError, PreprocessorError.
    """
    from sdstack.control.preprocessors import preprocess
    from sdstack.control.resize import resize_control_map, resize_mode_name, target_size

    # 1. Check the cheap things first, so a typo fails before the image is read.
    target_size(width, height)
    mode = resize_mode_name(resize_mode)
    # 2. The image, the preprocessor, the resize.
    pixels = image_array(image)
    detected = preprocess(
        module, pixels, resolution=resolution, threshold_a=threshold_a, threshold_b=threshold_b
    )
    return resize_control_map(detected, width, height, mode)


def control_tensor(control_map: Any) -> torch.Tensor:
    """The reference's ``get_pytorch_control``: ``float32(map) / 255`` as 1 x 3 x H x W.

    Raises:
        ControlMapError: not an H x W x 3 uint8 map (gray/RGBA go through ``hwc3``).
    """
    import torch

    from sdstack.control.resize import hwc3

    pixels = hwc3(control_map)
    tensor = torch.from_numpy(pixels.copy()).to(torch.float32) / 255.0
    return tensor.permute(2, 0, 1).unsqueeze(0).contiguous()
