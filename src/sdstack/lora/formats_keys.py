"""LoRA file keys split into (module name, part): the grammar of every format read.

- kohya / LyCORIS / reference-UI names have no dot in the module name:
  ``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` -> (``lora_unet_..._to_q``,
  ``lora_down.weight``); the same for ``lora_te_*``, the compvis ``lora_unet_input_blocks_*``
  and the webui ``diffusion_model_*`` / ``transformer_text_model_*`` names. The part is
  everything after the first dot (an unknown part is reported with its module, so an
  algorithm sdstack does not read, such as OFT, is named rather than skipped).
- diffusers / PEFT names are dotted module paths (``unet.down_blocks.0...to_q``,
  ``text_encoder.text_model.encoder...q_proj``, or without the component prefix when a
  single model saved its adapter); the part is a known suffix: ``lora_A.weight`` /
  ``lora_B.weight`` (stored as ``lora_down``/``lora_up``), ``lora_B.bias``, the older
  diffusers ``lora.down.weight`` and ``lora_linear_layer.down.weight``, ``alpha`` and
  PEFT's DoRA ``lora_magnitude_vector``. A leading ``base_model.model.`` is dropped.
- the older diffusers attention-processor form ``...attn1.processor.to_q_lora.down.weight``
  (text encoder: ``...self_attn.to_q_lora.down.weight``) names the projection in the key:
  ``to_q_lora`` -> ``to_q`` (UNet) or ``q_proj`` (text encoder), ``to_out_lora`` ->
  ``to_out.0`` / ``out_proj``.
- ``bundle_emb.<name>.<rest>`` keys are textual-inversion embeddings, not modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCALAR_PARTS = frozenset({"alpha", "scale", "on_input"})
"""Parts read as one number (or flag), never as a weight."""
COMMON_PARTS = frozenset({"alpha", "scale", "dora_scale", "magnitude", "wd_for_diff"})
"""Parts any algorithm may carry besides its own (``magnitude``: PEFT's DoRA vector)."""
KOHYA_PARTS = frozenset(
    {
        "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_up.bias",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "diff", "diff_b", "w_norm", "b_norm", "weight", "on_input",
    }
) | COMMON_PARTS  # fmt: skip
DOTTED_PARTS: dict[str, str] = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_B.bias": "lora_up.bias",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    "lora_magnitude_vector.weight": "magnitude",
    "lora_magnitude_vector": "magnitude",
    "dora_scale": "dora_scale",
    "alpha": "alpha",
}
"""Suffixes of dotted (diffusers/PEFT) keys -> the part they are stored as."""
_DOTTED_BY_LENGTH = sorted(DOTTED_PARTS, key=len, reverse=True)
_ATTN_PROCS = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\."
    r"(?P<direction>down|up)\.weight$"
)
_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
KOHYA_HEADS = ("lora_", "diffusion_model_", "transformer_", "oft_", "lycoris_")
"""Undotted module names start so; their part is whatever follows the first dot."""
COMPONENT_PREFIXES = ("unet.", "text_encoder.", "vae.")
BUNDLE_PREFIX = "bundle_emb."
PEFT_WRAPPER = "base_model.model."


@dataclass(frozen=True)
class SplitKey:
    """One file key: the module name as written, the part it holds, the naming style
    ("kohya" for undotted names, "peft" for dotted ones, "attn-procs")."""

    key: str
    module: str
    part: str
    style: str


def split_key(key: str) -> SplitKey | None:
    """(module, part, style) of a LoRA file key; None when it follows no known grammar
    (the key is then reported as unmatched). ``bundle_emb`` keys are not split here."""
    head, dot, rest = key.partition(".")
    if not dot:
        return None
    if head not in ("unet", "text_encoder", "vae") and (
        rest in KOHYA_PARTS or head.startswith(KOHYA_HEADS)
    ):
        return SplitKey(key, head, rest, "kohya")
    name = key.removeprefix(PEFT_WRAPPER)
    procs = _ATTN_PROCS.match(name)
    if procs is not None:
        module = procs["module"]
        text = module.startswith("text_encoder.") or module.endswith("self_attn")
        table = _TEXT_PROJECTIONS if text else _UNET_PROJECTIONS
        part = "lora_down.weight" if procs["direction"] == "down" else "lora_up.weight"
        return SplitKey(key, f"{module}.{table[procs['proj']]}", part, "attn-procs")
    for suffix in _DOTTED_BY_LENGTH:
        if name.endswith("." + suffix) and len(name) > len(suffix) + 1:
            return SplitKey(key, name[: -len(suffix) - 1], DOTTED_PARTS[suffix], "peft")
    return None


def module_candidates(split: SplitKey) -> tuple[str, ...]:
    """Names to look the module up by: as written, then (dotted names without a
    component prefix) with ``unet.`` or ``text_encoder.`` in front."""
    if split.style == "kohya" or split.module.startswith(COMPONENT_PREFIXES):
        return (split.module,)
    text_first = split.module.startswith(("text_model.", "encoder.layers."))
    prefixes = ("text_encoder.", "unet.") if text_first else ("unet.", "text_encoder.")
    return (split.module, *(prefix + split.module for prefix in prefixes))


def split_bundle_key(key: str) -> tuple[str, str] | None:
    """``bundle_emb.<name>.<rest>`` -> (name, rest), as the reference UI splits it."""
    if not key.startswith(BUNDLE_PREFIX):
        return None
    name, dot, rest = key[len(BUNDLE_PREFIX) :].partition(".")
    if not name or not dot or not rest:
        return None
    return name, rest


UNSUPPORTED_MARKERS = (
    ("oft_", "OFT"),
    ("boft_", "BOFT"),
    ("a1.weight", "GLoRA"),
    ("a2.weight", "GLoRA"),
    ("b1.weight", "GLoRA"),
    ("b2.weight", "GLoRA"),
)


def unsupported_algorithm(parts: set[str] | frozenset[str]) -> str | None:
    """The name of a LyCORIS algorithm sdstack does not read, if ``parts`` use one."""
    for part in parts:
        for marker, name in UNSUPPORTED_MARKERS:
            if part.startswith(marker):
                return name
    return None
