"""A batch image against the single run with its seed: the same noise, float32-close results.

Image ``i`` of a batch draws its initial and ancestral noise from the CPU generator of
``seed + i``, exactly as the single run does, so the two differ only where float32 kernels
round differently for another batch size. On CPU they do from the first UNet op on: the
timestep-embedding ``Linear`` runs a (2, 32) and a (2 * batch, 32) matrix product through
different GEMM kernels, and the VAE's convolutions do the same. Measured on the tiny model
(64x64, 3 steps, batch sizes 2 to 4, 10 samplers): latents within 1e-6 to 3.2e-6 of
max|latent|, decoded values within 7e-6, and 0 to 3 of the 12,288 pixel values one level
apart (a value flips only when it lies that close to a level boundary); 20 steps: at most
1 value. Pixel-identical batches would need one UNet call and one VAE decode per image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstack.generate import GenerationParams
from sdstack.generate.pipeline import decode, prepare, sample
from tests.generate import latent_atol

# diffusers' schedulers trip numpy 2 deprecation warnings on every step
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT, WEIGHTS, CFG = "a (red:1.2) cat AND sky :0.5", (1.0, 0.5), 5.0
SEED = 40


def decoded(components, latents: torch.Tensor) -> torch.Tensor:
    """The VAE output in [-1, 1] before the pixel conversion (batch as given)."""
    vae = components.vae
    with torch.inference_mode():
        return vae.decode(latents / vae.config.scaling_factor).sample.float()


SAMPLERS = [
    ("Euler a", 2),  # ancestral noise from each image's generator
    ("DPM++ 2M", 3),  # the default, multistep
    ("DPM++ 2M SDE", 2),  # SDE noise from each image's generator
    ("Heun", 3),  # second order: 2 * steps - 1 calls
    ("DPM++ SDE", 2),  # Brownian-tree noise: one tree per image, from its seed
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("sampler", "batch_size"), SAMPLERS)
def test_batch_image_is_the_single_run_up_to_float32_rounding(tiny_components, sampler, batch_size):
    params = GenerationParams(
        PROMPT,
        negative="blurry",
        width=64,
        height=64,
        steps=3,
        sampler=sampler,
        cfg_scale=CFG,
        seed=SEED,
    )
    prepared = prepare(tiny_components, params)
    seeds = [SEED + i for i in range(batch_size)]
    batch = sample(prepared, seeds)
    images = [np.asarray(image).astype(int) for image in decode(tiny_components, batch)]
    values = decoded(tiny_components, batch)
    for index, seed in enumerate(seeds):
        single = sample(prepared, [seed])
        # 1. Latents: float32 rounding of each denoiser call, accumulated (latent_atol).
        atol = latent_atol(prepared.calls_per_batch, single, CFG, WEIGHTS)
        torch.testing.assert_close(batch[index : index + 1], single, rtol=0, atol=atol)
        # 2. Pixels: 255 * (x + 1) / 2 truncated moves by at most one level when x moves
        # by less than 2 / 255; the decoded values are far closer than that.
        assert float((values[index] - decoded(tiny_components, single)[0]).abs().max()) < 2 / 255
        pixels = np.asarray(decode(tiny_components, single)[0]).astype(int)
        assert np.abs(images[index] - pixels).max() <= 1


class FirstInputs:
    """A UNet stand-in that records the sample rows of each call, then forwards them."""

    def __init__(self, inner):
        self.inner, self.samples = inner, []
        self.device, self.dtype, self.config = inner.device, inner.dtype, inner.config

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        self.samples.append(sample.clone())
        return self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)


def test_batch_image_starts_from_the_single_runs_noise(tiny_components):
    """Exact, not close: the first UNet input of image i is the same elementwise scaling of
    the same generator's numbers, whatever the batch."""
    import dataclasses

    params = GenerationParams("a cat", width=64, height=64, steps=1, sampler="Euler a", seed=SEED)
    firsts = []
    for seeds in ([SEED, SEED + 1, SEED + 2], [SEED + 1]):
        spy = FirstInputs(tiny_components.unet)
        components = dataclasses.replace(tiny_components, unet=spy)
        sample(prepare(components, params), seeds)
        firsts.append(spy.samples[0])
    assert torch.equal(firsts[0][1], firsts[1][0])
