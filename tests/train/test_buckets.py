"""Aspect-ratio buckets against the kohya rules (spec: Aspect-ratio buckets)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sdstack.train.buckets import (
    BucketError,
    BucketManager,
    assign_buckets,
    bucket_info,
    load_bucket_image,
    make_bucket_resolutions,
    mean_img_ar_error,
)
from sdstack.train.dataset import scan_dataset

# Worked by hand from the spec formula at 512x512, 256..1024, step 64 (area 262144):
# width 256 -> 1024, 320 -> 768 (819), 384 -> 640 (682), 448 -> 576 (585), 512 -> 512,
# 576 -> 448 (455), 640 -> 384 (409), 704 -> 320 (372), 768 -> 320 (341),
# 832 / 896 / 960 / 1024 -> 256; each with its transpose.
SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
    (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
    (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_make_bucket_resolutions_at_512_matches_the_worked_example():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD15_BUCKETS
    assert BucketManager(512).predefined == SD15_BUCKETS


def test_the_square_is_always_a_bucket():
    # area 640*384 = 245760: sqrt 495.7 -> 448 square, though no width gives 448x448
    resolutions = make_bucket_resolutions((640, 384), 256, 1024, 64)
    assert (448, 448) in resolutions
    assert resolutions == sorted(set(resolutions))


def _nearest(width, height, buckets):
    ratio = width / height
    return min(buckets, key=lambda size: abs(size[0] / size[1] - ratio))


def test_select_bucket_exact_match_and_nearest_aspect_with_cover_scale():
    manager = BucketManager(512)
    assert manager.select_bucket(640, 384) == ((640, 384), (640, 384))  # exact match
    # 1000x600 (ar 1.667) -> 640x384 (1.667): wider-or-equal, so s = 640/1000 -> (640, 384)
    assert manager.select_bucket(1000, 600) == ((640, 384), (640, 384))
    # 300x1000 (ar 0.3) -> nearest 320x1024? not a bucket: 256x832 (0.3077);
    # ar 0.3 < 0.3077 so s = 256/300: (int(256.5), int(853.83)) = (256, 853)
    bucket = _nearest(300, 1000, SD15_BUCKETS)
    assert bucket == (256, 832)
    assert manager.select_bucket(300, 1000) == ((256, 832), (256, 853))


def test_no_bucketing_is_one_bucket_with_the_same_cover_and_crop():
    manager = BucketManager((128, 64), enable_bucket=False)
    assert manager.predefined == [(128, 64)]
    # 100x100 (ar 1) into 128x64 (ar 2): ar <= 2 so s = 128/100 -> (128, 128)
    assert manager.select_bucket(100, 100) == ((128, 64), (128, 128))


def test_no_upscale_keeps_small_images_and_shrinks_large_ones_to_the_area():
    manager = BucketManager(512, no_upscale=True)
    # within the area: no resize, bucket floored to multiples of 64
    assert manager.select_bucket(300, 200) == ((256, 192), (300, 200))
    # 2048x1024 (ar 2) over 512*512: sqrt(262144*2) = 724.08 -> width 704 -> height 352
    # (round_to_steps(352) = 320, error |704/320 - 2| = 0.2); height 362.04 -> 320 ->
    # width round_to_steps(640) = 640, error |640/320 - 2| = 0: the height rule wins,
    # resized (int(320*2 + 0.5), 320) = (640, 320), bucket (640, 320)
    assert manager.select_bucket(2048, 1024) == ((640, 320), (640, 320))
    # smaller than one step: the smallest bucket, covered
    assert manager.select_bucket(40, 100) == ((64, 64), (64, 160))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 512, "min_size": 640}, "resolution (512, 512): smaller than the min "
         "bucket size 640; lower the min bucket size or raise the resolution"),
        ({"resolution": 512, "max_size": 256}, "resolution (512, 512): larger than the max "
         "bucket size 256; raise the max bucket size or lower the resolution"),
        ({"resolution": 0}, "resolution: got 0, expected a positive integer"),
        ({"resolution": (512,)}, "resolution: got (512,), expected a size S or (W, H)"),
        ({"resolution": 512, "steps": 12}, "bucket steps: got 12, expected a multiple of 8 "
         "(the VAE downsamples by 8)"),
        ({"resolution": 500}, "resolution: got (500, 500), expected multiples of 8"),
    ],
)  # fmt: skip
def test_bad_bucket_settings_are_errors(kwargs, message):
    with pytest.raises(BucketError) as info:
        BucketManager(**kwargs)
    assert str(info.value) == message


def test_small_resolutions_default_to_half_the_side_as_min_bucket():
    manager = BucketManager(64)
    assert (manager.min_size, manager.max_size) == (64, 1024)
    assert manager.predefined == [(64, 64)]
    assert BucketManager(128, steps=32).min_size == 64
    assert BucketManager(384).min_size == 256  # kohya's default from 256 up


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_resized_covers_its_bucket_at_the_image_aspect(width, height):
    manager = _MANAGER
    bucket, resized = manager.select_bucket(width, height)
    assert bucket in manager.predefined
    assert bucket == _nearest(width, height, manager.predefined) or (width, height) == bucket
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
    assert resized[0] == bucket[0] or resized[1] == bucket[1]  # covers, crops one side
    # the aspect is kept up to rounding of the longer side (half a pixel each side)
    assert abs(resized[0] * height - resized[1] * width) <= 0.5 * (width + height) + 1


_MANAGER = BucketManager(512)


def test_bucket_info_counts_repeats_and_mean_error_counts_images(shapes_dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = scan_dataset(shapes_dataset.folder)
    buckets = assign_buckets(data, BucketManager(64, steps=16, min_size=32))
    # 64x64 images stay (exact bucket); 96x64 (ar 1.5) goes to 80x48 (1.667) and 64x96
    # to 48x80, the nearest aspects among make_bucket_resolutions(64x64, 32, 1024, 16)
    predefined = make_bucket_resolutions((64, 64), 32, 1024, 16)
    expected_counts: dict = {}
    errors = []
    for subset, item in data.items():
        size = (item.width, item.height)
        bucket = size if size in predefined else _nearest(*size, predefined)
        expected_counts[bucket] = expected_counts.get(bucket, 0) + subset.repeats
        errors.append(abs(bucket[0] / bucket[1] - item.width / item.height))
    info = bucket_info(buckets)
    assert info["buckets"] == {
        i: {"resolution": size, "count": expected_counts[size]}
        for i, size in enumerate(sorted(expected_counts))
    }
    assert sum(b["count"] for b in info["buckets"].values()) == data.num_train_images
    assert info["mean_img_ar_error"] == pytest.approx(sum(errors) / len(errors), abs=1e-15)
    assert mean_img_ar_error(buckets) == info["mean_img_ar_error"]
    assert sorted(expected_counts) == [(48, 80), (64, 64), (80, 48)]


def _image(tmp_path, array):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    return path


def test_load_bucket_image_centre_crops_and_normalises(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    path = _image(tmp_path, array)
    got = load_bucket_image(path, (64, 64), (96, 64))
    # no resize (resized == size); excess 32 -> crop 16 from the left
    expected = torch.from_numpy(array[:, 16:80].astype(np.float64) / 255 * 2 - 1)
    assert got.dtype == torch.float32 and got.shape == (3, 64, 64)
    assert torch.allclose(got.double(), expected.permute(2, 0, 1), atol=1e-6)
    flipped = load_bucket_image(path, (64, 64), (96, 64), flip=True)
    assert torch.equal(flipped, got.flip(-1))


def test_load_bucket_image_shrinks_with_the_area_filter(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    path = _image(tmp_path, array)
    got = load_bucket_image(path, (32, 32), (32, 32))
    # area filter at an exact factor 2: the mean of each 2x2 block, rounded to uint8
    blocks = array.astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    expected = torch.from_numpy(blocks / 255 * 2 - 1).permute(2, 0, 1)
    assert (got.double() - expected).abs().max() <= 2 / 255 + 1e-6  # one uint8 level


def test_load_bucket_image_upscales_to_cover(tmp_path):
    array = np.full((20, 40, 3), 200, dtype=np.uint8)
    path = _image(tmp_path, array)
    got = load_bucket_image(path, (64, 64), (128, 64))
    assert got.shape == (3, 64, 64)
    assert torch.allclose(got, torch.full_like(got, 200 / 255 * 2 - 1), atol=2 / 255)


def test_load_bucket_image_bad_sizes_and_files(tmp_path):
    from sdstack.generate.images import ImageFileError

    path = _image(tmp_path, np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(BucketError, match=r"resized size \(32, 16\) does not cover bucket"):
        load_bucket_image(path, (32, 32), (32, 16))
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ImageFileError, match=r"bad\.png"):
        load_bucket_image(tmp_path / "bad.png", (8, 8), (8, 8))
