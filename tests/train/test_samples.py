"""Sample images with the in-training LoRA: the same picture as generating with the saved
LoRA file through sdstack.lora (the patcher: merged weights, an independent path), at the
training clip skip, with the infotext; and the loss log / plot files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from sdstack.train.losslog import (
    LossRecord,
    moving_average,
    read_loss_csv,
    write_loss_csv,
    write_loss_plot,
)
from sdstack.train.samples import sample_images, sample_params
from sdstack.train.settings import TrainSettings


@pytest.fixture
def components():
    from sdstack.models.tiny import tiny_components

    return tiny_components(seed=0)


def _network(components):
    from sdstack.train.network import TrainableLora

    network = TrainableLora(components, rank=4, alpha=4.0, seed=3)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in network.loras.values():
            weight = module.lora_up.weight
            weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
    return network


SETTINGS = TrainSettings(
    resolution=(64, 64), clip_skip=2, seed=7, sample_prompts=("red circle, shape",),
    sample_steps=4, sample_sampler="Euler a", sample_cfg=5.0,
)  # fmt: skip


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_samples_equal_generation_with_the_saved_lora(components, tmp_path):
    from PIL import Image

    from sdstack.generate import generate, read_infotext
    from sdstack.lora.library import LoraLibrary
    from sdstack.train.save import save_lora

    network = _network(components)
    (path,) = sample_images(components, SETTINGS, step=5, folder=tmp_path / "s", name="shapes")
    assert path.name == "shapes-step00000005-00000-7.png"
    info = read_infotext(path)
    assert "Clip skip: 2" in info and "Seed: 7" in info and "Steps: 4" in info
    assert info.endswith("Training LoRA: shapes, Training step: 5")
    sample = _pixels(Image.open(path))
    save_lora(tmp_path / "lora" / "shapes.safetensors", network.state_dict_kohya(), {})
    network.remove()
    plain = _pixels(generate(components, sample_params(SETTINGS, "red circle, shape"))[0].image)
    assert np.abs(plain - sample).max() > 10  # the LoRA changes the picture
    params = sample_params(SETTINGS, "<lora:shapes:1> red circle, shape")
    library = LoraLibrary(None, [tmp_path / "lora"])
    patched = _pixels(generate(components, params, loras=library)[0].image)
    # hook (W x + up(down(x))) vs merged weights ((W + up down) x): float32 rounding only
    assert np.abs(patched - sample).max() <= 2


def test_sampling_restores_train_modes(components, tmp_path):
    network = _network(components)
    components.unet.train()
    sample_images(components, SETTINGS, step=1, folder=tmp_path, name="x")
    assert components.unet.training and not components.vae.training
    network.remove()


def test_moving_average_by_formula():
    values = [4.0, 2.0, 6.0, 0.0, 8.0]
    assert moving_average(values, 2) == [4.0, 3.0, 4.0, 3.0, 4.0]
    assert moving_average(values, 10) == [4.0, 3.0, 4.0, 3.0, 4.0]
    assert moving_average(values, 1) == values


def test_loss_csv_round_trip_and_plot(tmp_path):
    from PIL import Image

    records = [LossRecord(i, 1 + i // 3, 1.0 / i, 1e-4 * i, 5e-5) for i in range(1, 8)]
    path = write_loss_csv(tmp_path / "loss.csv", records)
    assert read_loss_csv(path) == records
    with path.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [float(r["loss"]) for r in rows] == [r.loss for r in records]
    assert float(rows[2]["loss_average"]) == records[2].loss  # window: a twentieth, >= 1
    longer = [LossRecord(i, 1, float(i), 0.0, 0.0) for i in range(1, 41)]
    write_loss_csv(path, longer)
    with path.open() as stream:
        rows = list(csv.DictReader(stream))
    assert float(rows[9]["loss_average"]) == (9 + 10) / 2  # 40 steps: window 2
    plot = write_loss_plot(tmp_path / "loss.png", records)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (800, 450)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected the header"),
        ("a,b\n", "expected the header"),
        ("step,epoch,loss,loss_average,lr_unet,lr_text_encoder\n1,1,x,1,1,1\n", "line 2"),
        ("step,epoch,loss,loss_average,lr_unet,lr_text_encoder\n1,1\n", "line 2"),
    ],
)
def test_bad_loss_logs_are_refused(tmp_path, text, message):
    from sdstack.train.losslog import LossLogError

    path = tmp_path / "loss.csv"
    path.write_text(text)
    with pytest.raises(LossLogError, match=message):
        read_loss_csv(path)
