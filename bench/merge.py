"""Checkpoint merging: sdstack's streaming ``merge_checkpoints`` vs the reference's
whole-state-dict merge vs the disk limit, in wall time and peak RSS.

Inputs: the real-shape SD1.5 fixture of ``make_fixtures.py`` (made if missing) as A, and two
byte-for-byte copies of it made once with a plain file copy into ``bench/fixtures/merge/``
(git-ignored) as B and C, so that every input is its own file on disk. ``--quick`` does the
same with ``bench/fixtures/quick/tiny-random-fp16.safetensors`` (into ``quick/merge/``).

Methods: weighted sum (A, B; ``(1-a)A + aB``, a = 0.5) and add difference (A, B, C;
``A + a(B - C)``, a = 1.0), fp16 output, fp32 math.

Sides, each in its own subprocess, one after another (never two at once):

- ``ours``: ``sdstack.merge.stream.merge_checkpoints(A, B, C, OUT, MergeSettings(...))``,
  which also hashes the inputs (sha256, for the recipe metadata) in a background thread.
  Run twice: with ``SDSTACK_CACHE_DIR`` set to a fresh empty folder (the hashes are
  computed) and with the folder that run left (the hashes are cached).
- ``reference``: the reference's approach, written here: ``safetensors.torch.load_file`` of
  every input (whole state dicts in memory), every floating key merged in fp32 and cast to
  fp16 in place of A's tensor, then ``save_file`` (other keys are A's, as they are).
- ``disk``: the disk limit: every input file read once (plain reads, 16 MiB buffer) and an
  output file of one input's size written once.

Every worker calls ``torch.set_num_threads(1)``: the merge is memory-bound (a few flops per
byte read), so threads only add noise. Peak RSS is the worker's ``ru_maxrss``; baseline is
its RSS after the imports (torch + sdstack, before any merge work). The page cache cannot
be dropped here (no root), so each side is run once untimed to warm it and then timed
once; the times are therefore warm-cache times, the disk limit included. Outputs are
deleted after each run.

Goals (issue 10): ours within 1.3x of the disk limit; peak RSS under a quarter of one model.

Usage::

    .venv/bin/python bench/merge.py --quick   # tiny shapes, seconds
    .venv/bin/python bench/merge.py           # real-shape SD1.5 fp16 (2.1 GB per input)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("SDSTACK_ROOT", None)
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import make_fixtures  # noqa: E402  (bench/ sibling module)

BUFFER = 16 << 20
METHODS = {"weighted-sum": ("weighted-sum", 0.5, 2), "add-difference": ("add-difference", 1.0, 3)}


# --------------------------------------------------------------------------- workers


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(inputs: list[str], out: str, method: str, alpha: float) -> None:
    from sdstack.merge.settings import MergeSettings
    from sdstack.merge.stream import merge_checkpoints

    a, b, *rest = inputs
    settings = MergeSettings(method=method, alpha=alpha, dtype="fp16")
    merge_checkpoints(a, b, rest[0] if rest else None, out, settings)


def reference(inputs: list[str], out: str, method: str, alpha: float) -> None:
    """Whole state dicts: ``(1-a)A + aB`` or ``A + a(B - C)`` per floating key, in fp32."""
    from safetensors.torch import load_file, save_file

    dicts = [load_file(path) for path in inputs]
    theta = dicts[0]
    for key, tensor in theta.items():
        if not tensor.is_floating_point() or any(key not in other for other in dicts[1:]):
            continue
        a, b = tensor.float(), dicts[1][key].float()
        if method == "weighted-sum":
            merged = (1 - alpha) * a + alpha * b
        else:
            merged = a + alpha * (b - dicts[2][key].float())
        theta[key] = merged.half()
    save_file(theta, out)


def disk(inputs: list[str], out: str, method: str, alpha: float) -> None:
    """Read each input once, write one input's size once (plain reads and writes)."""
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    for path in inputs:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass
    size = os.path.getsize(inputs[0])
    with open(out, "wb", buffering=0) as file:
        while size > 0:
            size -= file.write(view[: min(size, BUFFER)])


SIDES = {"ours": ours, "reference": reference, "disk": disk}


def worker(side: str, inputs: list[str], out: str, method: str, alpha: float) -> dict:
    import safetensors.torch  # noqa: F401  (imports before the clock, for every side)
    import torch

    import sdstack.merge.stream  # noqa: F401

    torch.set_num_threads(1)
    baseline = rss_mb()
    started = time.perf_counter()
    SIDES[side](inputs, out, method, alpha)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": rss_mb(), "baseline_mb": baseline}


# --------------------------------------------------------------------------- driver


def run_side(side: str, inputs: list[Path], out: Path, method: str, cache: Path | None) -> dict:
    """One worker process; the output is deleted afterwards."""
    _, alpha, _ = METHODS[method]
    command = [sys.executable, __file__, "--worker", side, "--method", method]
    command += ["--out", str(out), "--inputs", *map(str, inputs)]
    env = dict(os.environ)
    if cache is not None:
        env["SDSTACK_CACHE_DIR"] = str(cache)
    out.unlink(missing_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    out.unlink(missing_ok=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]) | {"alpha": alpha}


def bench_method(method: str, inputs: list[Path], folder: Path) -> dict[str, dict]:
    """Warm-up then timed run of each side; ours fresh-cache and cached."""
    out = folder / f"out-{method}.safetensors"
    results = {}
    for side in ("disk", "reference"):
        run_side(side, inputs, out, method, None)  # warm
        results[side] = run_side(side, inputs, out, method, None)
    with tempfile.TemporaryDirectory(prefix="sdstack-bench-cache-") as scratch:
        warm, fresh, cached = (Path(scratch) / name for name in ("warm", "fresh", "cached"))
        run_side("ours", inputs, out, method, warm)  # warm (hashes computed)
        results["ours, hashes computed"] = run_side("ours", inputs, out, method, fresh)
        shutil.copytree(fresh, cached)
        results["ours, hashes cached"] = run_side("ours", inputs, out, method, cached)
    return results


def make_inputs(checkpoint: Path) -> list[Path]:
    """A and two byte copies of it (made once) in ``merge/`` beside the checkpoint."""
    folder = checkpoint.parent / "merge"
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for name in ("b", "c"):
        copy = folder / f"{checkpoint.stem}-{name}.safetensors"
        if not copy.is_file() or copy.stat().st_size != checkpoint.stat().st_size:
            partial = copy.with_name(copy.name + ".partial")
            shutil.copyfile(checkpoint, partial)
            os.replace(partial, copy)
        copies.append(copy)
    return [checkpoint, *copies]


def table(all_results: dict[str, dict[str, dict]], model_mb: float) -> str:
    lines = [
        "| method | side | wall s | / disk limit | peak RSS MB | baseline RSS MB "
        "| peak RSS / model | (peak - baseline) / model |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, results in all_results.items():
        limit = results["disk"]["seconds"]
        for side in ("ours, hashes computed", "ours, hashes cached", "reference", "disk"):
            r = results[side]
            lines.append(
                f"| {method} | {side} | {r['seconds']:.2f} | {r['seconds'] / limit:.2f}x | "
                f"{r['peak_mb']:.0f} | {r['baseline_mb']:.0f} | {r['peak_mb'] / model_mb:.3f} | "
                f"{(r['peak_mb'] - r['baseline_mb']) / model_mb:.3f} |"
            )
    return "\n".join(lines)


def goals(all_results: dict[str, dict[str, dict]], model_mb: float) -> str:
    marks = []
    for method, results in all_results.items():
        limit = results["disk"]["seconds"]
        for side in ("ours, hashes computed", "ours, hashes cached"):
            r = results[side]
            ratio, share = r["seconds"] / limit, r["peak_mb"] / model_mb
            growth = (r["peak_mb"] - r["baseline_mb"]) / model_mb
            marks.append(
                f"{method} {side}: {ratio:.2f}x disk ({'met' if ratio <= 1.3 else 'MISSED'}), "
                f"peak RSS {share:.3f} of a model ({'met' if share < 0.25 else 'MISSED'}; "
                f"{growth:.3f} over the import baseline)"
            )
    return "Goals (<= 1.3x disk limit, peak RSS < 0.25 model): " + "; ".join(marks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    parser.add_argument("--method", choices=tuple(METHODS), help="one method only")
    parser.add_argument("--worker", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        name, alpha, _ = METHODS[args.method]
        print(json.dumps(worker(args.worker, args.inputs, args.out, name, alpha)))
        return 0
    make = make_fixtures.make_quick if args.quick else make_fixtures.make_full
    checkpoint, _ = make()
    inputs = make_inputs(checkpoint)
    model_mb = checkpoint.stat().st_size / 2**20
    load_before = os.getloadavg()[0]
    methods = [args.method] if args.method else list(METHODS)
    all_results = {m: bench_method(m, inputs[: METHODS[m][2]], inputs[1].parent) for m in methods}
    from importlib import metadata

    print(
        f"checkpoint {checkpoint.name} ({model_mb:.0f} MiB per input, inputs byte copies); "
        f"fp16 output, fp32 math; torch {metadata.version('torch')}, safetensors "
        f"{metadata.version('safetensors')}; {os.cpu_count()} CPUs, torch threads 1 (the "
        "merge is memory-bound); one process per side, one after another; page cache warm "
        "(each side run once untimed first, then timed once); load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print(table(all_results, model_mb))
    print()
    print(goals(all_results, model_mb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
