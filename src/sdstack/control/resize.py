"""Control maps brought to the job size as the reference ControlNet extension does it.

Reference: Mikubill/sd-webui-controlnet ``scripts/controlnet.py`` ``detectmap_proc`` and
``high_quality_resize``, ``annotator/util.py`` ``HWC3``, ``internal_controlnet/
external_code.py`` ``resize_mode_from_value`` and ``pixel_perfect_resolution`` (see
/work/shared/spec/controlnet.md, "Resize modes"). The same cv2 calls, in the same order,
so maps match the reference's byte for byte.

- Target ``(h, w)`` = the job's height and width floored to a multiple of 8.
- ``Just Resize``: ``high_quality_resize(map, (w, h))`` (aspect not kept).
- ``Crop and Resize``: ``k = max(h/H, w/W)``, resize to ``(round(W k), round(H k))``,
  centre crop ``[ph:ph+h, pw:pw+w]``, ``ph = max(0, (newH - h) // 2)``.
- ``Resize and Fill``: ``k = min(h/H, w/W)``, paste the resized map at
  ``((h - newH) // 2, (w - newW) // 2)`` on a canvas of the per-channel median of the
  map's border pixels.

Sizes that would need an absurd intermediate image (an extreme aspect ratio cropped to a
square) are refused with :class:`ControlMapError` before any memory is taken. cv2 and
numpy are imported inside the functions: ``RESIZE_MODES`` and :func:`resize_mode_name`
cost nothing to import.
"""

from __future__ import annotations

import operator
import re
import warnings
from typing import TYPE_CHECKING, Any

from sdstack.errors import SdstackError, SdstackWarning, UnknownNameError
from sdstack.registry import Registry

if TYPE_CHECKING:
    import numpy as np

# The largest intermediate image (pixels) a resize may build: 8192 x 8192, 192 MiB as
# RGB uint8. A job is at most a few megapixels, so only extreme aspect ratios reach it.
MAX_WORK_PIXELS = 8192 * 8192
JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = "Just Resize", "Crop and Resize", "Resize and Fill"
DEFAULT_RESIZE_MODE = CROP_AND_RESIZE  # the reference unit's default


class ControlMapError(SdstackError):
    """A control map (array) that cannot be used: wrong dtype or shape, absurd size."""


class UnknownResizeModeError(UnknownNameError):
    """A resize mode name that is not one of the reference's (nor an alias)."""


RESIZE_MODES: Registry[int] = Registry("resize mode", UnknownResizeModeError)
"""Canonical name -> the reference's ``ResizeMode`` int (0, 1, 2).

Aliases: the reference's older labels ("Inner Fit (Scale to Fit)", "Scale to Fit (Inner
Fit)", "Outer Fit (Shrink to Fit)", "Envelope (Outer Fit)"), the enum member names
(``RESIZE``, ``ResizeMode.INNER_FIT``...), and the short ``just``, ``crop``, ``fill``.
"""
RESIZE_MODES.register(
    JUST_RESIZE,
    0,
    aliases=("RESIZE", "ResizeMode.RESIZE", "Just Resize (Latent upscale)", "just"),
)
RESIZE_MODES.register(
    CROP_AND_RESIZE,
    1,
    aliases=(
        "INNER_FIT", "ResizeMode.INNER_FIT", "Inner Fit (Scale to Fit)",
        "Scale to Fit (Inner Fit)", "crop",
    ),
)  # fmt: skip
RESIZE_MODES.register(
    RESIZE_AND_FILL,
    2,
    aliases=(
        "OUTER_FIT", "ResizeMode.OUTER_FIT", "Outer Fit (Shrink to Fit)",
        "Envelope (Outer Fit)", "fill",
    ),
)  # fmt: skip
_BY_INT = {value: name for name, value in RESIZE_MODES.items()}


def resize_mode_name(value: str | int) -> str:
    """The reference's ``resize_mode_from_value``: a name, alias or int -> canonical name.

    Ints: 0 Just Resize, 1 Crop and Resize, 2 Resize and Fill; 3 ("Just Resize (Latent
    upscale)") is Just Resize; 4 and above warn (SdstackWarning) and fall back to Just
    Resize, as the reference logs and does. A string of digits is read as that int.

    Raises:
        UnknownResizeModeError: an unknown name (names the nearest).
        ControlMapError: a negative int, or a value that is neither str nor int.
    """
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ControlMapError(
            f"resize mode {value!r}: expected a name ({', '.join(RESIZE_MODES.names())}) or 0, 1, 2"
        )
    if isinstance(value, str):
        return RESIZE_MODES.canonical(value.strip())
    if value < 0:
        raise ControlMapError(f"resize mode {value}: expected 0, 1 or 2 (or a name)")
    if value >= 4:
        warnings.warn(
            f"resize mode {value} is not one of 0, 1, 2; using {JUST_RESIZE} (as the "
            "reference does)",
            SdstackWarning,
            stacklevel=2,
        )
    return _BY_INT.get(value, JUST_RESIZE)


def hwc3(array: Any) -> np.ndarray:
    """The reference's ``HWC3``: a uint8 image as H x W x 3.

    Gray (H x W or H x W x 1) is repeated to 3 channels; RGBA is composited on white,
    ``y = uint8(clip(rgb * a + 255 (1 - a)))`` with ``a = alpha / 255`` in float32 and
    truncation to uint8, as the reference. H x W x 3 is returned as is.

    Raises:
        ControlMapError: not uint8, not 2-D/3-D, a channel count other than 1, 3, 4, or
            an empty image.
    """
    import numpy as np

    x = np.asarray(array)
    if x.dtype != np.uint8:
        raise ControlMapError(
            f"control map has dtype {x.dtype}; expected uint8 values 0..255 "
            "(scale float maps by 255 and round first)"
        )
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ControlMapError(
            f"control map has shape {tuple(x.shape)}; expected H x W, H x W x 1, "
            "H x W x 3 or H x W x 4"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ControlMapError(f"control map has shape {tuple(x.shape)}: it is empty")
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def check_work_size(width: int, height: int, what: str) -> None:
    """Refuse an intermediate image over :data:`MAX_WORK_PIXELS` before allocating it.

    Raises:
        ControlMapError: ``width * height`` too large, naming ``what`` made it.
    """
    if width * height > MAX_WORK_PIXELS:
        raise ControlMapError(
            f"{what} would need a {width}x{height} intermediate image (more than "
            f"{MAX_WORK_PIXELS} pixels): the image's aspect ratio is too far from the "
            "target's; crop the image first, or use Just Resize"
        )


def _unique_colour_count(x: np.ndarray) -> int:
    """Distinct RGB triples (the reference's ``get_unique_axis0``), as packed integers."""
    import numpy as np

    flat = x.reshape(-1, 3).astype(np.uint32)
    return int(np.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]).size)


def _is_one_pixel_edge(x: np.ndarray) -> bool:
    """More than half the bright values vanish under a 3x3 opening (erode, then dilate)."""
    import cv2
    import numpy as np

    box = np.ones((3, 3), dtype=np.uint8)
    opened = cv2.dilate(cv2.erode(x, box, iterations=1), box, iterations=1)
    return int(np.count_nonzero(opened < x)) * 2 > int(np.count_nonzero(x > 127))


# The reference's hit-or-miss thinning kernels (1 foreground, -1 background, 0 either),
# each used in its four 90-degree rotations, in the reference's order.
_THIN_KERNELS = (
    ((-1, -1, -1), (0, 1, 0), (1, 1, 1)),
    ((0, -1, -1), (1, 1, -1), (0, 1, 0)),
)
_PRUNE_KERNELS = (
    ((-1, -1, -1), (-1, 1, -1), (0, 0, -1)),
    ((-1, -1, -1), (-1, 1, -1), (-1, 0, 0)),
)
_THIN_ROUNDS = 32


def _rotations(kernels: tuple[Any, ...]) -> list[np.ndarray]:
    """Every kernel turned by 0, 90, 180, 270 degrees: all kernels per angle, in turn."""
    import numpy as np

    raw = [np.array(k, dtype=np.int32) for k in kernels]
    return [np.ascontiguousarray(np.rot90(k, turn)) for turn in range(4) for k in raw]


def _thin_pass(image: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """Clear, kernel after kernel (in place), the pixels its hit-or-miss matches."""
    import cv2

    changed = False
    for kernel in kernels:
        hits = cv2.morphologyEx(image, cv2.MORPH_HITMISS, kernel) > 127
        if hits.any():
            image[hits] = 0
            changed = True
    return changed


def thin(binary: np.ndarray, *, prune: bool) -> np.ndarray:
    """The reference's ``lvmin_thin``: hit-or-miss thinning of a 0/255 map to one-pixel
    lines, at most 32 rounds over the 8 thinning kernels, then (``prune``) one round of
    the 8 pruning kernels that remove spur ends. Returns a new array."""
    y = binary.copy()
    kernels = _rotations(_THIN_KERNELS)
    for _ in range(_THIN_ROUNDS):
        if not _thin_pass(y, kernels):
            break
    if prune:
        _thin_pass(y, _rotations(_PRUNE_KERNELS))
    return y


def directional_nms(gray: np.ndarray) -> np.ndarray:
    """The reference's ``nake_nms``: keep a pixel where it is the maximum of its 3-pixel
    line in at least one of 4 directions (horizontal, vertical, both diagonals), else 0."""
    import cv2
    import numpy as np

    lines = (
        ((0, 0, 0), (1, 1, 1), (0, 0, 0)),
        ((0, 1, 0), (0, 1, 0), (0, 1, 0)),
        ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
        ((0, 0, 1), (0, 1, 0), (1, 0, 0)),
    )
    kept = np.zeros_like(gray)
    for line in lines:
        np.putmask(kept, cv2.dilate(gray, np.array(line, dtype=np.uint8)) == gray, gray)
    return kept


def high_quality_resize(control_map: Any, size: tuple[int, int]) -> np.ndarray:
    """The reference's ``high_quality_resize``: resize a map to ``size = (w, h)``.

    Interpolation: 2 < distinct colours < 200 (segmentation-like) -> NEAREST; else
    shrinking (fewer pixels) -> AREA; else CUBIC. A binary map (2 colours, min < 16,
    max > 240) is averaged to gray and re-binarised with Otsu after the resize; when it
    is a one-pixel edge map (see :func:`_is_one_pixel_edge`) it first goes through the
    reference's directional non-maximum suppression, and after Otsu through its
    hit-or-miss thinning (pruned when enlarging). A map already at ``size`` is returned
    unchanged.

    Raises:
        ControlMapError: a bad map (see :func:`hwc3`), a size under 1 or too large.
    """
    import cv2
    import numpy as np

    x = hwc3(control_map)
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ControlMapError(f"resize target {width}x{height}: expected at least 1x1")
    if x.shape[0] == height and x.shape[1] == width:
        return x
    check_work_size(width, height, "resizing the control map")
    target_pixels, source_pixels = width * height, x.shape[0] * x.shape[1]
    colours = _unique_colour_count(x)
    binary = colours == 2 and int(x.min()) < 16 and int(x.max()) > 240
    one_pixel_edge = binary and _is_one_pixel_edge(x)
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif target_pixels < source_pixels:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if not binary:
        return y
    gray = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_edge:
        gray = directional_nms(gray)
    _, gray = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if one_pixel_edge:
        gray = thin(gray, prune=target_pixels > source_pixels)
    return np.stack([gray] * 3, axis=2)


def target_size(width: int, height: int) -> tuple[int, int]:
    """The reference's ``align_dim_latent``: ``(width // 8 * 8, height // 8 * 8)``.

    Raises:
        ControlMapError: a side under 8 (nothing left after flooring) or not an int.
    """
    sides = []
    for name, value in (("width", width), ("height", height)):
        try:
            side = -1 if isinstance(value, bool) else operator.index(value)
        except TypeError:
            side = -1
        if side < 8:
            raise ControlMapError(f"control map {name} {value!r}: expected a whole number >= 8")
        sides.append(side // 8 * 8)
    return sides[0], sides[1]


def resize_control_map(control_map: Any, width: int, height: int, mode: str | int) -> np.ndarray:
    """The reference's ``detectmap_proc`` (non-inpaint): the map at the job size.

    ``(w, h) = target_size(width, height)``; the map is :func:`hwc3`'d, then resized per
    ``mode`` (see the module docstring) with :func:`high_quality_resize`.

    Returns:
        An ``h x w x 3`` uint8 array.

    Raises:
        ControlMapError: a bad map or size; UnknownResizeModeError: a bad ``mode``.
    """
    import numpy as np

    w, h = target_size(width, height)
    mode_name = resize_mode_name(mode)
    x = hwc3(control_map)
    if mode_name == JUST_RESIZE:
        return np.ascontiguousarray(high_quality_resize(x, (w, h)))
    old_h, old_w = x.shape[0], x.shape[1]
    k0, k1 = h / old_h, w / old_w
    if mode_name == RESIZE_AND_FILL:
        k = min(k0, k1)
        borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        fill = np.median(borders, axis=0).astype(np.uint8)
        canvas = np.tile(fill[None, None], [h, w, 1])
        # max(1, .): a map thinner than one pixel after scaling keeps one row (the
        # reference would fail in cv2.resize there).
        new_w, new_h = max(1, round(old_w * k)), max(1, round(old_h * k))
        resized = high_quality_resize(x, (new_w, new_h))
        top, left = max(0, (h - new_h) // 2), max(0, (w - new_w) // 2)
        canvas[top : top + new_h, left : left + new_w] = resized
        return canvas
    k = max(k0, k1)
    new_w, new_h = round(old_w * k), round(old_h * k)
    check_work_size(new_w, new_h, f"{CROP_AND_RESIZE} of a {old_w}x{old_h} map to {w}x{h}")
    resized = high_quality_resize(x, (new_w, new_h))
    top, left = max(0, (new_h - h) // 2), max(0, (new_w - w) // 2)
    return np.ascontiguousarray(resized[top : top + h, left : left + w])


def pixel_perfect_resolution(
    image_size: tuple[int, int], width: int, height: int, mode: str | int
) -> int:
    """The reference's ``pixel_perfect_resolution``: the preprocessor resolution that
    makes the map come out at the job's size.

    ``round(k * min(H, W))`` with ``k = max(h/H, w/W)`` (``min`` for Resize and Fill),
    ``(w, h)`` the job size floored to multiples of 8 and ``image_size = (W, H)`` the
    input image's size.
    """
    w, h = target_size(width, height)
    image_w, image_h = int(image_size[0]), int(image_size[1])
    if image_w < 1 or image_h < 1:
        raise ControlMapError(f"image size {image_w}x{image_h}: expected at least 1x1")
    k0, k1 = h / image_h, w / image_w
    k = min(k0, k1) if resize_mode_name(mode) == RESIZE_AND_FILL else max(k0, k1)
    return round(k * min(image_h, image_w))
