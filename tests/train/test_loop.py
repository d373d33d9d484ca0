"""The training loop on the tiny model and the drawn shapes: the loss falls, clip skip 2
leaves the last CLIP layer's LoRA at zero, runs are reproducible, the model is left as it
was; the text conditioning equals generation's; min-SNR and the schedules by formula."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sdstack.train.loop import encode_captions, min_snr_weight, train_lora
from sdstack.train.settings import TrainSettings, learning_rate_factor


@pytest.fixture(scope="module")
def components():
    """A private tiny model (training hooks it; the session fixture must stay untouched)."""
    from sdstack.models.tiny import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def data(shapes_dataset):
    from sdstack.train.dataset import scan_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan_dataset(shapes_dataset.folder)


def _settings(**changes) -> TrainSettings:
    base = {"resolution": (64, 64), "batch_size": 4, "rank": 4, "alpha": 4.0, "steps": 2}
    return TrainSettings(**{**base, **changes})


def _last_layer_up(tensors, layer: int) -> list[torch.Tensor]:
    marker = f"lora_te_text_model_encoder_layers_{layer}_"
    found = [v for k, v in tensors.items() if k.startswith(marker) and "lora_up" in k]
    assert found, marker
    return found


def test_loss_falls_well_below_its_start(components, data):
    settings = _settings(
        network="locon", steps=25, batch_size=2, learning_rate=2e-2, rank=8, alpha=8.0
    )
    result = train_lora(components, data, settings)
    losses = [record.loss for record in result.losses]
    assert [r.step for r in result.losses] == list(range(1, 26))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_2_gives_the_last_clip_layer_no_gradient(components, data, clip_skip):
    settings = _settings(clip_skip=clip_skip, learning_rate=1e-2, train_unet=False)
    tensors = train_lora(components, data, settings).tensors
    last = components.text_encoder.config.num_hidden_layers - 1
    last_max = max(float(t.abs().max()) for t in _last_layer_up(tensors, last))
    below_max = max(float(t.abs().max()) for t in _last_layer_up(tensors, last - 1))
    assert below_max > 0  # the layers the conditioning comes from learn
    if clip_skip == 2:
        assert last_max == 0.0  # hidden_states[-2] is the input of the last layer
    else:
        assert last_max > 0


def test_runs_are_reproducible_and_leave_the_model_as_it_was(components, data):
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    flags = [p.requires_grad for p in components.unet.parameters()]
    settings = _settings(steps=3, flip_aug=True, shuffle_caption=True, noise_offset=0.1,
                         min_snr_gamma=5.0, gradient_checkpointing=True)  # fmt: skip
    first = train_lora(components, data, settings)
    second = train_lora(components, data, settings)
    assert [r.loss for r in first.losses] == [r.loss for r in second.losses]
    for key, tensor in first.tensors.items():
        assert torch.equal(tensor, second.tensors[key]), key
    after = components.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in components.unet.parameters()] == flags
    assert not components.unet.training and not components.unet.is_gradient_checkpointing
    other = train_lora(components, data, _settings(steps=3, seed=1, flip_aug=True))
    assert [r.loss for r in other.losses] != [r.loss for r in first.losses]


def test_gradient_checkpointing_gives_the_same_gradients(components, data):
    plain = train_lora(components, data, _settings(steps=2, learning_rate=1e-2))
    checkpointed = train_lora(
        components, data, _settings(steps=2, learning_rate=1e-2, gradient_checkpointing=True)
    )
    for key, tensor in plain.tensors.items():
        torch.testing.assert_close(checkpointed.tensors[key].float(), tensor.float(),
                                   rtol=1e-3, atol=1e-5)  # fmt: skip


def test_encoded_captions_equal_generation_conditioning(components):
    """The training conditioning is the generation conditioning (PromptEncoder, the
    reference path) for a plain caption, at clip skip 1, 2 and the deepest."""
    from sdstack.text.encoder import PromptEncoder

    encoder = PromptEncoder(components.text_encoder, components.tokenizer)
    caption = "red circle, shape, white background"
    for clip_skip in (1, 2, components.text_encoder.config.num_hidden_layers):
        with torch.no_grad():
            ours = encode_captions(
                components.text_encoder, components.tokenizer, [caption, ""], clip_skip
            )
        reference = encoder.encode(caption, clip_skip=clip_skip).tensor[0]
        empty = encoder.encode("", clip_skip=clip_skip).tensor[0]
        torch.testing.assert_close(ours[0], reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1], empty, rtol=1e-5, atol=1e-5)


def test_min_snr_weight_by_formula():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = abar[t] / (1 - abar[t])
    # abar in float32 (as diffusers holds it): 1 - abar loses up to 2^-24 / (1 - abar)
    rtol = 4 * 2**-24 / float(1 - abar[0])
    for gamma in (1.0, 5.0):
        expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr
        got = min_snr_weight(abar.float(), t, gamma, v_prediction=False)
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=0)
        expected_v = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (snr + 1)
        got_v = min_snr_weight(abar.float(), t, gamma, v_prediction=True)
        torch.testing.assert_close(got_v.double(), expected_v, rtol=rtol, atol=0)
    assert float(min_snr_weight(abar.float(), t[:1], 5.0, False)) < 0.01  # snr(0) ~ 1000


@pytest.mark.parametrize(
    ("scheduler", "warmup", "step", "factor"),
    [
        ("constant", 0, 0, 1.0),
        ("constant", 0, 99, 1.0),
        ("constant_with_warmup", 10, 0, 0.0),
        ("constant_with_warmup", 10, 5, 0.5),
        ("constant_with_warmup", 10, 10, 1.0),
        ("cosine", 0, 0, 1.0),
        ("cosine", 0, 50, 0.5),
        ("cosine", 20, 10, 0.5),
        ("cosine", 20, 60, 0.5),  # half way through the 80 steps after warm-up
        ("cosine", 20, 100, 0.0),
    ],
)
def test_learning_rate_schedules(scheduler, warmup, step, factor):
    settings = TrainSettings(lr_scheduler=scheduler, lr_warmup_steps=warmup, steps=100)
    assert math.isclose(learning_rate_factor(settings, step, 100), factor, abs_tol=1e-12)


def test_cosine_schedule_matches_diffusers():
    from diffusers.optimization import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 7, 50)
    settings = TrainSettings(lr_scheduler="cosine", lr_warmup_steps=7, steps=50)
    for step in range(50):
        assert math.isclose(optimizer.param_groups[0]["lr"],
                            learning_rate_factor(settings, step, 50), abs_tol=1e-12)  # fmt: skip
        optimizer.step()
        schedule.step()


def test_separate_learning_rates_and_groups(components, data):
    settings = _settings(steps=1, unet_lr=1e-3, text_encoder_lr=0.0, learning_rate=5.0)
    result = train_lora(components, data, settings)
    assert (result.losses[0].lr_unet, result.losses[0].lr_text_encoder) == (1e-3, 0.0)
    te_up = [v for k, v in result.tensors.items() if k.startswith("lora_te") and "up" in k]
    unet_up = [v for k, v in result.tensors.items() if k.startswith("lora_unet") and "up" in k]
    assert all(float(v.abs().max()) == 0 for v in te_up)  # lr 0: AdamW moved nothing
    assert any(float(v.abs().max()) > 0 for v in unet_up)


def test_no_images_is_an_error(components, tmp_path):
    from sdstack.train.dataset import scan_dataset
    from sdstack.train.loop import TrainingError

    (tmp_path / "1_empty").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            empty = scan_dataset(tmp_path)
        except Exception as error:  # the scanner may refuse an empty folder itself
            assert "image" in str(error)
            return
    with pytest.raises(TrainingError, match="no readable images"):
        train_lora(components, empty, _settings())


def test_cancel_stops_before_the_next_step(components, data):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    result = train_lora(components, data, _settings(steps=10), cancel=cancel)
    assert result.cancelled and result.steps == 2 and len(result.losses) == 2


def test_mixed_precision_on_cpu_warns_and_trains_in_fp32(components, data):
    from sdstack.errors import SdstackWarning

    with pytest.warns(SdstackWarning, match="mixed precision bf16 is for CUDA; training on cpu"):
        result = train_lora(components, data, _settings(steps=1, mixed_precision="bf16"))
    assert result.steps == 1 and math.isfinite(result.losses[0].loss)
