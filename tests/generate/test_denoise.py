"""The denoising loop: schedule lookup, AND + CFG combination, batching, cancellation."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from sdstack.generate.denoise import (
    GenerationCancelled,
    GuidedDenoiser,
    combine_guidance,
    is_cancelled,
    run_denoising,
    schedule_index,
)
from sdstack.text import Conditioning


def cond(value: float, chunks: int = 1, width: int = 4) -> Conditioning:
    tensor = torch.full((1, 77 * chunks, width), value)
    return Conditioning(tensor=tensor, pooled=torch.zeros(1, width))


class StubUNet:
    """Output = sample * (1 + mean of the context) + tokens/77: a different linear
    response per conditioning, so the combination can be computed by hand."""

    device = torch.device("cpu")
    dtype = torch.float32
    config = SimpleNamespace(in_channels=2)

    def __init__(self):
        self.contexts: list[torch.Tensor] = []

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.contexts.append(encoder_hidden_states.clone())
        scale = 1 + encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        shift = encoder_hidden_states.shape[1] / 77
        return SimpleNamespace(sample=sample * scale + shift)


def stub_output(sample: torch.Tensor, value: float, chunks: int) -> torch.Tensor:
    return sample * (1 + value) + chunks


def test_schedule_index_reference_rule():
    schedule = [(2, []), (5, []), (9, [])]
    assert [schedule_index(schedule, s) for s in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]


def test_combine_guidance_formula():
    u, c1, c2 = torch.randn(3, 2, 4, 8, 8).unbind(0)
    result = combine_guidance([c1, c2], [0.7, 0.3], u, 6.0)
    torch.testing.assert_close(result, u + 0.7 * 6.0 * (c1 - u) + 0.3 * 6.0 * (c2 - u))


def test_and_parts_and_negative_in_one_call():
    """u + cfg * sum_i w_i (c_i - u), all three conditionings in one UNet call."""
    unet = StubUNet()
    schedule = [(4, [(cond(0.1), 1.0), (cond(0.5), 0.6)])]
    negative = [(4, [(cond(-0.2), 1.0)])]
    denoiser = GuidedDenoiser(unet, schedule, negative, 7.5, cond(0.0))
    sample = torch.randn(2, 2, 8, 8)
    result = denoiser(sample, torch.tensor(999), 0)
    assert len(unet.contexts) == 1 and unet.contexts[0].shape == (6, 77, 4)
    u = stub_output(sample, -0.2, 1)
    c1, c2 = stub_output(sample, 0.1, 1), stub_output(sample, 0.5, 1)
    torch.testing.assert_close(result, u + 7.5 * (c1 - u) + 0.6 * 7.5 * (c2 - u))


def test_padding_to_the_longest_with_empty_chunks():
    unet = StubUNet()
    empty = cond(0.25)
    denoiser = GuidedDenoiser(
        unet, [(1, [(cond(1.0, chunks=2), 1.0)])], [(1, [(cond(-1.0), 1.0)])], 2.0, empty
    )
    denoiser(torch.ones(1, 2, 4, 4), torch.tensor(1), 0)
    context = unet.contexts[0]
    assert context.shape == (2, 154, 4)
    assert torch.all(context[1, :77] == -1.0) and torch.all(context[1, 77:] == 0.25)


def test_context_switches_per_call():
    unet = StubUNet()
    schedule = [(1, [(cond(1.0), 1.0)]), (3, [(cond(2.0), 1.0)])]
    negative = [(2, [(cond(-1.0), 1.0)]), (3, [(cond(-2.0), 1.0)])]
    denoiser = GuidedDenoiser(unet, schedule, negative, 1.0, cond(0.0))
    for step in range(4):
        denoiser(torch.ones(1, 2, 4, 4), torch.tensor(step), step)
    firsts = [(c[0, 0, 0].item(), c[1, 0, 0].item()) for c in unet.contexts]
    assert firsts == [(1.0, -1.0), (1.0, -1.0), (2.0, -1.0), (2.0, -2.0)]


class CountingScheduler:
    def scale_model_input(self, sample, timestep):
        return sample

    def step(self, output, timestep, sample, return_dict=False):
        return (sample - 0.1 * output,)


def test_cancel_event_stops_between_calls():
    event = threading.Event()
    seen = []

    def on_step(latents):
        seen.append(latents)
        if len(seen) == 2:
            event.set()

    with pytest.raises(GenerationCancelled, match="before denoiser call 2"):
        run_denoising(
            CountingScheduler(),
            range(5),
            torch.zeros(1, 1, 2, 2),
            lambda x, t, s: x + 1,
            generators=[],
            on_step=on_step,
            cancel=event,
        )
    assert len(seen) == 2


def test_is_cancelled_accepts_callables_and_events():
    assert is_cancelled(None) is False
    assert is_cancelled(lambda: True) is True
    event = threading.Event()
    assert is_cancelled(event) is False
    event.set()
    assert is_cancelled(event) is True
