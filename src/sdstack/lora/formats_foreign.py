"""Recognising a LoRA made for another model family (SDXL, SD 2.x...) before matching it.

Such a file would otherwise give a wall of shape errors or unmatched keys; instead it is
refused with what it is for. Evidence, strongest first:

1. metadata: ``ss_base_model_version`` (``sdxl_*``, ``sd_v2*``; kohya), ``ss_v2 = True``,
   ``modelspec.architecture`` (``stable-diffusion-xl-*``, ``stable-diffusion-v2-*``...);
2. key names: ``lora_te1_`` / ``lora_te2_`` / ``text_encoder_2.`` (SDXL's two text
   encoders), ``lora_unet_label_emb`` (SDXL's size conditioning), a second
   ``transformer_blocks`` entry (SDXL stacks 2 or 10 per attention; SD 1.x and 2.x one)
   when the model has none;
3. widths that are not this model's: a cross-attention ``to_k``/``to_v`` fed 2048-wide
   (SDXL) or 1024-wide (SD 2.x) context, a text-encoder projection 1024 wide (SD 2.x,
   OpenCLIP ViT-H) or 1280 wide (SDXL's second encoder);
4. text-encoder layers numbered 12 or more (SD 1.x's CLIP has 12; kohya writes 23 for
   SD 2.x, which drops the last of OpenCLIP's 24).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdstack.lora.network import ForeignLoraError

BASE_VERSIONS = (("sdxl", "SDXL"), ("sd_v2", "SD 2.x"), ("sd3", "SD 3"), ("flux", "FLUX"))
ARCHITECTURES = (
    ("stable-diffusion-xl", "SDXL"),
    ("stable-diffusion-v2", "SD 2.x"),
    ("stable-diffusion-v3", "SD 3"),
    ("flux", "FLUX"),
    ("stable-cascade", "Stable Cascade"),
)
SDXL_KEY_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_label_emb")
_DEEP_TRANSFORMER = re.compile(r"transformer_blocks[._][1-9]")
CONTEXT_WIDTHS = {2048: "SDXL", 1024: "SD 2.x"}
TEXT_WIDTHS = {1024: "SD 2.x", 1280: "SDXL"}
SD1_TEXT_LAYERS = 12
_CROSS_ATTENTION = re.compile(r"attn2[._]to_[kv](?:\.lora_A\.weight|\.lora_down\.weight)$")
_TEXT_PROJECTION = re.compile(
    r"^(?:lora_te_|text_encoder\.).*(?:q_proj|k_proj|v_proj)(?:\.lora_A\.weight|\.lora_down\.weight)$"
)
_TEXT_LAYER = re.compile(
    r"^(?:lora_te_text_model_encoder_layers_|text_encoder\.(?:text_model\.)?encoder\.layers\.)(\d+)[._]"
)


def _from_metadata(metadata: Mapping[str, str]) -> tuple[str, str] | None:
    version = str(metadata.get("ss_base_model_version", "")).strip().lower()
    for prefix, kind in BASE_VERSIONS:
        if version.startswith(prefix):
            return kind, f"ss_base_model_version {version!r}"
    if str(metadata.get("ss_v2", "")).strip() == "True":
        return "SD 2.x", "ss_v2 'True'"
    architecture = str(metadata.get("modelspec.architecture", "")).strip().lower()
    for prefix, kind in ARCHITECTURES:
        if architecture.startswith(prefix):
            return kind, f"modelspec.architecture {architecture!r}"
    return None


def _from_names(shapes: Mapping[str, tuple[int, ...]], key_map: Any) -> tuple[str, str] | None:
    for key in shapes:
        if key.startswith(SDXL_KEY_PREFIXES):
            what = "size-conditioning" if "label_emb" in key else "text-encoder"
            return "SDXL", f"{what} keys such as {key!r:.80}"
    if any(_DEEP_TRANSFORMER.search(layer.module) for layer in key_map.layers):
        return None
    for key in shapes:
        if key.startswith(("lora_unet_", "unet.")) and _DEEP_TRANSFORMER.search(key):
            return "SDXL", f"several transformer blocks per attention, such as {key!r:.90}"
    return None


def _model_widths(key_map: Any) -> tuple[int | None, int | None]:
    """(cross-attention context width, text-encoder width) of the model."""
    context = text = None
    for layer in key_map.layers:
        weight = dict(layer.params).get("weight")
        if weight is None or len(weight) < 2:
            continue
        if context is None and layer.component == "unet" and layer.module.endswith("attn2.to_k"):
            context = weight[1]
        if text is None and layer.component == "text_encoder" and layer.module.endswith("q_proj"):
            text = weight[1]
    return context, text


def _from_widths(shapes: Mapping[str, tuple[int, ...]], key_map: Any) -> tuple[str, str] | None:
    context, text = _model_widths(key_map)
    for key, shape in shapes.items():
        if len(shape) < 2:
            continue
        width = shape[1]
        if _CROSS_ATTENTION.search(key) and width != context and width in CONTEXT_WIDTHS:
            return CONTEXT_WIDTHS[width], f"{key!r:.100} takes {width}-wide context"
        if _TEXT_PROJECTION.search(key) and width != text and width in TEXT_WIDTHS:
            return TEXT_WIDTHS[width], f"{key!r:.100} is {width} wide"
    return None


def _from_layer_count(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str] | None:
    deepest = -1
    for key in shapes:
        found = _TEXT_LAYER.match(key)
        if found is not None:
            deepest = max(deepest, int(found[1]))
    if deepest >= SD1_TEXT_LAYERS:
        return "SD 2.x", f"text-encoder layers up to {deepest}, SD 1.x has 0-11"
    return None


def check_not_foreign(
    path: Path, metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], key_map: Any
) -> None:
    """Raise ForeignLoraError when the file is for another model family (module doc).

    Message: ``<path>: is an SDXL LoRA (<evidence>); this model is SD 1.x``.
    """
    for probe in (
        lambda: _from_metadata(metadata),
        lambda: _from_names(shapes, key_map),
        lambda: _from_widths(shapes, key_map),
        lambda: _from_layer_count(shapes),
    ):
        found = probe()
        if found is not None:
            kind, evidence = found
            article = "an" if kind.startswith("SD") else "a"
            raise ForeignLoraError(
                f"{path}: is {article} {kind} LoRA ({evidence}); this model is SD 1.x",
                kind,
                evidence,
            )
