"""CLIP text deprojector: decoding latency and training throughput at full CLIP-L shapes.

Model: the SD1.x CLIP ViT-L/14 text model (packaged config: width 768, 12 heads, 3072 MLP,
12 layers) with random weights, LayerNorms randomised too; the deprojector is built from
it (``Deprojector.from_clip``: one layer, 7.1M trainable parameters; the parallel decoder
9.1M, with its queries and its rank-32 ``(s V) U_k`` query term).

Cases:

a. decoding latency, batch 1 and 8: the autoregressive decoder with its key/value cache
   (``decode(cache=True)``: 77 one-position steps), the naive re-run of the whole prefix at
   each step (``decode(cache=False)``: the original's 76 full passes), and the parallel
   decoder (one pass). Medians of ``--repeats`` runs after a warm-up, the three alternated.
b. training throughput (pairs/s): Adam steps of ``training.fit`` (teacher forcing,
   weighted loss) on random pairs of the full shape, batch ``--batch-size`` (100, the
   reference's), both decoders; timed from the first to the last step's callback.
c. teacher throughput (captions/s): the CLIP-L forward that makes the pairs
   (``pairs.teacher_pairs``, batches of 64).

Usage::

    .venv/bin/python bench/deproject.py --quick    # tiny shapes (a check that it runs)
    .venv/bin/python bench/deproject.py            # CLIP-L shapes (quiet machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["HF_HUB_OFFLINE"] = "1"


def build_clip(quick: bool, device: str):
    """Full-size (or, ``quick``, the tiny test) CLIP text model with random weights."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstack.models.text_encoder import sd15_text_config
    from sdstack.models.tiny import randomize_norms, tiny_text_encoder

    if quick:
        return tiny_text_encoder(0).to(device)
    torch.manual_seed(0)
    config = {k: v for k, v in sd15_text_config().items() if k not in ("architectures",)}
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    randomize_norms(model, torch.Generator().manual_seed(1))
    return model.to(device)


def decoding_rows(clip, tokenizer, device: str, repeats: int, sync) -> list[tuple]:
    """a. median ms of cached / naive / parallel decoding, batch 1 and 8."""
    import torch

    from sdstack.text.deprojector.model import Deprojector

    ar = Deprojector.from_clip(clip, tokenizer).to(device).eval()
    parallel = Deprojector.from_clip(clip, tokenizer, decoder="parallel").to(device).eval()
    rows = []
    for batch in (1, 8):
        texts = [f"a photo of object number {i}, detailed" for i in range(batch)]
        embedding = ar.embed(clip, tokenizer, texts).to(device)
        cases = {
            "autoregressive, KV cache": lambda e=embedding: ar.decode(e, cache=True),
            "autoregressive, naive": lambda e=embedding: ar.decode(e, cache=False),
            "parallel": lambda e=embedding: parallel.decode(e),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        with torch.no_grad():
            for index in range(repeats + 1):
                for name, run in cases.items():
                    sync()
                    start = time.perf_counter()
                    run()
                    sync()
                    if index:  # the first round warms up
                        times[name].append(time.perf_counter() - start)
        rows += [(batch, name, statistics.median(t) * 1e3) for name, t in times.items()]
    return rows


def training_rows(clip, tokenizer, device: str, batch: int, steps: int) -> list[tuple]:
    """b. pairs/s of Adam steps on random full-shape pairs, both decoders."""
    import torch

    from sdstack.text.deprojector.model import Deprojector
    from sdstack.text.deprojector.pairs import PairSet, TrainingData
    from sdstack.text.deprojector.training import TrainSettings, fit

    width = int(clip.config.hidden_size)
    generator = torch.Generator().manual_seed(0)
    count = batch * steps
    states = torch.randn(count, 77, width, generator=generator)
    eos = torch.randint(2, 40, (count,), generator=generator)
    pooled = torch.randn(count, width, generator=generator)
    pairs = PairSet(pooled, states, eos)
    heldout = pairs.select(list(range(2)))
    rows = []
    for decoder in ("autoregressive", "parallel"):
        model = Deprojector.from_clip(clip, tokenizer, decoder=decoder)
        data = TrainingData(pooled, torch.arange(count), pairs, heldout, heldout.pooled)
        stamps: list[float] = []
        record = stamps.append
        settings = TrainSettings(steps=steps, batch_size=batch, eval_every=10**6, patience=10**6)
        fit(
            model,
            data,
            settings,
            device=device,
            on_progress=lambda _, record=record: record(time.perf_counter()),
        )
        rate = batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])
        rows.append((decoder, batch, rate))
    return rows


def teacher_rate(clip, tokenizer, count: int) -> float:
    """c. captions/s through the teacher CLIP (pairs.teacher_pairs, batches of 64)."""
    from sdstack.text.deprojector.pairs import teacher_pairs

    texts = [f"a painting of a {i} legged creature in a forest, detailed" for i in range(count)]
    teacher_pairs(clip, tokenizer, texts[:8])  # warm-up
    start = time.perf_counter()
    teacher_pairs(clip, tokenizer, texts)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--repeats", type=int, help="timed decoding rounds (default 10)")
    parser.add_argument("--batch-size", type=int, default=100, help="training batch (100)")
    parser.add_argument("--steps", type=int, help="training steps timed (default 8)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 10)
    steps = args.steps or (3 if args.quick else 8)

    import torch

    from sdstack.prompt import load_tokenizer

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    clip = build_clip(args.quick, args.device)
    tokenizer = load_tokenizer()
    width = clip.config.hidden_size
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, CLIP width {width}, "
        f"{clip.config.num_attention_heads} heads, deprojector 1 layer"
    )
    print(f"\na. decoding latency (median of {repeats})\n| batch | decoder | ms |\n|---:|---|---:|")
    rows = decoding_rows(clip, tokenizer, args.device, repeats, sync)
    for batch, name, ms in rows:
        print(f"| {batch} | {name} | {ms:.1f} |")
    for batch in (1, 8):
        by_name = {name: ms for b, name, ms in rows if b == batch}
        naive, cached = by_name["autoregressive, naive"], by_name["autoregressive, KV cache"]
        print(
            f"batch {batch}: KV cache {naive / cached:.1f}x faster than naive; parallel "
            f"{cached / by_name['parallel']:.1f}x faster than KV cache"
        )
    print(
        f"\nb. training throughput ({steps} Adam steps)\n| decoder | batch | pairs/s |"
        "\n|---|---:|---:|"
    )
    for decoder, batch, rate in training_rows(clip, tokenizer, args.device, args.batch_size, steps):
        print(f"| {decoder} | {batch} | {rate:.1f} |")
    rate = teacher_rate(clip, tokenizer, 64 if args.quick else 256)
    print(f"\nc. teacher CLIP: {rate:.1f} captions/s (pairs made, batches of 64)")


if __name__ == "__main__":
    main()
