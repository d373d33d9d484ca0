"""VAE latents of the training images cached on disk (kohya's ``--cache_latents_to_disk``).

One safetensors file per (image, bucket, resized size, flip, VAE), named by

    key = sha256("sdstack-latent-v1|<image sha256>|<bw>x<bh>|<rw>x<rh>|flip=<0|1>|<vae>")

under ``<folder>/<key[:2]>/<key>.safetensors``, written atomically. The VAE fingerprint is
a sha256 over the VAE's state dict (names, dtypes, shapes, bytes) and its scaling factor,
so another VAE, or a changed image file, never meets an old latent.

A latent is kohya's ``latent_dist.sample()`` -- ``mean + std * n`` -- times the VAE's
``scaling_factor`` (ready for the UNet), with ``n ~ N(0, 1)`` drawn from a CPU generator
seeded by the key: the same entry always gets the same latent, cached or not. After the
first epoch every entry is on disk and the VAE is not called again
(:attr:`LatentCache.vae_calls` counts the encoder calls).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdstack.errors import SdstackError, SdstackWarning
from sdstack.train.buckets import Size, cover_size, load_bucket_image

if TYPE_CHECKING:
    import torch

    from sdstack.train.batches import Batch
    from sdstack.train.dataset import ImageItem

FORMAT = "sdstack-latent-v1"
_HEADER_SLACK = 1 << 16  # a cache file larger than its tensor plus this is not ours


class LatentCacheError(SdstackError):
    """The latent cache folder cannot be created or written."""


def vae_fingerprint(vae: Any) -> str:
    """sha256 hex over the VAE's ``state_dict`` (sorted names, dtype, shape, bytes) and
    ``config.scaling_factor``: equal for the same weights (in either memory layout),
    different for any change."""
    from sdstack.models.patcher import tensor_bytes

    digest = hashlib.sha256(FORMAT.encode())
    digest.update(repr(float(vae.config.scaling_factor)).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


class LatentCache:
    """Latents on disk under ``folder`` (created on first write).

    Args:
        folder: the cache folder (e.g. ``<output>.latents``); shared between runs.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.vae_calls = 0  # VAE encoder calls made through this cache
        self._image_hashes: dict[tuple[str, int, int], str] = {}
        self._vae_fingerprints: dict[int, tuple[Any, str]] = {}

    def latents_for(
        self,
        item: ImageItem,
        bucket: Size,
        flip: bool,
        vae: Any,
        *,
        resized: Size | None = None,
    ) -> torch.Tensor:
        """The latent ``(C, bh/8, bw/8)`` float32 (CPU) of ``item`` in ``bucket``: read
        from disk, or encoded by ``vae`` and stored. ``resized`` defaults to the cover
        size of the image in the bucket (:func:`~sdstack.train.buckets.cover_size`)."""
        return self._latents([(item, bucket, resized, flip)], vae)[0]

    def latents_for_batch(self, batch: Batch, flips: Sequence[bool], vae: Any) -> torch.Tensor:
        """The stacked latents ``(B, C, h, w)`` of a batch, one flag per image in
        ``flips``; the images not on disk are encoded in one VAE call."""
        if len(flips) != len(batch.images):
            raise LatentCacheError(f"flips: got {len(flips)} flags for a batch of "
                                   f"{len(batch.images)} images")  # fmt: skip
        import torch

        entries = [
            (image.item, image.bucket, image.resized, bool(flip))
            for image, flip in zip(batch.images, flips, strict=True)
        ]
        return torch.stack(self._latents(entries, vae))

    def _latents(self, entries: list[tuple[Any, Size, Size | None, bool]], vae: Any) -> list:
        """Each entry's latent from disk, the missing ones encoded together and stored."""
        fingerprint = self._fingerprint(vae)
        keyed = []
        for item, bucket, resized, flip in entries:
            resized = resized or cover_size(item.width, item.height, bucket)
            fields = self.entry_fields(item, bucket, resized, flip, fingerprint)
            keyed.append((item, bucket, resized, flip, fields))
        results: list[Any] = [self._read(fields, vae) for *_, fields in keyed]
        missing: dict[str, int] = {}  # key -> first index (a batch may repeat an entry)
        for index, latent in enumerate(results):
            if latent is None:
                missing.setdefault(keyed[index][4]["key"], index)
        if missing:
            encoded = self._encode([keyed[index] for index in missing.values()], vae)
            by_key = dict(zip(missing, encoded, strict=True))
            for key, index in missing.items():
                self._write(keyed[index][4], by_key[key])
            for index, latent in enumerate(results):
                if latent is None:
                    results[index] = by_key[keyed[index][4]["key"]]
        return results

    def entry_fields(
        self, item: Any, bucket: Size, resized: Size, flip: bool, fingerprint: str
    ) -> dict[str, str]:
        """The cache key's parts (stored as the file's metadata) plus ``key`` itself:
        ``sha256("|".join(the parts in name order))`` (the module docstring)."""
        fields = {
            "format": FORMAT,
            "image_sha256": self._image_sha256(Path(item.path)),
            "bucket": f"{bucket[0]}x{bucket[1]}",
            "resized": f"{resized[0]}x{resized[1]}",
            "flip": str(int(flip)),
            "vae": fingerprint,
        }
        text = "|".join(fields[name] for name in sorted(fields))
        fields["key"] = hashlib.sha256(text.encode()).hexdigest()
        return fields

    def path_of(self, fields: dict[str, str]) -> Path:
        """Where the latent with these key fields lives."""
        key = fields["key"]
        return self.folder / key[:2] / f"{key}.safetensors"

    def _encode(self, keyed: list, vae: Any) -> list:
        """``(mean + std * n) * scaling_factor`` for each entry, one VAE call."""
        import torch

        pixels = torch.stack([
            load_bucket_image(item.path, bucket, resized, flip=flip)
            for item, bucket, resized, flip, _ in keyed
        ])  # fmt: skip
        parameter = next(vae.parameters())
        with torch.no_grad():
            distribution = vae.encode(pixels.to(parameter.device, parameter.dtype)).latent_dist
        self.vae_calls += 1
        mean = distribution.mean.detach().float().cpu()
        std = distribution.std.detach().float().cpu()
        scale = float(vae.config.scaling_factor)
        latents = []
        for index, (*_, fields) in enumerate(keyed):
            generator = torch.Generator().manual_seed(int(fields["key"][:15], 16))
            noise = torch.randn(mean.shape[1:], generator=generator, dtype=torch.float32)
            latents.append(((mean[index] + std[index] * noise) * scale).contiguous())
        return latents

    def _read(self, fields: dict[str, str], vae: Any) -> Any:
        """The stored latent, or None when absent; a damaged file is warned and None."""
        from safetensors import SafetensorError, safe_open

        path = self.path_of(fields)
        if not path.is_file():
            return None
        shape = _latent_shape(fields, vae)
        limit = 4 * shape[0] * shape[1] * shape[2] + _HEADER_SLACK
        problem = None
        try:
            if path.stat().st_size > limit:
                problem = f"larger than {limit} bytes"
            else:
                with safe_open(path, framework="pt") as stored:
                    metadata = stored.metadata() or {}
                    latent = stored.get_tensor("latents")
                problem = _check_stored(metadata, fields, latent, shape)
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as error:
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem is None:
            return latent
        warnings.warn(f"latent cache file {str(path)!r}: {problem}; encoding it again",
                      SdstackWarning, stacklevel=4)  # fmt: skip
        return None

    def _write(self, fields: dict[str, str], latent: Any) -> None:
        """Store ``latent`` atomically (a reader never sees half a file)."""
        from safetensors.torch import save_file

        from sdstack.atomic_files import replace, temporary_file

        path = self.path_of(fields)
        try:
            with temporary_file(path.parent, suffix=".safetensors") as temporary:
                save_file({"latents": latent}, os.fspath(temporary), metadata=fields)
                replace(temporary, path)
        except OSError as error:
            raise LatentCacheError(
                f"latent cache folder {str(self.folder)!r}: cannot write "
                f"{path.name!r}: {error.strerror or error}"
            ) from error

    def _image_sha256(self, path: Path) -> str:
        """sha256 of the image file, remembered per (path, size, mtime)."""
        try:
            stat = path.stat()
        except OSError as error:
            raise LatentCacheError(f"training image {str(path)!r}: cannot be read: "
                                   f"{error.strerror or error}") from error  # fmt: skip
        memo = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
        if memo not in self._image_hashes:
            digest = hashlib.sha256()
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
            self._image_hashes[memo] = digest.hexdigest()
        return self._image_hashes[memo]

    def _fingerprint(self, vae: Any) -> str:
        """:func:`vae_fingerprint`, computed once per VAE object."""
        known = self._vae_fingerprints.get(id(vae))
        if known is None or known[0] is not vae:
            known = (vae, vae_fingerprint(vae))
            self._vae_fingerprints[id(vae)] = known
        return known[1]


def _latent_shape(fields: dict[str, str], vae: Any) -> tuple[int, int, int]:
    """``(latent_channels, bh / f, bw / f)`` with ``f = 2 ** (len(block_out) - 1)``."""
    width, height = (int(side) for side in fields["bucket"].split("x"))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (int(vae.config.latent_channels), height // factor, width // factor)


def _check_stored(
    metadata: dict[str, str], fields: dict[str, str], latent: Any, shape: tuple
) -> str | None:
    """Why a stored latent does not belong to this key, or None when it does."""
    import torch

    if metadata != fields:
        return "its key fields differ from the file name's"
    if latent.dtype != torch.float32 or tuple(latent.shape) != shape:
        return f"holds {latent.dtype} {tuple(latent.shape)}, expected float32 {shape}"
    if not bool(torch.isfinite(latent).all()):
        return "holds non-finite values"
    return None
