"""LoRA training for SD 1.x in the kohya sd-scripts layout: data, buckets, batches, caching.

A training folder holds images with same-stem ``.txt``/``.caption`` files, in subfolders
named ``N_concept`` (N repeats per epoch). :func:`scan_dataset` reads it,
:class:`BucketManager` and :func:`assign_buckets` put each image into an aspect-ratio
bucket, :func:`epoch_batches` draws one epoch's batches, :class:`LatentCache` keeps the
VAE latents on disk, :func:`process_caption` shuffles and drops tags.

Names are imported on first use, so ``import sdstack.train`` costs nothing (``--help``
and ``--dry-run`` parsing never pay for torch).
"""

from __future__ import annotations

from sdstack.lazy import lazy_exports

_EXPORTS = {
    # dataset.py
    "scan_dataset": "dataset",
    "TrainingData": "dataset",
    "Subset": "dataset",
    "ImageItem": "dataset",
    "DatasetError": "dataset",
    "IMAGE_EXTENSIONS": "dataset",
    "parse_subset_name": "dataset",
    # captions.py
    "process_caption": "captions",
    "CaptionOptions": "captions",
    "CaptionError": "captions",
    # buckets.py
    "make_bucket_resolutions": "buckets",
    "BucketManager": "buckets",
    "BucketError": "buckets",
    "BucketedImage": "buckets",
    "Buckets": "buckets",
    "assign_buckets": "buckets",
    "bucket_info": "buckets",
    "mean_img_ar_error": "buckets",
    "load_bucket_image": "buckets",
    "cover_size": "buckets",
    # latent_cache.py
    "LatentCache": "latent_cache",
    "LatentCacheError": "latent_cache",
    "vae_fingerprint": "latent_cache",
    # batches.py
    "Batch": "batches",
    "BatchError": "batches",
    "epoch_batches": "batches",
    "steps_per_epoch": "batches",
    "batches_per_epoch": "batches",
    "plan_steps": "batches",
    "dry_run_report": "batches",
    # network.py, metadata.py, save.py (train-network); settings.py, loop.py (train-loop)
    "TrainableLora": "network",
    "training_metadata": "metadata",
    "save_lora": "save",
    "TrainSettings": "settings",
    "train_lora": "loop",
    "TrainResult": "loop",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("sdstack.train", _EXPORTS, globals())
