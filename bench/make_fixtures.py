"""Write the benchmark fixtures into bench/fixtures/ (git-ignored).

Full (default): ``sd15-random-fp16.safetensors``, a real-shape SD1.5 single-file checkpoint
(LDM key layout, seeded random fp16 weights, about 2.1 GB) streamed tensor by tensor, and
``sd15-config/``, a diffusers-layout config folder (model_index.json, unet/vae/text_encoder/
scheduler configs, tokenizer/) with which diffusers'
``StableDiffusionPipeline.from_single_file(ckpt, config=folder, local_files_only=True)``
loads offline.

``--quick``: the same two things with the tiny test model's shapes under
``bench/fixtures/quick/``, plus two tiny kohya LoRAs for it in ``quick/loras/``
(``film``, and ``detail``, which records clip skip 2), a tiny random canny ControlNet in
``quick/models/ControlNet/`` (so ``--root bench/fixtures/quick`` finds it by name), and
``quick/shapes/``: a drawn LoRA-training set (coloured shapes on white, 64x64, kohya
layout ``10_shapes/NAME.png`` + ``NAME.txt``) whose images also serve as control images.

Usage::

    .venv/bin/python bench/make_fixtures.py --quick
    .venv/bin/python bench/make_fixtures.py            # full size, writes ~2.1 GB once
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FULL_CHECKPOINT = FIXTURES / "sd15-random-fp16.safetensors"
FULL_CONFIG = FIXTURES / "sd15-config"
QUICK_CHECKPOINT = FIXTURES / "quick" / "tiny-random-fp16.safetensors"
QUICK_CONFIG = FIXTURES / "quick" / "config"
QUICK_LORAS = FIXTURES / "quick" / "loras"
QUICK_CONTROLNET = FIXTURES / "quick/models/ControlNet/control_v11p_sd15_canny.safetensors"
QUICK_SHAPES = FIXTURES / "quick" / "shapes" / "10_shapes"
COLOURS = ("red", "blue", "green", "orange")
SEED = 1234

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,
    "do_lower_case": True,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def write_config_folder(folder: Path, unet: dict, vae: dict, text: dict) -> None:
    """model_index.json + unet/vae/text_encoder/scheduler configs + tokenizer files."""
    from sdstack.models.assemble import packaged_config
    from sdstack.prompt.tokenizer import tokenizer_dir

    write_json(folder / "model_index.json", MODEL_INDEX)
    write_json(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", **unet})
    write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", **vae})
    write_json(
        folder / "text_encoder" / "config.json",
        {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **text},
    )
    write_json(
        folder / "scheduler" / "scheduler_config.json",
        packaged_config("scheduler/scheduler_config.json"),
    )
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (tokenizer / name).write_bytes((Path(tokenizer_dir()) / name).read_bytes())
    write_json(tokenizer / "tokenizer_config.json", TOKENIZER_CONFIG)


def ldm_shapes(unet_config: dict, vae_config: dict, text_config: dict) -> dict[str, tuple]:
    """LDM key -> shape of the whole single-file checkpoint, from meta-built modules."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdstack.models.assemble import build_meta
    from sdstack.models.key_map.ldm import (
        TEXT_PREFIX,
        UNET_PREFIX,
        VAE_PREFIX,
        unet_key_map,
        vae_key_map,
    )

    shapes: dict[str, tuple] = {}
    for cls, config, prefix, key_map in (
        (UNet2DConditionModel, unet_config, UNET_PREFIX, unet_key_map),
        (AutoencoderKL, vae_config, VAE_PREFIX, vae_key_map),
    ):
        module = build_meta(cls, config)
        state = module.state_dict()
        for row in key_map(module):
            shape = tuple(state[row.diffusers].shape)
            shapes[prefix + row.ldm] = (*shape, 1, 1) if row.conv1x1 else shape
    allowed = set(CLIPTextConfig().to_dict()) | {"vocab_size"}
    with torch.device("meta"):
        text = CLIPTextModel(
            CLIPTextConfig(**{k: v for k, v in text_config.items() if k in allowed})
        )
    for key, tensor in text.state_dict().items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        shapes[TEXT_PREFIX + name] = tuple(tensor.shape)
    return shapes


def stream_safetensors(path: Path, shapes: dict[str, tuple], seed: int) -> int:
    """Write seeded N(0, 0.02) fp16 tensors of ``shapes`` as safetensors, one at a time.

    Layout written directly (8-byte little-endian header length, JSON header padded
    with spaces to a multiple of 8, then the tensors in header order). Returns bytes.
    """
    import math

    import torch

    offsets, position = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 2
        offsets[key] = {
            "dtype": "F16",
            "shape": list(shape),
            "data_offsets": [position, position + size],
        }
        position += size
    header = json.dumps({"__metadata__": {"format": "pt"}, **offsets}).encode()
    header += b" " * (-len(header) % 8)
    generator = torch.Generator().manual_seed(seed)
    temporary = path.with_name(path.name + ".partial")
    with temporary.open("wb") as file:
        file.write(len(header).to_bytes(8, "little") + header)
        for shape in shapes.values():
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32)
            file.write(tensor.mul_(0.02).half().numpy().tobytes())
    os.replace(temporary, path)
    return 8 + len(header) + position


def make_quick() -> tuple[Path, Path]:
    """The tiny test model's shapes, streamed the same way as the full fixture, + configs."""
    from sdstack.models.tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG

    unet, vae = dict(TINY_UNET_CONFIG), dict(TINY_VAE_CONFIG)
    write_config_folder(QUICK_CONFIG, unet, vae, dict(TINY_TEXT_CONFIG))
    QUICK_CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    stream_safetensors(QUICK_CHECKPOINT, ldm_shapes(unet, vae, TINY_TEXT_CONFIG), SEED)
    make_quick_loras()
    from sdstack.control.tiny import write_tiny_controlnet

    write_tiny_controlnet(QUICK_CONTROLNET, seed=1)
    make_quick_shapes()
    return QUICK_CHECKPOINT, QUICK_CONFIG


def make_quick_shapes() -> None:
    """``quick/shapes/10_shapes``: 8 images, a circle and a square in each of ``COLOURS``,
    drawn on white inside a 1/8 margin, captioned ``"<colour> <shape>, white background"``."""
    from PIL import Image, ImageDraw

    QUICK_SHAPES.mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        for shape in ("circle", "square"):
            image = Image.new("RGB", (64, 64), "white")
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)((8, 8, 56, 56), fill=colour)
            image.save(QUICK_SHAPES / f"{colour}_{shape}.png")
            caption = f"{colour} {shape}, white background\n"
            (QUICK_SHAPES / f"{colour}_{shape}.txt").write_text(caption, encoding="utf-8")


def make_quick_loras() -> None:
    """``quick/loras/film`` and ``detail`` (clip skip 2): rank-4 kohya files whose deltas
    are about the size of the fixture's weights (N(0, 0.02))."""
    from sdstack.lora.tiny import write_tiny_lora
    from sdstack.models.tiny import tiny_components

    shapes = tiny_components(seed=0)  # the same architecture as the quick checkpoint
    write_tiny_lora(shapes, QUICK_LORAS / "film.safetensors", seed=1, scale=0.02)
    write_tiny_lora(shapes, QUICK_LORAS / "detail.safetensors", seed=2, scale=0.02, clip_skip=2)


def make_full(force: bool = False) -> tuple[Path, Path]:
    """The real-shape SD1.5 random checkpoint (once; ``force`` rewrites) + config folder."""
    from sdstack.models.assemble import packaged_config

    unet = packaged_config("unet/config.json")
    vae = packaged_config("vae/config.json")
    text = packaged_config("text_encoder/config.json")
    write_config_folder(FULL_CONFIG, unet, vae, text)
    if FULL_CHECKPOINT.is_file() and not force:
        return FULL_CHECKPOINT, FULL_CONFIG
    stream_safetensors(FULL_CHECKPOINT, ldm_shapes(unet, vae, text), SEED)
    return FULL_CHECKPOINT, FULL_CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only (seconds)")
    parser.add_argument("--force", action="store_true", help="rewrite the full checkpoint")
    args = parser.parse_args(argv)
    checkpoint, config = make_quick() if args.quick else make_full(args.force)
    size = checkpoint.stat().st_size
    print(f"checkpoint: {checkpoint} ({size / 1e9:.2f} GB)\nconfig:     {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
