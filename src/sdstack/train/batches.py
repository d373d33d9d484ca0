"""One epoch's batches as kohya sd-scripts draws them, step counts and the dry-run report.

Reference: sd-scripts ``BaseDataset.make_buckets`` / ``shuffle_buckets``. Each image is
put into its bucket ``repeats`` times; each bucket is cut into batches of ``batch_size``
(the last one may be smaller), never mixing buckets. At each epoch every bucket's list is
shuffled, then the order of all batches:

    batches_per_epoch = sum_b ceil(count_b / batch_size)
    steps_per_epoch   = ceil(batches_per_epoch / gradient_accumulation)
    steps (--epochs E) = E * steps_per_epoch;  epochs (--steps N) = ceil(N / steps_per_epoch)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from sdstack.errors import SdstackError
from sdstack.train.buckets import BucketedImage, Buckets, Size, bucket_info
from sdstack.train.dataset import TrainingData


class BatchError(SdstackError):
    """Batch settings that cannot work: batch size < 1, both or neither of steps/epochs."""


@dataclass(frozen=True)
class Batch:
    """Images of one bucket trained together in one step (flip/caption chosen later)."""

    bucket: Size
    images: tuple[BucketedImage, ...]

    def __len__(self) -> int:
        return len(self.images)


def epoch_batches(
    data: TrainingData, buckets: Buckets, batch_size: int, rng: random.Random
) -> list[Batch]:
    """kohya's bucket batching for one epoch, drawn with ``rng`` (seeded by the caller).

    Every image ``repeats`` times into its bucket, buckets in sorted order, each bucket's
    list ``rng.shuffle``d, cut into ``batch_size`` batches, then the batch order
    ``rng.shuffle``d. Successive calls with one ``rng`` give successive epochs.

    Raises:
        BatchError: ``batch_size`` is not a positive integer, or ``buckets`` were not
            assigned from ``data``.
    """
    _check_batch_size(batch_size)
    _check_same_data(data, buckets)
    per_bucket: dict[Size, list[BucketedImage]] = {size: [] for size in buckets.resolutions}
    for image in buckets.images:
        per_bucket[image.bucket].extend([image] * image.repeats)
    batches = []
    for size, entries in per_bucket.items():
        rng.shuffle(entries)
        for start in range(0, len(entries), batch_size):
            batches.append(Batch(bucket=size, images=tuple(entries[start : start + batch_size])))
    rng.shuffle(batches)
    return batches


def batches_per_epoch(buckets: Buckets, batch_size: int) -> int:
    """``sum_b ceil(count_b / batch_size)`` over the buckets (with repeats)."""
    _check_batch_size(batch_size)
    return sum(-(-count // batch_size) for count in buckets.counts.values())


def steps_per_epoch(buckets: Buckets, batch_size: int, gradient_accumulation: int = 1) -> int:
    """Optimizer steps per epoch: ``ceil(batches_per_epoch / gradient_accumulation)``."""
    if (
        isinstance(gradient_accumulation, bool)
        or not isinstance(gradient_accumulation, int)
        or gradient_accumulation < 1
    ):
        raise BatchError(
            f"gradient accumulation: got {gradient_accumulation!r}, expected a positive integer"
        )
    return -(-batches_per_epoch(buckets, batch_size) // gradient_accumulation)


def plan_steps(
    buckets: Buckets,
    batch_size: int,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    gradient_accumulation: int = 1,
) -> tuple[int, int]:
    """``(epochs, total steps)`` from exactly one of ``epochs`` and ``steps``.

    ``--epochs E``: ``E * steps_per_epoch``; ``--steps N``: ``ceil(N / steps_per_epoch)``
    epochs (the last one cut short at N).

    Raises:
        BatchError: both or neither given, or a count that is not a positive integer.
    """
    if (epochs is None) == (steps is None):
        raise BatchError(
            f"steps/epochs: got steps={steps!r} and epochs={epochs!r}, expected exactly one of them"
        )
    per_epoch = steps_per_epoch(buckets, batch_size, gradient_accumulation)
    count, what = (epochs, "epochs") if epochs is not None else (steps, "steps")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise BatchError(f"{what}: got {count!r}, expected a positive integer")
    if epochs is not None:
        return epochs, epochs * per_epoch
    return math.ceil(count / per_epoch), count


def dry_run_report(
    data: TrainingData,
    buckets: Buckets,
    batch_size: int,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    gradient_accumulation: int = 1,
) -> str:
    """What a run would train on, as text: subsets (repeats, images), buckets (counts with
    repeats), batches and steps per epoch, epochs and total steps.

    Raises:
        BatchError: as :func:`plan_steps`.
    """
    _check_same_data(data, buckets)
    total_epochs, total_steps = plan_steps(
        buckets,
        batch_size,
        epochs=epochs,
        steps=steps,
        gradient_accumulation=gradient_accumulation,
    )
    lines = [f"data: {data.folder}"]
    width = max(len(subset.name) for subset in data.subsets)
    for subset in data.subsets:
        count = len(subset.images)
        lines.append(
            f"  {subset.name:<{width}}  {count} images x {subset.repeats} repeats "
            f"= {count * subset.repeats}"
        )
    lines.append(f"images: {data.num_images}, with repeats: {data.num_train_images}")
    info = bucket_info(buckets)
    lines.append(
        f"buckets: {len(info['buckets'])} (mean aspect-ratio error {info['mean_img_ar_error']:.4f})"
    )
    for bucket in info["buckets"].values():
        w, h = bucket["resolution"]
        lines.append(f"  {w}x{h}: {bucket['count']}")
    lines.append(
        f"batch size: {batch_size}, batches per epoch: {batches_per_epoch(buckets, batch_size)}"
    )
    if gradient_accumulation != 1:
        lines.append(f"gradient accumulation: {gradient_accumulation}")
    lines.append(f"steps per epoch: {steps_per_epoch(buckets, batch_size, gradient_accumulation)}")
    lines.append(f"epochs: {total_epochs}, steps: {total_steps}")
    return "\n".join(lines)


def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BatchError(f"batch size: got {batch_size!r}, expected a positive integer")


def _check_same_data(data: TrainingData, buckets: Buckets) -> None:
    """BatchError unless ``buckets`` holds exactly ``data``'s images and repeats."""
    expected = [(item, subset.repeats) for subset, item in data.items()]
    got = [(image.item, image.repeats) for image in buckets.images]
    if expected != got:
        raise BatchError(
            "buckets were assigned from another training data set; call "
            "assign_buckets(data, manager) for this data"
        )
