"""Prompt -> conditioning: sdstack ``PromptEncoder`` vs the bare CLIP forward and diffusers.

Model: the full-size SD1.x CLIP ViT-L/14 text model (packaged config, 12 layers, width
768) with random weights, LayerNorms randomised too. Everything runs in one process; each
case is warmed up, then ours and the peer are timed alternately (so machine-load drift hits
both) and the medians are compared.

Cases:

a. a 3-chunk weighted prompt, clip skip 2: ``PromptEncoder.encode`` (parsing, chunking,
   emphasis included) vs the bare transformer forward over the same 3 chunks
   (``text_model(ids, output_hidden_states=True)`` + final LN on ``hidden_states[-2]``).
b. a one-chunk unweighted prompt and its negative: ``PromptEncoder.encode_pair`` vs
   diffusers ``StableDiffusionPipeline.encode_prompt``. diffusers 0.42.1 cannot run
   ``clip_skip`` with transformers 5 (AttributeError), so it runs with ``clip_skip=None``
   (last layer) and ours with ``clip_skip=1`` for the like-for-like ratio; ours at clip
   skip 2 is listed too.

Usage::

    .venv/bin/python bench/encode.py --quick     # few repeats (a check that ratios look sane)
    .venv/bin/python bench/encode.py             # the full run (quiet machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ["HF_HUB_OFFLINE"] = "1"

THREE_CHUNKS = ", ".join(
    f"(detailed {word}:1.2), [blurry {word}], {word} in the ((morning light))"
    for word in (
        "castle",
        "forest",
        "river",
        "mountain",
        "village",
        "harbour",
        "meadow",
        "desert",
        "glacier",
        "canyon",
        "island",
        "valley",
        "lake",
        "tower",
        "bridge",
        "garden",
    )
)  # 191 tokens: 3 chunks
ONE_CHUNK = "a photo of an astronaut riding a horse on the moon, highly detailed, 8k"
NEGATIVE = "lowres, bad anatomy, bad hands, text, error, missing fingers, blurry"


def build_model(device: str):
    """Full-size SD1.x CLIP text model, random weights (LayerNorms included), eval mode."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstack.models.text_encoder import sd15_text_config
    from sdstack.models.tiny import randomize_norms

    torch.manual_seed(0)
    config = {k: v for k, v in sd15_text_config().items() if k not in ("architectures",)}
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    randomize_norms(model, torch.Generator().manual_seed(1))
    return model.to(device)


def timed_pair(
    ours: Callable[[], object], peer: Callable[[], object], repeats: int, warmup: int, sync
) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``peer``, run alternately after ``warmup`` rounds."""
    times: dict[str, list[float]] = {"ours": [], "peer": []}
    for index in range(warmup + repeats):
        for name, fn in (("ours", ours), ("peer", peer)):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["peer"])


def diffusers_pipeline(model, tokenizer):
    """A StableDiffusionPipeline around ``model`` (tiny UNet/VAE: encode_prompt ignores them)."""
    from sdstack.models.components import ModelComponents
    from sdstack.models.tiny import tiny_unet, tiny_vae

    components = ModelComponents(
        unet=tiny_unet(), vae=tiny_vae(), text_encoder=model, tokenizer=tokenizer
    )
    return components.diffusers_pipeline()


def case_long_prompt(encoder, model, device: str, timing) -> tuple:
    """a. 3-chunk weighted prompt, clip skip 2, vs the bare forward over the same chunks."""
    import torch

    chunks = encoder.tokenize(THREE_CHUNKS).chunks
    ids = torch.tensor([c.ids for c in chunks], device=device)

    def bare() -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            return model.final_layer_norm(out.hidden_states[-2])

    ours, peer = timing(lambda: encoder.encode(THREE_CHUNKS, clip_skip=2), bare)
    return (f"a. {len(chunks)}-chunk weighted, clip skip 2", "bare forward", ours, peer)


def case_pair(encoder, model, tokenizer, device: str, timing) -> list[tuple]:
    """b. one-chunk prompt + negative vs diffusers encode_prompt (clip_skip=None = last layer)."""
    import torch

    pipe = diffusers_pipeline(model, tokenizer)

    def diffusers_encode():
        with torch.no_grad():
            return pipe.encode_prompt(
                ONE_CHUNK, device, 1, True, negative_prompt=NEGATIVE, clip_skip=None
            )

    rows = []
    for clip_skip in (1, 2):
        ours, peer = timing(
            lambda n=clip_skip: encoder.encode_pair(ONE_CHUNK, NEGATIVE, clip_skip=n),
            diffusers_encode,
        )
        note = "" if clip_skip == 1 else " (diffusers at last layer)"
        label = f"b. pair, 1 chunk, clip skip {clip_skip}{note}"
        rows.append((label, "diffusers encode_prompt(clip_skip=None)", ours, peer))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    parser.add_argument("--repeats", type=int, help="timed rounds per case (default 20)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 20)
    warmup = 1 if args.quick else 3

    import torch

    from sdstack.prompt import load_tokenizer
    from sdstack.text import PromptEncoder

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model = build_model(args.device)
    tokenizer = load_tokenizer()
    encoder = PromptEncoder(model, tokenizer)

    def timing(ours, peer):
        return timed_pair(ours, peer, repeats, warmup, sync)

    rows = [case_long_prompt(encoder, model, args.device, timing)]
    rows += case_pair(encoder, model, tokenizer, args.device, timing)

    print(f"device {args.device}, {torch.get_num_threads()} threads, median of {repeats} runs")
    print("| case | peer | ours ms | peer ms | ours/peer |\n|---|---|---:|---:|---:|")
    for label, peer_name, ours, peer in rows:
        print(
            f"| {label} | {peer_name} | {ours * 1e3:.1f} | {peer * 1e3:.1f} | {ours / peer:.3f} |"
        )


if __name__ == "__main__":
    main()
