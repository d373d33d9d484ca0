"""Aspect-ratio buckets as kohya sd-scripts makes them (``BucketManager``).

Reference: sd-scripts ``model_util.make_bucket_resolutions`` and
``train_util.BucketManager`` / ``trim_and_resize_if_required``. Buckets are sizes that
are multiples of ``steps`` with about the area of ``resolution``; an image goes to the
bucket whose aspect ratio is nearest its own, is scaled to cover it and centre-cropped:

    bucket  = argmin |bw/bh - w/h|              (an exact size match is used as is)
    s       = bh/h if w/h > bw/bh else bw/w     (cover)
    resized = (int(w*s + 0.5), int(h*s + 0.5)); crop (resized - bucket)//2 each side

With ``no_upscale`` an image within the area keeps its size and its bucket is its size
floored to ``steps``. Without bucketing there is one bucket, ``resolution`` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdstack.errors import SdstackError

if TYPE_CHECKING:
    import torch

    from sdstack.train.dataset import ImageItem, TrainingData

Size = tuple[int, int]


class BucketError(SdstackError):
    """Bucket settings that cannot work (resolution outside min/max, bad steps)."""


def make_bucket_resolutions(
    max_reso: int | Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """kohya ``make_bucket_resolutions``: the sorted set of bucket sizes.

    With ``area = W*H``: the square ``(floor(sqrt(area)/d)*d)^2``, and for ``width = min,
    min+d, ... <= max``: ``height = min(max, floor((area // width)/d)*d)``, adding
    ``(width, height)`` and ``(height, width)`` when ``height >= min``.
    """
    width, height = _as_size(max_reso, "resolution")
    area = width * height
    side = int(math.sqrt(area) // divisible) * divisible
    resolutions = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // divisible) * divisible)
        if height >= min_size:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += divisible
    return sorted(resolutions)


class BucketManager:
    """kohya ``BucketManager``: picks each image's bucket and resized size.

    Args:
        resolution: ``S`` or ``(W, H)``; the area of the buckets (``--resolution``).
        enable_bucket: aspect-ratio buckets; False gives the one bucket ``(W, H)``.
        min_size, max_size: bucket side limits, floored/ceiled to ``steps`` (kohya's
            ``--min_bucket_reso``/``--max_bucket_reso``); None: kohya's 256 and 1024,
            except that a resolution side under 256 gets half that side (at least
            ``steps``) and one over 1024 that side (a tiny model trains at 64).
        steps: bucket sides are multiples of it (``--bucket_reso_steps``).
        no_upscale: keep images within the area at their size (``--bucket_no_upscale``).

    Raises:
        BucketError: a size is not a positive integer, steps is not a multiple of 8,
            or ``min_size <= min(resolution)``, ``max(resolution) <= max_size`` fails.
    """

    def __init__(
        self,
        resolution: int | Size = 512,
        *,
        enable_bucket: bool = True,
        min_size: int | None = None,
        max_size: int | None = None,
        steps: int = 64,
        no_upscale: bool = False,
    ) -> None:
        self.resolution = _as_size(resolution, "resolution")
        self.steps = _positive(steps, "bucket steps")
        if min_size is None:
            smaller = min(self.resolution)
            min_size = 256 if smaller >= 256 else max(steps, smaller // 2)
        if max_size is None:
            max_size = max(1024, max(self.resolution))
        if steps % 8:
            raise BucketError(
                f"bucket steps: got {steps}, expected a multiple of 8 (the VAE downsamples by 8)"
            )
        if any(side % 8 for side in self.resolution):
            raise BucketError(f"resolution: got {self.resolution}, expected multiples of 8")
        self.min_size = _positive(min_size, "min bucket size") // steps * steps
        self.max_size = -(-_positive(max_size, "max bucket size") // steps) * steps
        self.enable_bucket = enable_bucket
        self.no_upscale = no_upscale and enable_bucket
        if enable_bucket:
            _check_limits(self.resolution, self.min_size, self.max_size)
            self.predefined = make_bucket_resolutions(
                self.resolution, self.min_size, self.max_size, steps
            )
        else:
            self.predefined = [self.resolution]
        self._predefined_set = set(self.predefined)
        self.max_area = self.resolution[0] * self.resolution[1]

    def select_bucket(self, width: int, height: int) -> tuple[Size, Size]:
        """``((bucket_w, bucket_h), (resized_w, resized_h))`` for an image of that size."""
        width = _positive(width, "image width")
        height = _positive(height, "image height")
        if self.no_upscale:
            return self._select_no_upscale(width, height)
        bucket = (width, height)
        if bucket not in self._predefined_set:
            ratio = width / height
            bucket = min(self.predefined, key=lambda size: abs(size[0] / size[1] - ratio))
        return bucket, cover_size(width, height, bucket)

    def _select_no_upscale(self, width: int, height: int) -> tuple[Size, Size]:
        """kohya's ``bucket_no_upscale`` branch (shrink to the area, floor to steps)."""
        ratio = width / height
        resized = (width, height)
        if width * height > self.max_area:
            resized_w = math.sqrt(self.max_area * ratio)
            resized_h = self.max_area / resized_w
            w_rounded = self._round_to_steps(resized_w)
            h_in_w = self._round_to_steps(w_rounded / ratio)
            h_rounded = self._round_to_steps(resized_h)
            w_in_h = self._round_to_steps(h_rounded * ratio)
            error_w = abs(w_rounded / max(h_in_w, 1) - ratio)
            error_h = abs(w_in_h / max(h_rounded, 1) - ratio)
            if error_w < error_h:
                resized = (w_rounded, int(w_rounded / ratio + 0.5))
            else:
                resized = (int(h_rounded * ratio + 0.5), h_rounded)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if min(bucket) == 0 or min(resized) == 0:
            # smaller than one step on a side: kohya would give a 0-wide bucket; cover
            # the smallest bucket of the same orientation instead
            bucket = (max(bucket[0], self.steps), max(bucket[1], self.steps))
            resized = cover_size(width, height, bucket)
        return bucket, resized

    def _round_to_steps(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.steps


def cover_size(width: int, height: int, bucket: Size) -> Size:
    """The size that covers ``bucket`` at the image's aspect: kohya's scale rule,
    ``s = bh/h`` if ``w/h > bw/bh`` else ``bw/w``; ``(int(w*s+0.5), int(h*s+0.5))``."""
    wider = width / height > bucket[0] / bucket[1]
    scale = bucket[1] / height if wider else bucket[0] / width
    return (
        max(bucket[0], int(width * scale + 0.5)),
        max(bucket[1], int(height * scale + 0.5)),
    )


@dataclass(frozen=True)
class BucketedImage:
    """An image, its repeats and its bucket: where one epoch puts it ``repeats`` times."""

    item: ImageItem
    repeats: int
    bucket: Size
    resized: Size
    ar_error: float  # bucket aspect ratio minus image aspect ratio


@dataclass(frozen=True)
class Buckets:
    """Every image of a :class:`TrainingData` with its bucket (from :func:`assign_buckets`)."""

    images: tuple[BucketedImage, ...]
    manager: BucketManager

    @property
    def resolutions(self) -> list[Size]:
        """The buckets that hold at least one image, sorted (kohya's order)."""
        return sorted({image.bucket for image in self.images})

    @property
    def counts(self) -> dict[Size, int]:
        """Entries per bucket in one epoch: ``sum(repeats)`` of its images."""
        counts = dict.fromkeys(self.resolutions, 0)
        for image in self.images:
            counts[image.bucket] += image.repeats
        return counts

    def of(self, item: ImageItem) -> BucketedImage:
        """The bucket record of ``item`` (BucketError for an image not assigned here)."""
        for image in self.images:
            if image.item == item:
                return image
        raise BucketError(f"training image {str(item.path)!r}: not in these buckets")


def assign_buckets(data: TrainingData, manager: BucketManager) -> Buckets:
    """Each image of ``data`` into its bucket (``manager.select_bucket``), with repeats."""
    images = []
    for subset, item in data.items():
        bucket, resized = manager.select_bucket(item.width, item.height)
        error = bucket[0] / bucket[1] - item.width / item.height
        images.append(BucketedImage(item, subset.repeats, bucket, resized, error))
    return Buckets(images=tuple(images), manager=manager)


def mean_img_ar_error(buckets: Buckets) -> float:
    """kohya's ``mean_img_ar_error``: mean of ``|bucket_ar - image_ar|`` over the images
    (each image once, repeats not counted); 0.0 for no images."""
    if not buckets.images:
        return 0.0
    return sum(abs(image.ar_error) for image in buckets.images) / len(buckets.images)


def bucket_info(buckets: Buckets) -> dict[str, Any]:
    """kohya's ``bucket_info``: ``{"buckets": {i: {"resolution": (w, h), "count": n}},
    "mean_img_ar_error": x}`` over the non-empty buckets in sorted order, n with repeats."""
    counts = buckets.counts
    return {
        "buckets": {
            index: {"resolution": size, "count": counts[size]}
            for index, size in enumerate(buckets.resolutions)
        },
        "mean_img_ar_error": mean_img_ar_error(buckets),
    }


def load_bucket_image(
    path: Any, bucket: Size, resized: Size, *, flip: bool = False
) -> torch.Tensor:
    """kohya ``trim_and_resize_if_required`` + ``ToTensor`` + ``Normalize(0.5, 0.5)``.

    Resize to ``resized`` (``BOX`` = area when both sides shrink, else ``LANCZOS``), crop
    the excess centred (``excess // 2`` from the left/top), flip left-right if asked:
    a float32 ``(3, bucket_h, bucket_w)`` tensor, ``(x/255 - 0.5)/0.5`` in [-1, 1].

    Raises:
        ImageFileError: the image cannot be read (missing, corrupt, too many pixels).
        BucketError: ``resized`` does not cover ``bucket``.
    """
    import numpy as np
    import torch
    from PIL import Image

    from sdstack.generate.images import load_init_image

    bucket, resized = _as_size(bucket, "bucket"), _as_size(resized, "resized size")
    if resized[0] < bucket[0] or resized[1] < bucket[1]:
        raise BucketError(f"resized size {resized} does not cover bucket {bucket}")
    image = load_init_image(path, option="training image")
    if image.size != resized:
        shrink = image.width > resized[0] and image.height > resized[1]
        method = Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS
        image = image.resize(resized, method)
    left = (resized[0] - bucket[0]) // 2
    top = (resized[1] - bucket[1]) // 2
    image = image.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return (pixels.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def _as_size(value: int | Size, what: str) -> Size:
    """``S`` -> ``(S, S)``; ``(W, H)`` kept; BucketError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (_positive(value, what), value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (_positive(value[0], what), _positive(value[1], what))
    raise BucketError(f"{what}: got {value!r}, expected a size S or (W, H)")


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BucketError(f"{what}: got {value!r}, expected a positive integer")
    return value


def _check_limits(resolution: Size, min_size: int, max_size: int) -> None:
    """kohya's asserts, as errors: ``min_size <= min(resolution)``, ``max(...) <= max``."""
    if min(resolution) < min_size:
        raise BucketError(
            f"resolution {resolution}: smaller than the min bucket size "
            f"{min_size}; lower the min bucket size or raise the resolution"
        )
    if max(resolution) > max_size:
        raise BucketError(
            f"resolution {resolution}: larger than the max bucket size "
            f"{max_size}; raise the max bucket size or lower the resolution"
        )
