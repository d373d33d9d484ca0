"""Training states: a resumed run equals the uninterrupted one bit for bit (CPU), across
an epoch boundary, with accumulation, flips, shuffled captions and a cosine warm-up;
damaged, foreign and mismatched state files are refused by name."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sdstack.train.loop import train_lora
from sdstack.train.settings import TrainSettings
from sdstack.train.state import (
    STATE_KEY,
    TrainState,
    TrainStateError,
    load_train_state,
    save_train_state,
)


@pytest.fixture(scope="module")
def components():
    from sdstack.models.tiny import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def data(shapes_dataset):
    from sdstack.train.dataset import scan_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan_dataset(shapes_dataset.folder)


def _settings(tmp_path, **changes) -> TrainSettings:
    # 44 images with repeats, batch 4 -> 11 batches, accumulation 2 -> 6 steps per epoch
    base = {
        "resolution": (64, 64), "batch_size": 4, "rank": 4, "alpha": 2.0, "steps": 8,
        "gradient_accumulation_steps": 2, "flip_aug": True, "shuffle_caption": True,
        "lr_scheduler": "cosine", "lr_warmup_steps": 2, "learning_rate": 1e-2,
        "min_snr_gamma": 5.0, "noise_offset": 0.05, "save_precision": "fp32",
        "output": tmp_path / "run" / "shapes.safetensors",
    }  # fmt: skip
    return TrainSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def uninterrupted(components, data, tmp_path_factory):
    return train_lora(components, data, _settings(tmp_path_factory.mktemp("whole")))


def test_resume_equals_uninterrupted(components, data, tmp_path, uninterrupted):
    reported = []

    def cancel() -> bool:
        return len(reported) >= 3

    first = train_lora(
        components, data, _settings(tmp_path), progress=lambda p: reported.append(p.step)
        if p.phase == "training" else None, cancel=cancel,
    )  # fmt: skip
    assert first.cancelled and first.steps == 3 and first.output is None
    (state_path,) = first.states
    assert state_path.name == "shapes-step00000003.trainstate"
    state = load_train_state(state_path)
    assert (state.step, state.epoch, state.batch) == (3, 0, 6)
    resumed = train_lora(components, data, _settings(tmp_path, resume=state_path))
    assert resumed.steps == 8 and not resumed.cancelled
    assert resumed.losses == uninterrupted.losses  # the first three come from the state
    assert resumed.tensors.keys() == uninterrupted.tensors.keys()
    for key, tensor in uninterrupted.tensors.items():
        assert torch.equal(resumed.tensors[key], tensor), key


def test_save_every_writes_resumable_points(components, data, tmp_path, uninterrupted):
    run = train_lora(components, data, _settings(tmp_path, save_every=6))
    names = sorted(p.name for p in run.saved + run.states)
    assert names == ["shapes-step00000006.safetensors", "shapes-step00000006.trainstate"]
    state = load_train_state(run.states[0])
    assert (state.step, state.epoch, state.batch) == (6, 1, 0)  # epoch 1 ended at step 6
    resumed = train_lora(components, data, _settings(tmp_path, resume=run.states[0]))
    for key, tensor in uninterrupted.tensors.items():
        assert torch.equal(resumed.tensors[key], tensor), key
    assert run.output.is_file() and run.loss_csv.is_file() and run.loss_plot.is_file()


def test_resume_with_other_settings_is_refused(components, data, tmp_path):
    run = train_lora(components, data, _settings(tmp_path, steps=2, save_every=2))
    with pytest.raises(TrainStateError, match=r"different run \(rank: saved 4, now 8"):
        train_lora(components, data, _settings(tmp_path, rank=8, resume=run.states[0]))


def _state(tmp_path) -> TrainState:
    lora = {"lora_unet_x.lora_down.weight": torch.ones(2, 3)}
    optimizer = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 3)}},
        "param_groups": [{"lr": 0.1, "betas": [0.9, 0.999], "params": [0]}],
    }
    return TrainState(step=0, epoch=1, batch=2, lora=lora, optimizer=optimizer)


def test_state_round_trip(tmp_path):
    path = save_train_state(tmp_path / "a.trainstate", _state(tmp_path))
    loaded = load_train_state(path)
    assert (loaded.step, loaded.epoch, loaded.batch) == (0, 1, 2)
    assert torch.equal(loaded.lora["lora_unet_x.lora_down.weight"], torch.ones(2, 3))
    assert torch.equal(loaded.optimizer["state"][0]["step"], torch.tensor(3.0))
    assert loaded.optimizer["param_groups"][0]["lr"] == 0.1
    assert not list(tmp_path.glob(".tmp-*"))  # atomic: no temporary left


def _rewrite_record(path, change):
    from safetensors.torch import load_file, save_file

    from sdstack.models.safetensors_header import safetensors_metadata

    record = json.loads(safetensors_metadata(path)[STATE_KEY])
    change(record)
    save_file(load_file(path), path, metadata={STATE_KEY: json.dumps(record)})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b""), "not a safetensors file"),
        (lambda p: p.write_bytes(b"\xff" * 64), "corrupt or truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:-5]), "truncated"),
        (lambda p: _rewrite_record(p, lambda r: r.update(version=99)), "version 99"),
        (lambda p: _rewrite_record(p, lambda r: r.update(step=-1)), "'step' is -1"),
        (lambda p: _rewrite_record(p, lambda r: r.update(losses={})), "'losses' is not"),
        (lambda p: _rewrite_record(p, lambda r: r.update(losses=[[1, "x"]])), "loss record"),
        (lambda p: _rewrite_record(p, lambda r: r.update(param_groups=[{}])), "param group"),
    ],
)
def test_damaged_states_are_refused(tmp_path, damage, message):
    path = save_train_state(tmp_path / "a.trainstate", _state(tmp_path))
    damage(path)
    with pytest.raises(TrainStateError, match=message):
        load_train_state(path)


def test_a_lora_file_is_not_a_state(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={"ss_network_dim": "4"})
    with pytest.raises(TrainStateError, match="no 'sdstack_train_state' metadata"):
        load_train_state(path)
    with pytest.raises(TrainStateError, match="no such file"):
        load_train_state(tmp_path / "missing.trainstate")


def test_metadata_json_bomb_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "deep.trainstate"
    save_file({"lora/x": torch.zeros(1)}, path, metadata={STATE_KEY: "[" * 100_000})
    with pytest.raises(TrainStateError, match="not JSON"):
        load_train_state(path)
