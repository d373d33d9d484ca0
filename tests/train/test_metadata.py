"""training_metadata / save_metadata: kohya's ss_* keys on a worked example, and the round trip.

The worked example: ``10_shapes`` (2 images) and ``2_extra`` (1 image) -> 22 training
images; tags counted once per image, stripped and lower-cased, empty tags skipped. Model
hashes against hashlib run on the checkpoint's bytes directly. The saved file's metadata
is read back by ``sdstack lora inspect --json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdstack.cli import main
from sdstack.train.dataset import ImageItem, Subset, TrainingData
from sdstack.train.metadata import (
    MINIMUM_KEYS,
    TrainMetadataError,
    model_spec,
    optimizer_name,
    save_metadata,
    training_metadata,
)
from sdstack.train.settings import TrainSettings

ISSUE_KEYS = (
    "ss_clip_skip",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_module",
    "ss_output_name",
    "ss_base_model_version",
    "ss_resolution",
    "ss_num_train_images",
    "ss_tag_frequency",
    "ss_sd_model_hash",
)
BUCKETS = {"buckets": {0: {"resolution": (512, 512), "count": 22}}, "mean_img_ar_error": 0.0}


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    from sdstack.models import hash_cache

    monkeypatch.setenv("SDSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SDSTACK_ROOT", raising=False)
    monkeypatch.setattr(hash_cache, "_default_cache", hash_cache.HashCache())


@pytest.fixture
def data(tmp_path) -> TrainingData:
    shapes, extra = tmp_path / "data" / "10_shapes", tmp_path / "data" / "2_extra"
    return TrainingData(
        tmp_path / "data",
        [
            Subset(
                shapes,
                "10_shapes",
                10,
                "shapes",
                [
                    ImageItem(shapes / "a.png", "blue square, shape", 64, 64),
                    ImageItem(shapes / "b.png", " Red Circle ,shape, ,", 96, 64),
                ],
            ),
            Subset(extra, "2_extra", 2, "extra", [ImageItem(extra / "c.png", "extra", 64, 64)]),
        ],
    )


def settings(tmp_path: Path, **changes) -> TrainSettings:
    values = {
        "clip_skip": 2,
        "rank": 4,
        "alpha": 2.0,
        "output": tmp_path / "shapes.safetensors",
        "batch_size": 2,
        "gradient_accumulation_steps": 3,
        "seed": 7,
        "min_snr_gamma": 5.0,
    }
    return TrainSettings(**{**values, **changes})


def metadata_of(tmp_path, data, model=None, **changes) -> dict[str, str]:
    return training_metadata(
        settings(tmp_path, **changes),
        data,
        num_batches_per_epoch=11,
        max_train_steps=20,
        num_epochs=2,
        bucket_info=BUCKETS,
        model=model,
        session_id=123,
        training_started_at=1700000000.5,
    )


def test_worked_example(tmp_path, data, tiny_checkpoint):
    checkpoint, _ = tiny_checkpoint
    metadata = metadata_of(tmp_path, data, model=checkpoint)
    assert all(isinstance(v, str) for v in metadata.values())
    assert set(ISSUE_KEYS) | set(MINIMUM_KEYS[:-1]) <= set(metadata)
    expected = {
        "ss_clip_skip": "2",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_network_module": "networks.lora",
        "ss_output_name": "shapes",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_resolution": "(512, 512)",
        "ss_num_train_images": "22",
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": "11",
        "ss_max_train_steps": "20",
        "ss_num_epochs": "2",
        "ss_batch_size_per_device": "2",
        "ss_total_batch_size": "6",
        "ss_gradient_accumulation_steps": "3",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "None",
        "ss_text_encoder_lr": "None",
        "ss_lr_scheduler": "constant",
        "ss_mixed_precision": "no",
        "ss_seed": "7",
        "ss_min_snr_gamma": "5.0",
        "ss_noise_offset": "None",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_session_id": "123",
        "ss_training_started_at": "1700000000.5",
        "ss_sd_model_name": "tiny-model.safetensors",
        "ss_enable_bucket": "True",
        "ss_min_bucket_reso": "256",
        "ss_max_bucket_reso": "1024",
    }
    assert {k: metadata[k] for k in expected} == expected
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "10_shapes": {"blue square": 1, "shape": 2, "red circle": 1},
        "2_extra": {"extra": 1},
    }
    assert json.loads(metadata["ss_dataset_dirs"]) == {
        "10_shapes": {"n_repeats": 10, "img_count": 2},
        "2_extra": {"n_repeats": 2, "img_count": 1},
    }
    assert json.loads(metadata["ss_bucket_info"]) == {
        "buckets": {"0": {"resolution": [512, 512], "count": 22}},
        "mean_img_ar_error": 0.0,
    }
    raw = checkpoint.read_bytes()
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(raw).hexdigest()
    assert "ss_network_args" not in metadata and "ss_vae_name" not in metadata


def test_unset_clip_skip_locon_and_model_names(tmp_path, data):
    metadata = metadata_of(
        tmp_path, data, model="my-model", clip_skip=None, network="locon", conv_rank=2
    )
    assert metadata["ss_clip_skip"] == "None"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert metadata["ss_sd_model_name"] == "my-model"
    assert "ss_sd_model_hash" not in metadata and "ss_new_sd_model_hash" not in metadata
    folder = tmp_path / "diffusers-model"
    folder.mkdir()
    metadata = metadata_of(tmp_path, data, model=folder, weight_decay=0.1)
    assert metadata["ss_sd_model_name"] == "diffusers-model"
    assert "ss_sd_model_hash" not in metadata
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    assert optimizer_name() == "torch.optim.adamw.AdamW"
    assert "ss_model_hash" not in metadata_of(tmp_path, data)


def test_save_metadata_adds_steps_and_model_spec(tmp_path, data):
    metadata = metadata_of(tmp_path, data)
    saved = save_metadata(metadata, steps=20, epoch=2, finished_at=1700000100.0)
    assert saved["ss_steps"] == "20" and saved["ss_epoch"] == "2"
    assert saved["ss_training_finished_at"] == "1700000100.0"
    assert saved["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert saved["modelspec.encoder_layer"] == "2"
    assert saved["modelspec.resolution"] == "512x512"
    assert saved["modelspec.title"] == "shapes"
    assert saved["modelspec.date"] == "2023-11-14T22:15:00+00:00"
    assert "ss_steps" not in metadata  # a new dict
    unset = save_metadata(metadata_of(tmp_path, data, clip_skip=None), steps=1, epoch=0)
    assert "modelspec.encoder_layer" not in unset


@given(resolution=st.text(max_size=30), clip_skip=st.text(max_size=5), title=st.text(max_size=9))
def test_model_spec_of_any_ss_values_is_strings(resolution, clip_skip, title):
    metadata = {"ss_resolution": resolution, "ss_clip_skip": clip_skip, "ss_output_name": title}
    spec = model_spec(metadata, 0.0)
    assert all(isinstance(v, str) for v in spec.values())
    assert spec["modelspec.title"] == title
    assert ("modelspec.encoder_layer" in spec) == (clip_skip != "None")


@pytest.mark.parametrize(("name", "value"), [("num_epochs", -1), ("max_train_steps", 2.5)])
def test_bad_counts(tmp_path, data, name, value):
    counts = {"num_batches_per_epoch": 1, "max_train_steps": 1, "num_epochs": 1, name: value}
    with pytest.raises(TrainMetadataError, match=f"{name} is {value!r}; expected an int >= 0"):
        training_metadata(settings(tmp_path), data, **counts)


def test_round_trip_through_lora_inspect(tmp_path, data, tiny_checkpoint, capsys):
    from sdstack.models.tiny import tiny_components
    from sdstack.train.network import TrainableLora
    from sdstack.train.save import save_lora

    checkpoint, config = tiny_checkpoint
    network = TrainableLora(tiny_components(seed=0), rank=4, alpha=2, seed=0)
    metadata = save_metadata(metadata_of(tmp_path, data, model=checkpoint), steps=20, epoch=2)
    path = tmp_path / "shapes.safetensors"
    save_lora(path, network.state_dict_kohya(), metadata)
    network.remove()
    assert main(["lora", "inspect", str(path), "--config-dir", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    training = report["training"]
    assert training["clip_skip"] == 2
    assert (training["network_dim"], training["network_alpha"]) == (4, 2)
    assert training["resolution"] == [512, 512]
    assert training["output_name"] == "shapes"
    assert training["network_module"] == "networks.lora"
    assert training["train_images"] == "22" and training["steps"] == "20"
    assert training["sd_model_hash"] == metadata["ss_new_sd_model_hash"]
    assert report["tags"]["top"][0] == ["shape", 2]
    assert report["hashes"]["sshs_matches"] is True
    assert report["base_model"]["guess"] == "SD1"
    assert report["modules"] == 102 and not report["notes"]
