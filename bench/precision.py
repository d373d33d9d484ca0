"""How far each precision lands from fp32: latents after 20 steps, and the decoded images.

For each ``--dtype`` setting (``auto`` = what ``sdstack generate`` picks on this machine,
then every network in bf16, then every network in fp16) the same job runs as in fp32:
prompt below, no negative, the default sampler (DPM++ 2M, Automatic schedule), 20 steps,
CFG 7, seed 1, CPU noise. Reported against the fp32 run of the same model:

- ``latent rel. L2``: ``|x - x32| / |x32|`` of the final latents (float64 norms);
- ``latent max abs``: ``max |x - x32|`` over the largest ``|x32|``;
- ``image mean / max abs``: mean and largest absolute difference of the 8-bit RGB
  pixels (0..255) of the decoded images;
- ``NaN``: whether the latents or the decoder's output held a NaN (the SD1 VAE's known
  fp16 failure; with random weights it need not show).

Models: full = ``bench/fixtures/sd15-random-fp16.safetensors`` (``make_fixtures.py``: SD1.5
shapes, seeded random weights) at ``--size`` (512) square; ``--quick`` (and the second table
of a full run) = the tiny random model at 64x64. Random weights keep the UNet's arithmetic
(every layer's sums and normalisations) but not a trained model's image, so the figures
measure how rounding grows over 20 steps, not how a picture looks.

Usage::

    .venv/bin/python bench/precision.py --quick                 # tiny model only (~20 s)
    flock /tmp/bench.lock .venv/bin/python bench/precision.py   # 512x512 and tiny (~10 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
SETTINGS = ("fp32", "auto", "bf16", "fp16")


def run_setting(checkpoint: Path, config: Path | None, dtype: str, size: int, steps: int):
    """(latents, RGB uint8 array, seconds, the dtypes used) of one job in ``dtype``."""
    import numpy as np

    from sdstack.generate.params import GenerationParams
    from sdstack.generate.pipeline import decode, prepare, sample
    from sdstack.models import load_model

    model = load_model(checkpoint, dtype=dtype, config_dir=config)
    params = GenerationParams(PROMPT, steps=steps, seed=1, width=size, height=size)
    started = time.perf_counter()
    latents = sample(prepare(model, params), [1])
    image = decode(model, latents, tiling="off")[0]
    seconds = time.perf_counter() - started
    return latents.double(), np.asarray(image, dtype=np.int16), seconds, str(model.dtypes)


def compare(reference: tuple, other: tuple) -> dict[str, float]:
    """The differences of ``other``'s latents and image to ``reference``'s (fp32)."""
    import numpy as np

    latents32, image32 = reference[0], reference[1]
    latents, image = other[0], other[1]
    pixels = np.abs(image - image32)
    return {
        "rel_l2": float((latents - latents32).norm() / latents32.norm()),
        "max_abs": float((latents - latents32).abs().max() / latents32.abs().max()),
        "image_mean": float(pixels.mean()),
        "image_max": float(pixels.max()),
        "nan": bool(latents.isnan().any()),
    }


def measure(checkpoint: Path, config: Path | None, size: int, steps: int) -> list[str]:
    """Markdown rows, fp32 first (the reference, its time only)."""
    runs = {dtype: run_setting(checkpoint, config, dtype, size, steps) for dtype in SETTINGS}
    rows = [
        "| --dtype | networks | job s (sample + decode) | latent rel. L2 | latent max abs "
        "| image mean abs | image max abs | NaN |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for dtype, run in runs.items():
        if dtype == "fp32":
            rows.append(f"| fp32 | {run[3]} | {run[2]:.1f} | 0 | 0 | 0 | 0 | no |")
            continue
        d = compare(runs["fp32"], run)
        rows.append(
            f"| {dtype} | {run[3]} | {run[2]:.1f} | {d['rel_l2']:.2e} | {d['max_abs']:.2e} | "
            f"{d['image_mean']:.2f} | {d['image_max']:.0f} | {'yes' if d['nan'] else 'no'} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (20)")
    parser.add_argument("--size", type=int, default=512, help="full model's size (512)")
    args = parser.parse_args(argv)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps")
    if not args.quick:
        checkpoint, _ = make_fixtures.make_full()
        print(f"\n{checkpoint.name}, {args.size}x{args.size}\n")
        print("\n".join(measure(checkpoint, None, args.size, args.steps)))
    if not make_fixtures.QUICK_CHECKPOINT.is_file():
        make_fixtures.make_quick()
    print(f"\n{make_fixtures.QUICK_CHECKPOINT.name}, 64x64\n")
    print(
        "\n".join(
            measure(make_fixtures.QUICK_CHECKPOINT, make_fixtures.QUICK_CONFIG, 64, args.steps)
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
