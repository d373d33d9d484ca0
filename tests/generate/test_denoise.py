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
    pad_with_empty,
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


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def guidance_atol(outputs: list[torch.Tensor], weights: list[float], cfg: float) -> float:
    """Bound on ``|ours - formula|`` for ``u + cfg * sum_i w_i (c_i - u)`` on stub outputs.

    Each stub output and its hand-computed twin differ by at most ~20 float32 roundings
    relative to ``max|output|`` (the stub's float32 mean of the context, ``1 + mean``, the
    multiply and the add; the twin uses the exact value or another reduction shape); the
    combination's coefficients total at most ``1 + 2 * cfg * sum|w_i|`` in magnitude and
    add 2 roundings a term. 32 roundings a coefficient cover both.
    """
    scale = max(float(output.abs().max()) for output in outputs)
    return 32 * 2.0**-24 * (1 + 2 * cfg * sum(abs(w) for w in weights)) * scale


def test_schedule_index_reference_rule():
    schedule = [(2, []), (5, []), (9, [])]
    assert [schedule_index(schedule, s) for s in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]


def test_combine_guidance_formula():
    u, c1, c2 = seeded(3, 2, 4, 8, 8, seed=0).unbind(0)
    result = combine_guidance([c1, c2], [0.7, 0.3], u, 6.0)
    # The same float32 operations in the same order: identical (default tolerance unused).
    torch.testing.assert_close(result, u + 0.7 * 6.0 * (c1 - u) + 0.3 * 6.0 * (c2 - u))


def random_cond(chunks: int, seed: int, width: int = 4) -> Conditioning:
    tensor = torch.randn(1, 77 * chunks, width, generator=torch.Generator().manual_seed(seed))
    return Conditioning(tensor=tensor, pooled=torch.zeros(1, width))


def direct_output(sample: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """StubUNet's response to one (tokens, width) context, computed directly."""
    return sample * (1 + hidden.mean()) + hidden.shape[0] / 77


@pytest.mark.parametrize("pad_conds", [False, True])
def test_and_parts_and_negative_in_one_call(pad_conds):
    """(d) Equal lengths: u + cfg * sum_i w_i (c_i - u), all in one UNet call, no padding."""
    unet = StubUNet()
    schedule = [(4, [(cond(0.1), 1.0), (cond(0.5), 0.6)])]
    negative = [(4, [(cond(-0.2), 1.0)])]
    denoiser = GuidedDenoiser(unet, schedule, negative, 7.5, cond(0.0), pad_conds=pad_conds)
    sample = seeded(2, 2, 8, 8, seed=1)
    result = denoiser(sample, torch.tensor(999), 0)
    assert len(unet.contexts) == 1 and unet.contexts[0].shape == (6, 77, 4)
    assert denoiser.padded is False
    u = stub_output(sample, -0.2, 1)
    c1, c2 = stub_output(sample, 0.1, 1), stub_output(sample, 0.5, 1)
    want = u + 7.5 * (c1 - u) + 0.6 * 7.5 * (c2 - u)
    atol = guidance_atol([u, c1, c2], [1.0, 0.6], 7.5)
    torch.testing.assert_close(result, want, rtol=0, atol=atol)


def test_shorter_and_part_repeats_its_last_token_vector():
    """(a) Reference reconstruct_multicond_batch: not empty chunks, the last row repeated."""
    unet = StubUNet()
    long, short, neg = random_cond(2, 1), random_cond(1, 2), random_cond(2, 3)
    denoiser = GuidedDenoiser(
        unet, [(9, [(long, 1.0), (short, 0.5)])], [(9, [(neg, 1.0)])], 3.0, cond(0.25)
    )
    sample = seeded(1, 2, 4, 4, seed=2)
    result = denoiser(sample, torch.tensor(500), 0)
    assert len(unet.contexts) == 1 and unet.contexts[0].shape == (3, 154, 4)
    extended = torch.cat([short.tensor[0], short.tensor[0, -1:].expand(77, -1)])
    # Contexts are copies and concatenations of the conditionings: exact (here and below).
    assert torch.equal(unet.contexts[0][0], long.tensor[0])
    assert torch.equal(unet.contexts[0][1], extended)
    assert torch.equal(unet.contexts[0][2], neg.tensor[0])
    u = direct_output(sample, neg.tensor[0])
    c1, c2 = direct_output(sample, long.tensor[0]), direct_output(sample, extended)
    atol = guidance_atol([u, c1, c2], [1.0, 0.5], 3.0)
    torch.testing.assert_close(
        result, combine_guidance([c1, c2], [1.0, 0.5], u, 3.0), rtol=0, atol=atol
    )


def test_unequal_lengths_run_positive_and_negative_in_separate_calls():
    """(b) Default (reference "Pad prompt/negative prompt" off): two calls, no padding."""
    unet = StubUNet()
    part1, part2, neg = random_cond(2, 4), random_cond(1, 5), random_cond(1, 6)
    denoiser = GuidedDenoiser(
        unet, [(9, [(part1, 0.7), (part2, 0.3)])], [(9, [(neg, 1.0)])], 6.0, cond(0.25)
    )
    sample = seeded(2, 2, 4, 4, seed=3)
    result = denoiser(sample, torch.tensor(500), 0)
    assert [tuple(c.shape) for c in unet.contexts] == [(4, 154, 4), (2, 77, 4)]
    extended = torch.cat([part2.tensor[0], part2.tensor[0, -1:].expand(77, -1)])
    positive, negative = unet.contexts
    for row, expected in enumerate([part1.tensor[0], part1.tensor[0], extended, extended]):
        assert torch.equal(positive[row], expected)
    assert torch.equal(negative, neg.tensor.expand(2, -1, -1))
    assert denoiser.padded is False
    u = direct_output(sample, neg.tensor[0])
    c1, c2 = direct_output(sample, part1.tensor[0]), direct_output(sample, extended)
    atol = guidance_atol([u, c1, c2], [0.7, 0.3], 6.0)
    torch.testing.assert_close(
        result, combine_guidance([c1, c2], [0.7, 0.3], u, 6.0), rtol=0, atol=atol
    )


@pytest.mark.parametrize(("pos_chunks", "neg_chunks"), [(2, 1), (1, 3)])
def test_pad_conds_pads_the_shorter_side_with_empty_chunks(pos_chunks, neg_chunks):
    """(c) Reference pad_cond_uncond: empty-prompt encodings appended, one call."""
    unet = StubUNet()
    pos, neg, empty = random_cond(pos_chunks, 7), random_cond(neg_chunks, 8), random_cond(1, 9)
    denoiser = GuidedDenoiser(
        unet, [(9, [(pos, 1.0)])], [(9, [(neg, 1.0)])], 2.0, empty, pad_conds=True
    )
    sample = seeded(1, 2, 4, 4, seed=4)
    result = denoiser(sample, torch.tensor(1), 0)
    longest = max(pos_chunks, neg_chunks)
    assert len(unet.contexts) == 1 and unet.contexts[0].shape == (2, 77 * longest, 4)
    padded_pos = torch.cat([pos.tensor[0], *[empty.tensor[0]] * (longest - pos_chunks)])
    padded_neg = torch.cat([neg.tensor[0], *[empty.tensor[0]] * (longest - neg_chunks)])
    assert torch.equal(unet.contexts[0][0], padded_pos)
    assert torch.equal(unet.contexts[0][1], padded_neg)
    assert denoiser.padded is True
    u, c = direct_output(sample, padded_neg), direct_output(sample, padded_pos)
    atol = guidance_atol([u, c], [1.0], 2.0)
    torch.testing.assert_close(result, u + 2.0 * (c - u), rtol=0, atol=atol)


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

    def on_step(_timestep, _sigma, latents, _denoised):
        seen.append(latents)
        if len(seen) == 2:
            event.set()

    with pytest.raises(GenerationCancelled, match="before denoiser call 2"):
        run_denoising(
            CountingScheduler(),
            range(5),
            torch.zeros(1, 1, 2, 2),
            lambda x, t, s, sigma: x + 1,
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


def test_pad_with_empty_needs_whole_chunks():
    with pytest.raises(ValueError, match=r"cannot pad 100 tokens to 154 with 77-token empty"):
        pad_with_empty(torch.zeros(1, 100, 4), 154, torch.zeros(1, 77, 4))


def test_pad_conds_needs_the_empty_conditioning():
    with pytest.raises(ValueError, match="pad_conds needs empty, the empty prompt's conditioning"):
        GuidedDenoiser(torch.nn.Identity(), [], [], 7.0, None, pad_conds=True)
