"""ControlNet preprocessors that need no downloaded weights, as the reference runs them.

Reference: Mikubill/sd-webui-controlnet ``scripts/preprocessor/model_free_preprocessors.py``
and ``scripts/preprocessor/legacy/processor.py`` (``canny``, ``invert``, ``scribble_xdog``,
``threshold``, ``lineart_standard``, ``tile_resample``); spec /work/shared/spec/
controlnet.md, "Canny preprocessor". Most first run ``resize_image_with_pad``: the image
scaled so its short side is ``resolution`` (CUBIC up, AREA down), edge-padded on the
bottom/right to multiples of 64, the padding cut off the result. The output then goes
through ``resize_control_map`` to the job size (``sdstack.control.images.control_map``).

Names: sdstack's ``scribble`` is the reference's ``scribble_xdog``; ``lineart_standard``
is its ``lineart_standard (from white bg & black line)``. The bare name ``lineart`` is,
as in the reference, ``lineart_realistic``: a network, refused as needing weights.

Detectors that run a network (OpenPose, MiDaS, HED, ...) are listed in
``sdstack.control.detectors``; asking for one raises :class:`PreprocessorUnavailableError`
naming the weights. cv2 and numpy are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdstack.errors import SdstackError, UnknownNameError
from sdstack.registry import Registry

if TYPE_CHECKING:
    import numpy as np

DEFAULT_RESOLUTION = 512
RESOLUTION_RANGE = (64, 2048)
UNSET = -1  # the reference's "use the default" value for processor_res and thresholds


class PreprocessorError(SdstackError):
    """A preprocessor setting out of range (resolution, threshold A/B)."""


class UnknownPreprocessorError(UnknownNameError):
    """A control module name that is neither a preprocessor here nor a known detector."""


class PreprocessorUnavailableError(SdstackError):
    """A reference preprocessor that sdstack cannot run (it needs downloaded weights)."""


@dataclass(frozen=True)
class Threshold:
    """One slider of a preprocessor: its reference label, default and inclusive range."""

    label: str
    default: float
    minimum: float
    maximum: float
    whole: bool = True  # whole numbers (cast with int() as the reference does)


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessor: ``run(image, *, resolution, threshold_a, threshold_b)`` -> map.

    ``image`` is H x W x 3 uint8; ``None`` thresholds mean the defaults. ``reference``
    is the reference extension's name for it.
    """

    name: str
    reference: str
    summary: str
    run: Callable[..., Any]
    threshold_a: Threshold | None = None
    threshold_b: Threshold | None = None
    uses_resolution: bool = True


class _Modules(Registry[Preprocessor]):
    """The runnable preprocessors; looking up one of the reference's others raises
    :class:`PreprocessorUnavailableError` (why, what to do) instead of "unknown"."""

    def canonical(self, name: str) -> str:
        if isinstance(name, str) and name in self:
            return super().canonical(name)
        from sdstack.control.detectors import UNAVAILABLE_PREPROCESSORS, unknown_module_message

        if isinstance(name, str) and name in UNAVAILABLE_PREPROCESSORS:
            raise PreprocessorUnavailableError(UNAVAILABLE_PREPROCESSORS.get(name).message())
        raise UnknownPreprocessorError(unknown_module_message(name))


PREPROCESSORS: Registry[Preprocessor] = _Modules("control module", UnknownPreprocessorError)
"""Name -> :class:`Preprocessor`; ``PREPROCESSORS[name]`` raises
PreprocessorUnavailableError for the reference's weight detectors, UnknownPreprocessorError
(nearest names) for anything else."""


def _value(given: float | None, slider: Threshold) -> float:
    return slider.default if given is None else given


def resize_image_with_pad(image: np.ndarray, resolution: int) -> tuple[np.ndarray, Any]:
    """The reference's ``resize_image_with_pad``: short side -> ``resolution``, then
    edge padding on the bottom/right to multiples of 64.

    ``k = resolution / min(H, W)``; ``(round(H k), round(W k))``; CUBIC if ``k > 1`` else
    AREA. Returns the padded image and ``remove_pad(x) -> x[:round(H k), :round(W k)]``.

    Raises:
        ControlMapError: the scaled image would be absurdly large (extreme aspect).
    """
    import cv2
    import numpy as np

    from sdstack.control.resize import check_work_size, hwc3

    img = hwc3(image)
    height, width = img.shape[0], img.shape[1]
    k = float(resolution) / float(min(height, width))
    new_h, new_w = round(height * k), round(width * k)
    check_work_size(new_w, new_h, f"scaling a {width}x{height} image to resolution {resolution}")
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    img = cv2.resize(img, (new_w, new_h), interpolation=interpolation)
    pad_h, pad_w = -new_h % 64, -new_w % 64
    padded = np.pad(img, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:new_h, :new_w]).copy()

    return np.ascontiguousarray(padded), remove_pad


def run_none(image: np.ndarray, **_settings: Any) -> np.ndarray:
    """``none``: the image itself (it already is the control map)."""
    from sdstack.control.resize import hwc3

    return hwc3(image)


def run_invert(image: np.ndarray, **_settings: Any) -> np.ndarray:
    """Reference ``invert (from white bg & black line)``: ``255 - x``, no resize."""
    from sdstack.control.resize import hwc3

    return 255 - hwc3(image)


_LOW = Threshold("Low Threshold", 100, 1, 255)
_HIGH = Threshold("High Threshold", 200, 1, 255)


def run_canny(
    image: np.ndarray, *, resolution: int, threshold_a: float | None, threshold_b: float | None
) -> np.ndarray:
    """Reference ``canny``: ``cv2.Canny(padded, int(low), int(high))`` as RGB, unpadded.

    Hysteresis thresholds low (A, default 100) and high (B, default 200) on the image
    after ``resize_image_with_pad(image, resolution)``; cv2 swaps them if low > high.
    """
    import cv2

    padded, remove_pad = resize_image_with_pad(image, resolution)
    low, high = int(_value(threshold_a, _LOW)), int(_value(threshold_b, _HIGH))
    edges = cv2.cvtColor(cv2.Canny(padded, low, high), cv2.COLOR_GRAY2RGB)
    return remove_pad(edges)


_XDOG = Threshold("XDoG Threshold", 32, 1, 64)


def run_scribble_xdog(
    image: np.ndarray, *, resolution: int, threshold_a: float | None, **_settings: Any
) -> np.ndarray:
    """Reference ``scribble_xdog``: white lines where the difference of Gaussians is dark.

    ``g1, g2 = GaussianBlur(x, sigma 0.5), GaussianBlur(x, sigma 5)`` (float32);
    ``dog = uint8(clip(255 - min_c(g2 - g1)))``; 255 (all channels) where
    ``uint8(2 (255 - dog)) > A`` (A default 32; the product wraps modulo 256 as in the
    reference), on the padded image at ``resolution``.
    """
    import cv2
    import numpy as np

    padded, remove_pad = resize_image_with_pad(image, resolution)
    x = padded.astype(np.float32)
    g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    # uint8 arithmetic as in the reference: 2 * (255 - dog) wraps modulo 256, so DoG
    # strengths 128..144 fall under the default threshold there too.
    doubled = np.uint8(2) * (np.uint8(255) - dog)
    result = np.zeros_like(padded)
    result[doubled > _value(threshold_a, _XDOG)] = 255
    return remove_pad(result)


_BINARIZE = Threshold("Binarization Threshold", 127, 0, 255)


def run_threshold(
    image: np.ndarray, *, resolution: int, threshold_a: float | None, **_settings: Any
) -> np.ndarray:
    """Reference ``threshold``: 255 where the darkest channel is above A (default 127),
    else 0, on the padded image at ``resolution``."""
    import numpy as np

    padded, remove_pad = resize_image_with_pad(image, resolution)
    result = np.zeros_like(padded)
    result[np.min(padded, axis=2) > _value(threshold_a, _BINARIZE)] = 255
    return remove_pad(result)


def run_lineart_standard(image: np.ndarray, *, resolution: int, **_settings: Any) -> np.ndarray:
    """Reference ``lineart_standard (from white bg & black line)``: dark lines on a light
    background -> white lines on black, by how much darker a pixel is than its blur.

    ``x`` float32 at ``resolution`` (padded); ``g = GaussianBlur(x, sigma 6)``;
    ``i = clip(min_c(g - x), 0, 255)``; ``i / max(16, median(i[i > 8])) * 127``, clipped
    and truncated to uint8 (the median of an empty set counts as 16).
    """
    import cv2
    import numpy as np

    padded, remove_pad = resize_image_with_pad(image, resolution)
    x = padded.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong))) if strong.size else 16.0
    intensity *= 127
    return remove_pad(intensity.clip(0, 255).astype(np.uint8))


_DOWNSAMPLE = Threshold("Down Sampling Rate", 1.0, 1.0, 8.0, whole=False)


def run_tile_resample(image: np.ndarray, *, threshold_a: float | None, **_settings: Any) -> Any:
    """Reference ``tile_resample``: shrink by the rate A (default 1.0) with AREA.

    ``(int(H / A), int(W / A))``; rates below 1.1 return the image unchanged. The map
    is brought back to the job size by ``resize_control_map`` (so this blurs).
    """
    import cv2

    from sdstack.control.resize import hwc3

    img = hwc3(image)
    rate = float(_value(threshold_a, _DOWNSAMPLE))
    if rate < 1.1:
        return img
    height, width = max(1, int(img.shape[0] / rate)), max(1, int(img.shape[1] / rate))
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)


PREPROCESSORS.register(
    "none", Preprocessor("none", "none", "the image is the map", run_none, uses_resolution=False)
)
PREPROCESSORS.register(
    "invert",
    Preprocessor(
        "invert", "invert (from white bg & black line)", "255 - image (black lines on white "
        "-> white on black)", run_invert, uses_resolution=False,
    ),
    aliases=("invert (from white bg & black line)",),
)  # fmt: skip
PREPROCESSORS.register(
    "canny",
    Preprocessor("canny", "canny", "cv2.Canny edges", run_canny, _LOW, _HIGH),
)
PREPROCESSORS.register(
    "scribble",
    Preprocessor(
        "scribble", "scribble_xdog", "XDoG lines (difference of Gaussians)",
        run_scribble_xdog, _XDOG,
    ),
    aliases=("scribble_xdog", "xdog"),
)  # fmt: skip
PREPROCESSORS.register(
    "threshold",
    Preprocessor("threshold", "threshold", "binarised image", run_threshold, _BINARIZE),
    aliases=("binary",),
)
PREPROCESSORS.register(
    "lineart_standard",
    Preprocessor(
        "lineart_standard", "lineart_standard (from white bg & black line)",
        "lines of a drawing, darker than their surroundings", run_lineart_standard,
    ),
    aliases=("lineart_standard (from white bg & black line)",),
)  # fmt: skip
PREPROCESSORS.register(
    "tile",
    Preprocessor(
        "tile", "tile_resample", "the image shrunk by the rate", run_tile_resample,
        _DOWNSAMPLE, uses_resolution=False,
    ),
    aliases=("tile_resample",),
)  # fmt: skip


def find_preprocessor(module: str) -> Preprocessor:
    """The preprocessor ``module`` names (canonical name, reference name or alias);
    the same as ``PREPROCESSORS[module]``.

    Raises:
        PreprocessorUnavailableError: a reference preprocessor sdstack does not run (it
            needs weights, or is not implemented); the message says what to do.
        UnknownPreprocessorError: any other name (names the nearest of all modules).
    """
    return PREPROCESSORS.get(module)


def check_resolution(resolution: int | None) -> int:
    """The preprocessor resolution: None or -1 -> 512, else a whole number in 64..2048.

    Raises:
        PreprocessorError: out of range or not a whole number.
    """
    if resolution is None or (not isinstance(resolution, bool) and resolution == UNSET):
        return DEFAULT_RESOLUTION
    low, high = RESOLUTION_RANGE
    whole = isinstance(resolution, int) or (
        isinstance(resolution, float) and resolution.is_integer()
    )
    if isinstance(resolution, bool) or not whole or not low <= resolution <= high:
        raise PreprocessorError(
            f"preprocessor resolution {resolution!r}: expected a whole number in "
            f"{low}..{high} (default {DEFAULT_RESOLUTION})"
        )
    return int(resolution)


def check_threshold(preprocessor: Preprocessor, which: str, value: float | None) -> float | None:
    """A threshold for ``preprocessor``: None or -1 -> None (the default), else in range.

    A value for a slider the preprocessor does not have is ignored (None), as the
    reference ignores it (its infotexts carry such values, e.g. ``Threshold A: 0.5``).

    Raises:
        PreprocessorError: outside the slider's range, not a number, or a fraction for
            a whole-number slider.
    """
    slider = preprocessor.threshold_a if which == "a" else preprocessor.threshold_b
    if value is None or slider is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise PreprocessorError(
            f"control module {preprocessor.name!r} threshold {which.upper()} "
            f"({slider.label}) {value!r}: expected a number"
        )
    if value == UNSET:
        return None
    fits = slider.minimum <= value <= slider.maximum
    if not fits or (slider.whole and not float(value).is_integer()):
        kind = "a whole number" if slider.whole else "a number"
        raise PreprocessorError(
            f"control module {preprocessor.name!r} threshold {which.upper()} "
            f"({slider.label}) {value!r}: expected {kind} in "
            f"{_number(slider.minimum)}..{_number(slider.maximum)} "
            f"(default {_number(slider.default)})"
        )
    return float(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def preprocess(
    module: str,
    image: Any,
    *,
    resolution: int | None = DEFAULT_RESOLUTION,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
) -> np.ndarray:
    """Run the control preprocessor ``module`` on an image, as the reference does.

    Args:
        module: a name of :data:`PREPROCESSORS` (or its reference name / an alias).
        image: H x W (x 1/3/4) uint8 array (``hwc3`` rules: RGBA on white).
        resolution: the reference's ``processor_res`` (short side the image is scaled
            to before detection), 64..2048; -1 or None: 512. Unused by none, invert,
            tile.
        threshold_a, threshold_b: the module's sliders (see ``Preprocessor``); None or
            -1: its default. Values for sliders a module lacks are ignored.

    Returns:
        The map, H' x W' x 3 uint8 (size depends on the module and ``resolution``).

    Raises:
        PreprocessorUnavailableError, UnknownPreprocessorError, PreprocessorError,
        ControlMapError (a bad array).
    """
    from sdstack.control.resize import hwc3

    # 1. Check the settings.
    preprocessor = find_preprocessor(module)
    res = check_resolution(resolution) if preprocessor.uses_resolution else DEFAULT_RESOLUTION
    a = check_threshold(preprocessor, "a", threshold_a)
    b = check_threshold(preprocessor, "b", threshold_b)
    # 2. Run it on the 3-channel image.
    result = preprocessor.run(hwc3(image), resolution=res, threshold_a=a, threshold_b=b)
    return hwc3(result)
