"""Checkpoint file -> ready SD1.x pipeline: sdstack ``load_model`` vs diffusers
``StableDiffusionPipeline.from_single_file(ckpt, config=folder)``.

Each measurement runs in a fresh subprocess (cold Python); the file is read once before
the first run so that both sides find it in the page cache, and the sides alternate run by
run. The header says whether accelerate is installed: without it diffusers random-initialises
every weight before loading. Reported per side: ``load`` = the load call alone (imports excluded),
``load+touch`` = load plus reading every parameter once (a checksum), which pages in
memory-mapped weights so that lazy loading is not counted as free; peak RSS is the
worker's ``ru_maxrss`` after the touch (the whole process, imports included).

Usage::

    .venv/bin/python bench/load.py --quick      # tiny shapes, seconds (make_fixtures --quick)
    .venv/bin/python bench/load.py              # real-shape SD1.5 fp16 (make_fixtures first)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import make_fixtures  # noqa: E402  (bench/ sibling module)


def _checksum(modules) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                total += float(parameter.float().sum())
    return total


def worker(side: str, checkpoint: str, config: str, dtype: str) -> dict:
    """Load once in this process; timings and peak RSS as a dict."""
    started = time.perf_counter()
    import torch
    from diffusers import StableDiffusionPipeline

    from sdstack.models import load_model

    imported = time.perf_counter()
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if side == "sdstack":
        model = load_model(checkpoint, dtype=dtype, config_dir=config)
    else:
        model = StableDiffusionPipeline.from_single_file(
            checkpoint,
            config=config,
            local_files_only=True,
            safety_checker=None,
            torch_dtype={"fp16": torch.float16, "fp32": torch.float32}[dtype],
        )
    loaded = time.perf_counter()
    _checksum([model.unet, model.vae, model.text_encoder])
    touched = time.perf_counter()
    return {
        "import_s": imported - started,
        "load_s": loaded - imported,
        "touch_s": touched - imported,
        "baseline_mb": baseline_mb,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dtype": str(next(model.unet.parameters()).dtype),
    }


def run_side(side: str, checkpoint: Path, config: Path, dtype: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--checkpoint",
        str(checkpoint),
        "--config",
        str(config),
        "--dtype",
        dtype,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def warm_page_cache(path: Path) -> None:
    """Read the file once so that neither side pays for the disk (both get a warm cache)."""
    with path.open("rb", buffering=0) as handle:
        while handle.read(64 << 20):
            pass


def alternating_medians(
    checkpoint: Path, config: Path, dtype: str, repeats: int
) -> dict[str, dict[str, float]]:
    """Per side, the medians of ``repeats`` runs; the two sides alternate run by run."""
    runs: dict[str, list[dict]] = {"sdstack": [], "diffusers": []}
    for _ in range(repeats):
        for side, side_runs in runs.items():
            side_runs.append(run_side(side, checkpoint, config, dtype))
    keys = ("import_s", "load_s", "touch_s", "baseline_mb", "peak_mb")
    return {
        side: {key: statistics.median(run[key] for run in side_runs) for key in keys}
        for side, side_runs in runs.items()
    }


def peer_versions() -> str:
    """diffusers' version, and whether accelerate (which changes its loading) is installed."""
    from importlib import metadata

    try:
        accelerate = f"accelerate {metadata.version('accelerate')} installed"
    except metadata.PackageNotFoundError:
        accelerate = "accelerate not installed (diffusers initialises the weights first)"
    return f"diffusers {metadata.version('diffusers')}, {accelerate}"


def table(results: dict[tuple[str, str], dict]) -> str:
    lines = [
        "| dtype | loader | load s | load+touch s | peak RSS MB | RSS over baseline MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (dtype, side), r in results.items():
        lines.append(
            f"| {dtype} | {side} | {r['load_s']:.3f} | {r['touch_s']:.3f} | "
            f"{r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} |"
        )
    for dtype in dict.fromkeys(d for d, _ in results):
        ours, theirs = results[(dtype, "sdstack")], results[(dtype, "diffusers")]
        lines.append(
            f"| {dtype} | **sdstack / diffusers** | {ours['load_s'] / theirs['load_s']:.2f}x | "
            f"{ours['touch_s'] / theirs['touch_s']:.2f}x | "
            f"{ours['peak_mb'] / theirs['peak_mb']:.2f}x | "
            f"{(ours['peak_mb'] - ours['baseline_mb']) / max(1.0, theirs['peak_mb'] - theirs['baseline_mb']):.2f}x |"  # noqa: E501
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--checkpoint", type=Path, help="single-file checkpoint to load")
    parser.add_argument("--config", type=Path, help="diffusers config folder for it")
    parser.add_argument(
        "--dtype",
        choices=("fp16", "fp32"),
        action="append",
        help="dtype(s) to load in (default: fp16 and fp32)",
    )
    parser.add_argument("--repeats", type=int, help="runs per side (median; default 3, quick 1)")
    parser.add_argument("--worker", choices=("sdstack", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(
            json.dumps(worker(args.worker, str(args.checkpoint), str(args.config), args.dtype[0]))
        )
        return 0
    if args.checkpoint is None:
        make = make_fixtures.make_quick if args.quick else make_fixtures.make_full
        args.checkpoint, default_config = make()
        args.config = args.config or default_config
    repeats = args.repeats or (1 if args.quick else 3)
    warm_page_cache(args.checkpoint)
    results = {}
    for dtype in args.dtype or ["fp16", "fp32"]:
        medians = alternating_medians(args.checkpoint, args.config, dtype, repeats)
        for side, values in medians.items():
            results[(dtype, side)] = values
    size = args.checkpoint.stat().st_size / 1e6
    print(f"checkpoint {args.checkpoint.name} ({size:.0f} MB), {repeats} run(s) per cell, median")
    print(f"{peer_versions()}; page cache warmed first; sides alternate run by run\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
