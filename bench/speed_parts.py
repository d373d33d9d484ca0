"""Speed parts of issue 14: token merging per UNet call, tiled vs untiled VAE decode.

1. Token merging (``sdstack.generate.token_merging``, tomesd with the reference's
   settings): one UNet call with CFG (batch 2) at 512x512 (64x64 latents), ratios 0, 0.3,
   0.5, run round-robin after a warm-up; the median seconds per call, the speed-up over
   ratio 0, and the relative L2 difference ``|eps_r - eps_0| / |eps_0|`` of the UNet
   output (same latents, timestep 500, random context).
2. VAE decode (``sdstack.generate.vae_tiling``) at 1024x1024 and 2048x2048, untiled and
   tiled (64-latent tiles, overlap 16), each in a fresh subprocess so that its peak RSS
   (``ru_maxrss``) is its own; "over base" subtracts the RSS after the VAE is loaded. The
   tiled-vs-untiled difference is the mean absolute difference over the untiled output's
   standard deviation. Untiled 2048 (about 15.5 GB in fp32, from 1024) runs only with
   ``--untiled-2048``.

Model: full = ``bench/fixtures/sd15-random-fp16.safetensors`` (``bench/make_fixtures.py``;
random weights with SD1.5 shapes) in fp32 on the CPU; ``--quick`` = the tiny random model
(ToMe at 32x32 latents with ``max_downsample=2``, where its attention is; decode at 256
and 512 pixels with 16-latent tiles, overlap 4).

Usage::

    .venv/bin/python bench/speed_parts.py --quick
    flock /tmp/bench.lock .venv/bin/python bench/speed_parts.py      # full size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT = FIXTURES / "sd15-random-fp16.safetensors"
RATIOS = (0.0, 0.3, 0.5)


def rss_mb() -> float:
    """Current resident set size in MB (psutil when present, else /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """``ru_maxrss`` of this process in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_unet(quick: bool):
    """The tiny UNet, or the fixture's UNet in fp32."""
    if quick:
        from sdstack.models.tiny import tiny_unet

        return tiny_unet(0)
    from sdstack.models import load_model

    return load_model(CHECKPOINT, config_dir=FIXTURES / "sd15-config", dtype="fp32").unet


def load_vae(quick: bool):
    """The tiny VAE, or the fixture's VAE in fp32 (read alone from the checkpoint)."""
    import torch

    if quick:
        from sdstack.models.tiny import tiny_vae

        return tiny_vae(0)
    from diffusers import AutoencoderKL

    from sdstack.models.assemble import build_meta, packaged_config
    from sdstack.models.vae_file import load_vae_weights

    vae = build_meta(AutoencoderKL, packaged_config("vae/config.json"))
    return load_vae_weights(CHECKPOINT, vae, torch.float32, torch.device("cpu")).eval()


def bench_token_merging(quick: bool, repeats: int) -> list[dict]:
    """Median seconds per UNet call and output difference for each ratio."""
    import torch

    from sdstack.generate.token_merging import token_merging

    unet = load_unet(quick)
    size, width, downsample = (32, 32, 2) if quick else (64, 768, 1)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, size, size, generator=generator)
    context = torch.randn(2, 77, width, generator=generator)
    timestep = torch.tensor(500)

    def call(ratio: float) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(), token_merging(unet, ratio, max_downsample=downsample):
            start = time.perf_counter()
            output = unet(sample, timestep, encoder_hidden_states=context).sample
            return time.perf_counter() - start, output

    outputs = {ratio: call(ratio)[1] for ratio in RATIOS}  # warm-up, and the outputs
    times: dict[float, list[float]] = {ratio: [] for ratio in RATIOS}
    for _ in range(repeats):
        for ratio in RATIOS:
            times[ratio].append(call(ratio)[0])
    base = statistics.median(times[0.0])
    rows = []
    for ratio in RATIOS:
        median = statistics.median(times[ratio])
        difference = (outputs[ratio] - outputs[0.0]).norm() / outputs[0.0].norm()
        rows.append(
            {"ratio": ratio, "seconds": median, "speedup": base / median,
             "relative_l2": difference.item()}
        )  # fmt: skip
    return rows


def decode_worker(quick: bool, size: int, tiling: str, out: str) -> None:
    """One decode in this (fresh) process; prints a JSON line, saves the output to ``out``."""
    import torch

    from sdstack.generate.vae_tiling import vae_decode

    vae = load_vae(quick)
    tile, overlap = (16, 4) if quick else (64, 16)
    latents = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(0))
    base = rss_mb()
    with torch.inference_mode():
        start = time.perf_counter()
        image = vae_decode(vae, latents, tiling, tile=tile, overlap=overlap)
        seconds = time.perf_counter() - start
    torch.save(image, out)
    print(json.dumps({"seconds": seconds, "base_mb": base, "peak_mb": peak_rss_mb()}))


def run_decode(quick: bool, size: int, tiling: str, out: Path, threads: int | None) -> dict:
    """``decode_worker`` in a subprocess; its JSON line, or the error it ended with."""
    command = [sys.executable, __file__, "--worker-decode", str(size), tiling, str(out)]
    command += ["--quick"] if quick else []
    command += ["--threads", str(threads)] if threads else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_decode(quick: bool, untiled_2048: bool, threads: int | None) -> list[dict]:
    """Time and peak memory of untiled and tiled decodes, and their difference."""
    import torch

    sizes = (256, 512) if quick else (1024, 2048)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            outputs = {}
            for tiling in ("off", "on"):
                if tiling == "off" and size == sizes[-1] and not quick and not untiled_2048:
                    rows.append({"size": size, "tiling": tiling, "skipped": True})
                    continue
                out = Path(folder) / f"{size}-{tiling}.pt"
                row = {
                    "size": size,
                    "tiling": tiling,
                    **run_decode(quick, size, tiling, out, threads),
                }
                if out.is_file():
                    outputs[tiling] = torch.load(out)
                rows.append(row)
            if len(outputs) == 2:
                full = outputs["off"].float()
                rows[-1]["diff_sigma"] = ((outputs["on"] - full).abs().mean() / full.std()).item()
    return rows


def report(tome: list[dict], decode: list[dict], quick: bool) -> None:
    import torch

    model = "tiny random" if quick else "SD1.5-shape random fp32 (fixture)"
    print(f"model: {model}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\ntoken merging, one UNet call (batch 2):")
    print(f"{'ratio':>6} {'s/call':>9} {'speed-up':>9} {'rel L2 diff':>12}")
    for row in tome:
        print(
            f"{row['ratio']:>6} {row['seconds']:>9.3f} {row['speedup']:>8.2f}x "
            f"{row['relative_l2']:>12.2e}"
        )
    print("\nVAE decode:")
    print(f"{'size':>6} {'tiling':>6} {'s':>8} {'peak MB':>9} {'over base':>10} {'diff/sigma':>11}")
    for row in decode:
        if row.get("skipped") or "error" in row:
            note = "skipped (--untiled-2048)" if row.get("skipped") else f"error: {row['error']}"
            print(f"{row['size']:>6} {row['tiling']:>6} {note}")
            continue
        diff = f"{row['diff_sigma']:.4f}" if "diff_sigma" in row else ""
        print(
            f"{row['size']:>6} {row['tiling']:>6} {row['seconds']:>8.2f} {row['peak_mb']:>9.0f} "
            f"{row['peak_mb'] - row['base_mb']:>10.0f} {diff:>11}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds")
    parser.add_argument("--part", choices=("all", "tome", "vae"), default="all")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per ratio")
    parser.add_argument("--untiled-2048", action="store_true", help="also decode 2048 untiled")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (quick: 1)")
    parser.add_argument("--worker-decode", nargs=3, metavar=("SIZE", "TILING", "OUT"))
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if args.worker_decode:
        size, tiling, out = args.worker_decode
        decode_worker(args.quick, int(size), tiling, out)
        return 0
    if not args.quick and not CHECKPOINT.is_file():
        print(f"{CHECKPOINT} is missing: run bench/make_fixtures.py first", file=sys.stderr)
        return 1
    repeats = args.repeats or (5 if args.quick else 3)
    tome = bench_token_merging(args.quick, repeats) if args.part in ("all", "tome") else []
    decode = (
        bench_decode(args.quick, args.untiled_2048, threads) if args.part in ("all", "vae") else []
    )
    report(tome, decode, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
