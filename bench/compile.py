"""``torch.compile`` of the UNet on a CPU: compile time, per-call gain, break-even steps.

One UNet call = one denoising step with CFG (batch 2: cond + uncond rows) at ``--size``
(512x512: 64x64 latents, 77-token contexts), fp32, under ``torch.inference_mode`` as in
sdstack's sampling loop, on seeded random inputs. Two fresh worker processes share one
fresh inductor cache folder (``TORCHINDUCTOR_CACHE_DIR``):

1. ``cold``: ``--calls`` eager calls after one warm-up call (median ``E``), then
   ``torch.compile(unet)`` (default inductor backend) and its first call (``F``: tracing,
   code generation, the C++ build, one run), then ``--calls`` compiled calls (median
   ``C``); the largest difference between compiled and eager outputs;
2. ``warm``: the same compile in a new process that finds the cache of run 1 (what a second
   ``sdstack generate --compile`` job would pay).

A job of ``n`` steps costs ``n E`` eager and ``F + (n - 1) C`` compiled, so compiling pays
off from ``n* = (F - C) / (E - C)`` steps on (never when ``C >= E``); the verdict is for
a 20-step job. A failing compile is reported with its error.

Usage::

    .venv/bin/python bench/compile.py --quick                    # tiny UNet at 64x64
    flock /tmp/bench.lock .venv/bin/python bench/compile.py      # SD1.5 UNet, 512x512
    .venv/bin/python bench/compile.py --size 256 --calls 5
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
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import make_fixtures  # noqa: E402  (bench/ sibling module)

JOB_STEPS = 20


def load_unet(quick: bool):
    """The quick tiny UNet or the SD1.5 fixture's UNet, fp32, eval mode."""
    if quick:
        from sdstack.models.tiny import tiny_components

        return tiny_components(seed=0).unet.eval()
    from sdstack.models import load_model

    checkpoint, config = make_fixtures.make_full()
    return load_model(checkpoint, config_dir=config, dtype="fp32").unet.eval()


def timed_calls(unet, inputs: tuple, calls: int) -> tuple[list[float], object]:
    """Seconds of each of ``calls`` calls, and the last output."""
    import torch

    times, output = [], None
    with torch.inference_mode():
        for _ in range(calls):
            started = time.perf_counter()
            output = unet(*inputs, return_dict=False)[0]
            times.append(time.perf_counter() - started)
    return times, output


def worker(args: argparse.Namespace) -> dict:
    """Eager (``--eager``) then compiled calls in this process, as a dict."""
    import torch

    unet = load_unet(args.quick)
    torch.manual_seed(0)
    latent = args.size // 8
    channels = unet.config.in_channels
    context_dim = unet.config.cross_attention_dim
    inputs = (
        torch.randn(2, channels, latent, latent),
        torch.tensor(500.0),
        torch.randn(2, 77, context_dim),
    )
    record: dict = {"threads": torch.get_num_threads()}
    if args.eager:
        times, reference = timed_calls(unet, inputs, args.calls + 1)
        record["eager_s"] = statistics.median(times[1:])
        torch.save(reference, Path(args.cache) / "eager.pt")
    started = time.perf_counter()
    try:
        compiled = torch.compile(unet)
        first, output = timed_calls(compiled, inputs, 1)
    except Exception as error:  # reported with the table, not hidden
        record["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        return record
    record["wrap_s"] = time.perf_counter() - started - first[0]
    record["first_s"] = first[0]
    times, output = timed_calls(compiled, inputs, args.calls)
    record["compiled_s"] = statistics.median(times)
    reference = torch.load(Path(args.cache) / "eager.pt")
    record["max_diff"] = float((output.float() - reference.float()).abs().max())
    record["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return record


def run_worker(args: argparse.Namespace, cache: str, eager: bool) -> dict:
    command = [sys.executable, __file__, "--worker", "--cache", cache]
    command += ["--size", str(args.size), "--calls", str(args.calls)]
    command += ["--quick"] if args.quick else []
    command += ["--eager"] if eager else []
    environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(cache) / "inductor"))
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if result.returncode != 0:
        return {"error": f"worker exited with {result.returncode}:\n{result.stderr[-3000:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(cold: dict, warm: dict, args: argparse.Namespace) -> str:
    """The table and the break-even verdict."""
    if "error" in cold:
        return f"torch.compile failed:\n{cold['error']}"
    eager = cold["eager_s"]
    lines = ["| run | compile + first call s | compiled call s | eager call s |"]
    lines.append("|---|---:|---:|---:|")
    for name, run in (("cold cache", cold), ("warm cache", warm)):
        if "error" in run:
            lines.append(f"| {name} | failed: {run['error'].splitlines()[0]} | | |")
            continue
        lines.append(f"| {name} | {run['first_s']:.1f} | {run['compiled_s']:.3f} | {eager:.3f} |")
    lines.append(f"\ncompiled vs eager output: max |difference| = {cold['max_diff']:.3g}")
    for name, run in (("cold", cold), ("warm", warm)):
        if "error" in run:
            continue
        gain = eager - run["compiled_s"]
        lines.append(f"- {name}: per-call gain {gain:+.3f} s ({100 * gain / eager:+.1f}% of eager)")
        if gain <= 0:
            lines.append(f"- {name}: compiled calls are not faster: never pays off")
            continue
        steps = (run["first_s"] - run["compiled_s"]) / gain
        saved = JOB_STEPS * eager - (run["first_s"] + (JOB_STEPS - 1) * run["compiled_s"])
        verdict = "pays off" if steps <= JOB_STEPS else "does NOT pay off"
        lines.append(
            f"- {name}: break-even after {steps:.0f} steps; a {JOB_STEPS}-step job "
            f"{verdict} (it saves {saved:+.1f} s)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet at 64x64")
    parser.add_argument("--size", type=int, help="image side (default 512; quick 64)")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per mode (median)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.quick else 512)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="compile-bench-") as cache:
        cold = run_worker(args, cache, eager=True)
        warm = run_worker(args, cache, eager=False) if "error" not in cold else cold
    import torch

    name = "tiny UNet" if args.quick else "SD1.5 UNet (bench/fixtures/sd15-random-fp16)"
    print(
        f"{name}, {args.size}x{args.size} (batch 2), fp32, inference_mode, torch "
        f"{torch.__version__}, threads {cold.get('threads')}, median of {args.calls} calls; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n"
    )
    print(report(cold, warm, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
