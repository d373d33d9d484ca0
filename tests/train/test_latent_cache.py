"""LatentCache: diffusers' latent_dist.sample on the tiny VAE, stored once, read after."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from sdstack.errors import SdstackWarning
from sdstack.train.batches import epoch_batches
from sdstack.train.buckets import BucketManager, assign_buckets, load_bucket_image
from sdstack.train.dataset import scan_dataset
from sdstack.train.latent_cache import LatentCache, LatentCacheError, vae_fingerprint


class CountingVae:
    """The tiny VAE with its encoder calls counted (everything else passed through)."""

    def __init__(self, vae):
        self.vae, self.calls, self.images = vae, 0, 0

    def encode(self, pixels):
        self.calls += 1
        self.images += pixels.shape[0]
        return self.vae.encode(pixels)

    def __getattr__(self, name):
        return getattr(self.vae, name)


@pytest.fixture(scope="module")
def vae():
    from sdstack.models.tiny import tiny_vae

    return tiny_vae(seed=0).eval()


@pytest.fixture(scope="module")
def data(shapes_dataset):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan_dataset(shapes_dataset.folder)


@pytest.fixture(scope="module")
def buckets(data):
    return assign_buckets(data, BucketManager(64, steps=16, min_size=32))


def _epoch(cache, data, buckets, vae, seed):
    out = {}
    for batch in epoch_batches(data, buckets, 4, random.Random(seed)):
        flips = [i % 2 == 1 for i in range(len(batch))]
        latents = cache.latents_for_batch(batch, flips, vae)
        assert latents.shape[0] == len(batch)
        for image, flip, latent in zip(batch.images, flips, latents, strict=True):
            out[(image.item.path.name, flip)] = latent
    return out


def test_epochs_after_the_first_skip_the_vae(tmp_path, data, buckets, vae):
    counting = CountingVae(vae)
    cache = LatentCache(tmp_path / "cache")
    first = _epoch(cache, data, buckets, counting, seed=0)
    calls, encoded = counting.calls, counting.images
    assert calls == cache.vae_calls >= 1
    assert encoded == len(first)  # each (image, flip) encoded exactly once
    second = _epoch(cache, data, buckets, counting, seed=1)
    third = _epoch(LatentCache(tmp_path / "cache"), data, buckets, counting, seed=2)
    assert counting.calls == calls  # no VAE call after the first epoch, nor in a new run
    for key, latent in second.items() | third.items():
        if key in first:
            assert torch.equal(latent, first[key])
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # atomic writes left nothing


def test_a_latent_is_diffusers_latent_dist_sample_times_the_scaling_factor(
    tmp_path, data, buckets, vae
):
    cache = LatentCache(tmp_path)
    image = next(im for im in buckets.images if im.item.width != im.item.height)
    got = cache.latents_for(image.item, image.bucket, True, vae, resized=image.resized)
    # independent: diffusers' own sample() with a generator seeded from the key
    fields = cache.entry_fields(image.item, image.bucket, image.resized, True,
                                vae_fingerprint(vae))  # fmt: skip
    pixels = load_bucket_image(image.item.path, image.bucket, image.resized, flip=True)
    with torch.no_grad():
        distribution = vae.encode(pixels[None]).latent_dist
    generator = torch.Generator().manual_seed(int(fields["key"][:15], 16))
    expected = distribution.sample(generator)[0] * vae.config.scaling_factor
    assert got.shape == (4, image.bucket[1] // 8, image.bucket[0] // 8)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert cache.path_of(fields).is_file()


def test_key_changes_with_flip_bucket_image_and_vae(tmp_path, vae, fresh_shapes_dataset):
    from PIL import Image

    from sdstack.models.tiny import tiny_vae

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = scan_dataset(fresh_shapes_dataset.folder)
    item = data.subsets[0].images[0]  # blue_square.png, 64x64
    counting = CountingVae(vae)
    cache = LatentCache(tmp_path / "cache")
    plain = cache.latents_for(item, (64, 64), False, counting)
    flipped = cache.latents_for(item, (64, 64), True, counting)
    smaller = cache.latents_for(item, (32, 32), False, counting)
    assert counting.calls == 3 and smaller.shape == (4, 4, 4)
    assert not torch.equal(plain, flipped)
    cache.latents_for(item, (64, 64), False, counting)
    assert counting.calls == 3
    other = CountingVae(tiny_vae(seed=1))
    assert vae_fingerprint(other) != vae_fingerprint(vae)
    cache.latents_for(item, (64, 64), False, other)
    assert other.calls == 1
    Image.new("RGB", (64, 64), "black").save(item.path)  # the image file changes
    changed = cache.latents_for(item, (64, 64), False, counting)
    assert counting.calls == 4 and not torch.equal(changed, plain)


def _stored_path(cache, item, vae):
    from sdstack.train.buckets import cover_size

    fields = cache.entry_fields(item, (64, 64), cover_size(item.width, item.height, (64, 64)),
                                False, vae_fingerprint(vae))  # fmt: skip
    return cache.path_of(fields)


@pytest.mark.parametrize("damage", ["garbage", "wrong_shape", "huge", "nan"])
def test_a_damaged_cache_file_is_warned_and_encoded_again(tmp_path, data, vae, damage):
    from safetensors.torch import save_file

    item = data.subsets[0].images[0]
    counting = CountingVae(vae)
    cache = LatentCache(tmp_path)
    good = cache.latents_for(item, (64, 64), False, counting)
    path = _stored_path(cache, item, vae)
    fields = dict(LatentCache(tmp_path).entry_fields(
        item, (64, 64), (64, 64), False, vae_fingerprint(vae)))  # fmt: skip
    if damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif damage == "wrong_shape":
        save_file({"latents": torch.zeros(4, 2, 2)}, str(path), metadata=fields)
    elif damage == "nan":
        save_file({"latents": torch.full_like(good, float("nan"))}, str(path), metadata=fields)
    else:
        path.write_bytes(b"\0" * (1 << 17))
    with pytest.warns(SdstackWarning, match=r"latent cache file .*; encoding it again"):
        again = cache.latents_for(item, (64, 64), False, counting)
    assert counting.calls == 2 and torch.equal(again, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is good again
        assert torch.equal(cache.latents_for(item, (64, 64), False, counting), good)


def test_an_unwritable_cache_folder_is_an_error(tmp_path, data, vae):
    (tmp_path / "file").write_text("in the way")
    cache = LatentCache(tmp_path / "file")
    with pytest.raises(LatentCacheError, match=r"latent cache folder .*file.*: cannot write"):
        cache.latents_for(data.subsets[0].images[0], (64, 64), False, vae)


def test_flips_must_match_the_batch(tmp_path, data, buckets, vae):
    batch = epoch_batches(data, buckets, 2, random.Random(0))[0]
    with pytest.raises(LatentCacheError, match="flips: got 1 flags for a batch of 2 images"):
        LatentCache(tmp_path).latents_for_batch(batch, [False], vae)


def test_vae_fingerprint_is_the_same_in_either_memory_layout():
    """Channels-last weights (the CPU default of load_model) hold the same values: same
    fingerprint, and no error from 1x1 convolutions whose last stride is not 1."""
    import copy

    from sdstack.models.tiny import tiny_vae

    contiguous = tiny_vae(seed=0).eval()
    laid_out = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    one_by_one = [p for p in laid_out.parameters() if p.dim() == 4 and p.shape[-1] == 1]
    assert one_by_one and one_by_one[0].stride(-1) != 1
    assert vae_fingerprint(laid_out) == vae_fingerprint(contiguous)
