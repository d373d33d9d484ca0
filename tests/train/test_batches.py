"""Epoch batches, step counts and the dry-run report (spec: bucket filling)."""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter

import pytest

from sdstack.train.batches import (
    BatchError,
    batches_per_epoch,
    dry_run_report,
    epoch_batches,
    plan_steps,
    steps_per_epoch,
)
from sdstack.train.buckets import BucketManager, assign_buckets
from sdstack.train.dataset import scan_dataset


@pytest.fixture(scope="module")
def data(shapes_dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan_dataset(shapes_dataset.folder)


@pytest.fixture(scope="module")
def buckets(data):
    # three buckets: 48x80 (magenta ring x10), 64x64 (2 x10 + 2 x2), 80x48 (triangle x10)
    return assign_buckets(data, BucketManager(64, steps=16, min_size=32))


def test_each_image_repeats_times_per_epoch_in_its_own_bucket(data, buckets):
    batches = epoch_batches(data, buckets, 3, random.Random(0))
    seen = Counter()
    for batch in batches:
        assert 1 <= len(batch) <= 3
        assert {image.bucket for image in batch.images} == {batch.bucket}
        seen.update(image.item.path.name for image in batch.images)
    expected = {item.path.name: subset.repeats for subset, item in data.items()}
    assert dict(seen) == expected
    # per bucket: ceil(count / 3) batches: 48x80 10 -> 4, 64x64 24 -> 8, 80x48 10 -> 4
    per_bucket = Counter(batch.bucket for batch in batches)
    assert per_bucket == {(48, 80): 4, (64, 64): 8, (80, 48): 4}
    assert len(batches) == batches_per_epoch(buckets, 3) == 16


def test_batches_are_seeded_and_shuffled_per_epoch(data, buckets):
    def names(batches):
        return [tuple(image.item.path.name for image in b.images) for b in batches]

    first = names(epoch_batches(data, buckets, 2, random.Random(5)))
    assert first == names(epoch_batches(data, buckets, 2, random.Random(5)))
    rng = random.Random(5)
    epoch_1, epoch_2 = (names(epoch_batches(data, buckets, 2, rng)) for _ in range(2))
    assert epoch_1 == first and epoch_2 != epoch_1
    assert sorted(epoch_2) != epoch_2 or sorted(epoch_1) != epoch_1  # not in bucket order


def test_epoch_batches_follow_the_reference_order_of_rng_calls(data, buckets):
    # kohya: shuffle each bucket's list (buckets in sorted order), cut, shuffle batches
    reference = random.Random(9)
    cut = []
    for size in sorted({image.bucket for image in buckets.images}):
        entries = [im for im in buckets.images if im.bucket == size for _ in range(im.repeats)]
        reference.shuffle(entries)
        cut += [(size, tuple(entries[i : i + 4])) for i in range(0, len(entries), 4)]
    reference.shuffle(cut)
    got = [(b.bucket, b.images) for b in epoch_batches(data, buckets, 4, random.Random(9))]
    assert got == cut


def test_steps_per_epoch_and_plans(buckets):
    assert steps_per_epoch(buckets, 1) == 44
    assert steps_per_epoch(buckets, 3) == 16
    assert steps_per_epoch(buckets, 3, gradient_accumulation=3) == math.ceil(16 / 3)
    assert plan_steps(buckets, 3, epochs=2) == (2, 32)
    assert plan_steps(buckets, 3, steps=45) == (3, 45)
    assert plan_steps(buckets, 3, steps=32) == (2, 32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b: plan_steps(b, 1), "steps/epochs: got steps=None and epochs=None, "
         "expected exactly one of them"),
        (lambda b: plan_steps(b, 1, steps=2, epochs=1), "steps/epochs: got steps=2 and "
         "epochs=1, expected exactly one of them"),
        (lambda b: plan_steps(b, 1, steps=0), "steps: got 0, expected a positive integer"),
        (lambda b: steps_per_epoch(b, 0), "batch size: got 0, expected a positive integer"),
        (lambda b: steps_per_epoch(b, 1, 0), "gradient accumulation: got 0, expected a "
         "positive integer"),
    ],
)  # fmt: skip
def test_bad_counts_are_errors(buckets, call, message):
    with pytest.raises(BatchError) as info:
        call(buckets)
    assert str(info.value) == message


def test_buckets_of_other_data_are_refused(data, buckets, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = scan_dataset(tmp_path)
    with pytest.raises(BatchError, match="assigned from another training data set"):
        epoch_batches(other, buckets, 1, random.Random(0))


def test_dry_run_report(data, buckets, shapes_dataset):
    report = dry_run_report(data, buckets, 3, epochs=2)
    assert report == "\n".join([
        f"data: {shapes_dataset.folder}",
        "  10_shapes  4 images x 10 repeats = 40",
        "  2_extra    2 images x 2 repeats = 4",
        "images: 6, with repeats: 44",
        "buckets: 3 (mean aspect-ratio error "
        f"{(abs(48 / 80 - 64 / 96) + abs(80 / 48 - 96 / 64)) / 6:.4f})",
        "  48x80: 10",
        "  64x64: 24",
        "  80x48: 10",
        "batch size: 3, batches per epoch: 16",
        "steps per epoch: 16",
        "epochs: 2, steps: 32",
    ])  # fmt: skip
    with_steps = dry_run_report(data, buckets, 3, steps=7, gradient_accumulation=2)
    assert with_steps.splitlines()[-3:] == [
        "gradient accumulation: 2",
        "steps per epoch: 8",
        "epochs: 1, steps: 7",
    ]
