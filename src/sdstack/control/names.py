"""The SD1.5 ControlNet models lllyasviel published (v1.0 and v1.1), recognised by name.

v1.1 names follow the ``control_v11{p,e,u,f1}_sd15[s2]_<type>`` scheme (p production,
e experimental, u unfinished, f1 bug-fix 1, s2 second training). The same models circulate
under other names, all recognised here: ``<name>.safetensors`` / ``.pth``, fp16 re-saves
(``control_v11p_sd15_canny_fp16``, ``control_v11p_sd15_canny.fp16``), the diffusers repos
(``lllyasviel/control_v11p_sd15_canny``, ``lllyasviel/sd-controlnet-canny`` for v1.0),
the web UI's v1.0 safetensors (``control_canny-fp16``) and the extension's model label
``name [hash]``.

``suggested_module`` is the preprocessor the reference extension pairs with the model
(its "Control Type" presets); ``global_average_pooling`` is True for shuffle, whose
residuals the reference averages over H and W (its yaml sets ``global_average_pooling``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdstack.registry import Registry

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
_LABEL_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$")
_PRECISION = re.compile(r"[._-](fp16|fp32|bf16|half|full|pruned)$", re.IGNORECASE)


@dataclass(frozen=True)
class KnownControlModel:
    """One published ControlNet: its canonical name, version "1.0"/"1.1", what it controls
    (``control_type``: canny, depth, ...), the preprocessor it pairs with, and whether its
    residuals are globally average-pooled."""

    name: str
    version: str
    control_type: str
    suggested_module: str
    global_average_pooling: bool = False


KNOWN_CONTROL_MODELS: Registry[KnownControlModel] = Registry("ControlNet model")

_V11 = (
    ("control_v11p_sd15_canny", "canny", "canny"),
    ("control_v11p_sd15_mlsd", "mlsd", "mlsd"),
    ("control_v11f1p_sd15_depth", "depth", "depth_midas"),
    ("control_v11p_sd15_depth", "depth", "depth_midas"),  # the first v1.1 depth (before f1)
    ("control_v11p_sd15_normalbae", "normal", "normal_bae"),
    ("control_v11p_sd15_seg", "seg", "seg_ofade20k"),
    ("control_v11p_sd15_inpaint", "inpaint", "inpaint_only"),
    ("control_v11p_sd15_lineart", "lineart", "lineart_realistic"),
    ("control_v11p_sd15s2_lineart_anime", "lineart", "lineart_anime"),
    ("control_v11p_sd15_openpose", "openpose", "openpose_full"),
    ("control_v11p_sd15_scribble", "scribble", "scribble_pidinet"),
    ("control_v11p_sd15_softedge", "softedge", "softedge_pidinet"),
    ("control_v11e_sd15_shuffle", "shuffle", "shuffle"),
    ("control_v11e_sd15_ip2p", "ip2p", "none"),
    ("control_v11f1e_sd15_tile", "tile", "tile_resample"),
    ("control_v11u_sd15_tile", "tile", "tile_resample"),  # the unfinished tile (before f1e)
)
_V10 = (
    ("canny", "canny", "canny"),
    ("depth", "depth", "depth_midas"),
    ("hed", "softedge", "softedge_hed"),
    ("mlsd", "mlsd", "mlsd"),
    ("normal", "normal", "normal_midas"),
    ("openpose", "openpose", "openpose"),
    ("scribble", "scribble", "scribble_hed"),
    ("seg", "seg", "seg_ufade20k"),
)


def _register() -> None:
    for name, control_type, module in _V11:
        KNOWN_CONTROL_MODELS.register(
            name, KnownControlModel(name, "1.1", control_type, module, control_type == "shuffle")
        )
    for short, control_type, module in _V10:
        name = f"control_sd15_{short}"
        KNOWN_CONTROL_MODELS.register(
            name,
            KnownControlModel(name, "1.0", control_type, module),
            aliases=(f"sd-controlnet-{short}", f"control_{short}"),
        )


_register()


def model_stem(name_or_path: str) -> str:
    """The bare model name in a label, path, file name or repo id.

    ``"control_v11p_sd15_canny [d14c016b]"``, ``"models/ControlNet/control_v11p_sd15_canny
    .safetensors"`` and ``"lllyasviel/control_v11p_sd15_canny"`` all give
    ``"control_v11p_sd15_canny"``.
    """
    text = _LABEL_HASH.sub("", str(name_or_path).strip())
    text = re.split(r"[/\\]", text.rstrip("/\\"))[-1]
    for suffix in WEIGHT_SUFFIXES:
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text


def known_control_model(name_or_stem: str) -> KnownControlModel | None:
    """The published model ``name_or_stem`` names (see the module docstring), else None.

    Case, ``_``/``-``/spaces, a ``[hash]`` label suffix, folders, the file suffix and
    trailing precision tags (``_fp16``, ``-fp16``, ``.fp16``, ``_fp32``, ``_bf16``,
    ``_half``, ``_full``, ``_pruned``) are ignored.
    """
    stem = model_stem(name_or_stem)
    while True:
        if stem in KNOWN_CONTROL_MODELS:
            return KNOWN_CONTROL_MODELS.get(stem)
        shorter = _PRECISION.sub("", stem)
        if shorter == stem or not shorter:
            return None
        stem = shorter
