"""Channels-last vs contiguous weights: one UNet call and one VAE decode, per dtype.

The real-shape SD1.5 fixture (``bench/fixtures/sd15-random-fp16.safetensors``) is loaded
once per dtype (``--dtypes``, default bf16 and fp32) with ``load_model``; its UNet and VAE
weights are then switched between the two layouts with
``sdstack.models.layout.use_channels_last`` (what ``load_model(channels_last=...)`` does).
Measured, under ``torch.inference_mode`` with seeded inputs:

- ``UNet call``: batch 2 (CFG) at ``--size`` (512: 64x64 latents), timestep 500, a
  77-token context;
- ``VAE decode``: one 512x512 image from its latents.

After a warm-up call in each layout the layouts alternate ``--repeats`` times (median);
``max rel. diff`` is ``max |y_cl - y| / max |y|`` of the two layouts' outputs (rounding
only: the same sums in another order).

Usage::

    flock /tmp/bench.lock .venv/bin/python bench/layout.py          # ~4 min on 2 cores
    .venv/bin/python bench/layout.py --dtypes bf16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_fixtures


def seconds_and_output(call) -> tuple[float, object]:
    started = time.perf_counter()
    output = call()
    return time.perf_counter() - started, output


def measure_dtype(dtype: str, size: int, repeats: int) -> list[str]:
    """Markdown rows for one dtype: UNet call and VAE decode in both layouts."""
    import torch

    from sdstack.models import load_model
    from sdstack.models.layout import use_channels_last

    checkpoint, _ = make_fixtures.make_full()
    model = load_model(checkpoint, dtype=dtype, channels_last=False)
    unet, vae = model.unet, model.vae
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(unet.dtype)
    context = torch.randn(2, 77, 768, generator=generator).to(unet.dtype)
    timestep = torch.tensor([500, 500])
    decode_in = (latents[:1] / vae.config.scaling_factor).to(vae.dtype)
    calls = {
        "UNet call": lambda: unet(latents, timestep, encoder_hidden_states=context).sample,
        "VAE decode": lambda: vae.decode(decode_in).sample,
    }
    rows = []
    with torch.inference_mode():
        for name, call in calls.items():
            times: dict[bool, list[float]] = {False: [], True: []}
            outputs = {}
            for layout in (False, True):  # warm-up, keeping each layout's output
                use_channels_last(model, layout)
                outputs[layout] = seconds_and_output(call)[1].float()
            for _ in range(repeats):
                for layout in (False, True):
                    use_channels_last(model, layout)
                    times[layout].append(seconds_and_output(call)[0])
            base, fast = statistics.median(times[False]), statistics.median(times[True])
            diff = (outputs[True] - outputs[False]).abs().max() / outputs[False].abs().max()
            rows.append(
                f"| {name} | {dtype} | {base:.3f} | {fast:.3f} | {100 * (fast / base - 1):+.1f}% "
                f"| {float(diff):.1e} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], help="bf16 fp32")
    parser.add_argument("--size", type=int, default=512, help="image size (512)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per layout (2)")
    args = parser.parse_args(argv)
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
        f"median of {args.repeats} after a warm-up, load average {os.getloadavg()[0]:.2f}\n"
    )
    print("| call | dtype | contiguous s | channels-last s | change | max rel. diff |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in args.dtypes:
        print("\n".join(measure_dtype(dtype, args.size, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
