"""Reading LoRA and LyCORIS files for an SD 1.x model: every common naming and algorithm.

Files are read through the project's checked readers, never ``torch.load``:
``.safetensors`` headers are checked (``check_safetensors_layout``) before any tensor is
mapped, ``.pt``/``.ckpt``/``.pth``/``.bin`` go through the weights-only unpickler. The
metadata is the safetensors ``__metadata__``.

Names (``formats_keys``): kohya ``lora_unet_*``/``lora_te_*``, the reference UI's compvis
``lora_unet_input_blocks_*`` and ``diffusion_model_*``/``transformer_text_model_*``,
diffusers/PEFT ``unet.``/``text_encoder.`` dotted paths (``lora_A``/``lora_B``) and the
older attention-processor ``to_q_lora`` form. Every module name is looked up in the
model's key map (``KeyMap.find``); keys that match no layer are listed in
``LoraFile.unmatched`` (the caller warns once). Algorithms (``algorithms``): LoRA/LoCon
(conv 3x3, Tucker ``lora_mid``), LoHa (+Tucker), LoKr (full or decomposed factors,
Tucker), full ``diff``/``diff_b``, norm ``w_norm``/``b_norm``, IA3, each optionally with
DoRA (``dora_scale``; PEFT ``lora_magnitude_vector``).

Scale per module: a ``scale`` key wins; otherwise ``alpha / rank`` (no alpha: 1), with
PEFT's alpha from the adapter metadata (``formats_metadata``; none: alpha = rank), and
``alpha / sqrt(rank)`` when the metadata asks for rs-LoRA. Before matching, a file made
for SDXL or SD 2.x is refused (``formats_foreign``); every part's dtype, value and shape
is checked against its layer (``shapes``) before any delta is computed.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdstack.lora.algorithms import ALGORITHMS
from sdstack.lora.formats_embeddings import bundled_embeddings, token_width
from sdstack.lora.formats_foreign import check_not_foreign
from sdstack.lora.formats_keys import (
    COMMON_PARTS,
    SCALAR_PARTS,
    SplitKey,
    module_candidates,
    split_bundle_key,
    split_key,
    unsupported_algorithm,
)
from sdstack.lora.formats_metadata import ScaleRules, scale_rules
from sdstack.lora.network import LoraFile, LoraFileError, ModuleWeights
from sdstack.lora.shapes import PartShapeError, Shape, check_module, dora_layout

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth", ".bin")
MAX_TENSORS = 100_000
"""More tensors than this is not a LoRA (SD 1.x has under 1,200 layers with weights)."""
LAYER_KINDS = {name: ("linear", "conv") for name in ("lora", "loha", "lokr", "ia3")}
"""Layers a factorised algorithm may change (full and norm fit any weight)."""
_LISTED = 5


@dataclass
class _Group:
    """The file keys of one layer: part -> file key, and how the module was named."""

    layer: Any
    name: str
    style: str
    parts: dict[str, str] = field(default_factory=dict)


def read_lora(path: str | os.PathLike[str], key_map: Any = None) -> LoraFile:
    """Read a LoRA/LyCORIS file for a model (module docstring for what is read).

    Args:
        path: the ``.safetensors`` (or weights-only ``.pt``/``.ckpt``/``.bin``) file.
        key_map: the model's ``sdstack.models.key_map.KeyMap`` (``key_map_of(model)``);
            default: the real SD 1.5 architecture (``sd1_key_map()``).

    Returns:
        The :class:`LoraFile`: modules by ``Layer.key``, unmatched keys, embeddings.

    Raises:
        LoraFileError: missing, unreadable, truncated or refused file; a part with the
            wrong dtype or shape (naming key, shape and expected shape), a missing part,
            a NaN alpha, an algorithm sdstack does not read; nothing matching the model.
        ForeignLoraError: an SDXL or SD 2.x (or other family) LoRA.
    """
    # 1. check inputs
    path = Path(path)
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoraFileError(
            f"{path}: unknown LoRA file type {path.suffix!r}; expected one of "
            f"{', '.join(LORA_SUFFIXES)}"
        )
    if not path.is_file():
        raise LoraFileError(f"LoRA file not found: {path}")
    if key_map is None:
        from sdstack.models.key_map import sd1_key_map

        key_map = sd1_key_map()
    # 2. open through the checked readers; guard the tensor count
    source, metadata = _open(path)
    with source:
        shapes = {key: tuple(shape) for key, shape in source.items()}
        # 3. refuse other model families before matching anything
        check_not_foreign(path, metadata, shapes, key_map)
        # 4. group the keys by layer; embeddings apart
        groups, bundle, unmatched = _group_keys(path, shapes, key_map)
        # 5. one checked module per layer, then the bundled embeddings
        rules = scale_rules(path, metadata)
        modules = {key: _module(path, g, source.tensor, rules) for key, g in groups.items()}
        embeddings = bundled_embeddings(path, bundle, source.tensor, token_width(key_map))
    if not modules and not embeddings:
        raise LoraFileError(_nothing_matched(path, shapes))
    return LoraFile(
        path=path,
        name=path.stem,
        metadata=metadata,
        modules=modules,
        unmatched=tuple(unmatched),
        embeddings=embeddings,
        format=_format(groups.values()) if groups else "embeddings",
    )


def _open(path: Path) -> tuple[Any, dict[str, str]]:
    """The file's tensors (``single_file.TensorFile``) and metadata, as LoraFileError."""
    from sdstack.models.detect import CheckpointError
    from sdstack.models.safetensors_header import SafetensorsHeaderError, safetensors_metadata
    from sdstack.models.single_file import open_tensor_file

    try:
        metadata = safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
        source = open_tensor_file(path)
    except (CheckpointError, SafetensorsHeaderError) as error:
        raise LoraFileError(str(error)) from error
    if len(source) > MAX_TENSORS:
        source.close()
        raise LoraFileError(
            f"{path}: {len(source)} tensors; a LoRA file holds at most {MAX_TENSORS} "
            "(SD 1.x has under 1,200 layers with weights)"
        )
    return source, metadata


def _style(split: SplitKey, layer: Any) -> str:
    if split.style != "kohya":
        return split.style
    for style in ("kohya", "compvis", "webui"):
        if split.module == getattr(layer, style):
            return style
    return "kohya"


def _group_keys(
    path: Path, shapes: Mapping[str, Shape], key_map: Any
) -> tuple[dict[str, _Group], dict[str, tuple[str, str]], list[str]]:
    """(groups by Layer.key, bundle_emb keys -> (name, rest), unmatched keys)."""
    groups: dict[str, _Group] = {}
    bundle: dict[str, tuple[str, str]] = {}
    unmatched: list[str] = []
    for key in shapes:
        embedding = split_bundle_key(key)
        if embedding is not None:
            bundle[key] = embedding
            continue
        split = split_key(key)
        layer = None
        if split is not None:
            layer = next(filter(None, map(key_map.find, module_candidates(split))), None)
        if layer is None:
            unmatched.append(key)
            continue
        group = groups.setdefault(layer.key, _Group(layer, split.module, _style(split, layer)))
        if split.part in group.parts:
            raise LoraFileError(
                f"{path}: keys {group.parts[split.part]!r} and {key!r} both hold "
                f"{split.part} of layer {layer.key}; expected one key per part"
            )
        group.parts[split.part] = key
    return groups, bundle, unmatched


def _format(groups: Any) -> str:
    """The naming the file uses: the most common among its UNet modules, else TE's."""
    groups = list(groups)
    unet = [g.style for g in groups if g.layer.component == "unet"]
    styles = Counter(unet or [g.style for g in groups])
    return styles.most_common(1)[0][0]


def _algorithm(path: Path, group: _Group) -> str:
    """The one algorithm whose parts the group holds (or a LoraFileError saying why not)."""
    own = set(group.parts) - COMMON_PARTS
    fitting = [
        a.name
        for a in ALGORITHMS.values()
        if own <= a.parts and any(set(g) <= own for g in a.required)
    ]
    if len(fitting) == 1:
        return fitting[0]
    where = f"{path}: {group.name} (layer {group.layer.key})"
    unsupported = unsupported_algorithm(own)
    if unsupported is not None:
        raise LoraFileError(
            f"{where}: uses {unsupported} ({', '.join(sorted(own))[:160]}), which sdstack does "
            "not read; expected LoRA/LoCon, LoHa, LoKr, full, norm or IA3 modules"
        )
    unknown = sorted(own - {p for a in ALGORITHMS.values() for p in a.parts})
    if unknown:
        raise LoraFileError(f"{where}: unknown key part(s) {', '.join(unknown)[:160]}")
    near = [a for a in ALGORITHMS.values() if own & a.parts]
    if len(near) > 1:
        names = " and ".join(a.name for a in near)
        raise LoraFileError(f"{where}: mixes parts of {names} ({', '.join(sorted(own))})")
    if not near:
        raise LoraFileError(
            f"{where}: has only {', '.join(sorted(group.parts))}; expected the module's "
            "weights too (lora_down.weight and lora_up.weight for a LoRA)"
        )
    algorithm = near[0]
    missing = min((set(g) - own for g in algorithm.required), key=len)
    raise LoraFileError(
        f"{where}: has {', '.join(sorted(own))} but no {', '.join(sorted(missing))}; a "
        f"{algorithm.name} module needs {' + '.join(algorithm.required[0])}"
    )


def _scalar(path: Path, key: str, tensor: torch.Tensor, part: str) -> float:
    if tensor.numel() != 1 or tensor.is_complex():
        raise LoraFileError(
            f"{path}: {key}: {part} has shape {tuple(tensor.shape)} and dtype "
            f"{str(tensor.dtype).removeprefix('torch.')}; expected a single real number"
        )
    value = float(tensor.reshape(-1)[0].item())
    if not math.isfinite(value):
        raise LoraFileError(f"{path}: {key}: {part} is {value}; expected a finite number")
    return value


def _checked_weight(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise LoraFileError(
            f"{path}: {key}: dtype {str(tensor.dtype).removeprefix('torch.')}; expected a "
            "floating-point tensor (F32, F16 or BF16)"
        )
    # One float32 sum (4x faster on CPU than an elementwise isfinite): NaN or inf anywhere
    # makes it non-finite; so do finite values large enough to overflow float32 when
    # summed (far beyond 1e30), which no usable LoRA holds either.
    if not math.isfinite(float(tensor.sum(dtype=torch.float32))):
        raise LoraFileError(f"{path}: {key}: holds NaN or infinite values")
    return tensor


def _shape_error(path: Path, group: _Group, error: PartShapeError, weight: Shape) -> LoraFileError:
    key = group.parts.get(error.part, f"{group.name}.{error.part}")
    got = "" if error.shape is None else f"shape {error.shape}, "
    return LoraFileError(
        f"{path}: {key}: {got}does not fit layer {group.layer.key} (weight "
        f"{tuple(weight)}); expected {error.expected}"
    )


def _module(
    path: Path, group: _Group, tensor: Callable[[str], torch.Tensor], rules: ScaleRules
) -> ModuleWeights:
    """One layer's checked ModuleWeights (dtypes, values, shapes, scale)."""
    # 1. which algorithm, which layer shapes
    algorithm = _algorithm(path, group)
    layer, params = group.layer, dict(group.layer.params)
    weight, bias = params.get("weight"), params.get("bias")
    kinds = LAYER_KINDS.get(algorithm)
    if weight is None or (kinds is not None and layer.kind not in kinds):
        expected = f"a {' or '.join(kinds)} layer" if kinds else "a layer with a weight"
        raise LoraFileError(
            f"{path}: {group.name}: a {algorithm} module on layer {layer.key} ({layer.kind}); "
            f"expected {expected}"
        )
    # 2. read and check every part: scalars are finite numbers, weights finite floats
    scalars, tensors = {}, {}
    for part, key in group.parts.items():
        value = tensor(key)
        if part in SCALAR_PARTS or part == "wd_for_diff":
            scalars[part] = _scalar(path, key, value, part)
        else:
            tensors[part] = _checked_weight(path, key, value)
    if scalars.get("wd_for_diff"):
        raise LoraFileError(
            f"{path}: {group.name}: DoRA on the difference weight (wd_for_diff), which "
            "sdstack does not read (the reference UI neither)"
        )
    own = {p: t for p, t in tensors.items() if p not in COMMON_PARTS}
    if "on_input" in scalars:
        own["on_input"] = torch.tensor(scalars["on_input"] != 0)
    # 3. shapes against the layer
    try:
        check_module(
            algorithm,
            {p: tuple(t.shape) for p, t in own.items() if p != "on_input"},
            weight,
            bias,
            {"on_input": scalars.get("on_input", 0) != 0},
        )
        dora = _dora(tensors, weight, rules)
    except PartShapeError as error:
        raise _shape_error(path, group, error, weight) from None
    # 4. alpha and scale
    rank = ALGORITHMS[algorithm].rank(own)
    alpha, scale = _alpha_scale(group, scalars, rank, rules)
    return ModuleWeights(
        layer=layer,
        algorithm=algorithm,
        tensors=own,
        alpha=alpha,
        scale=scale,
        dora_scale=dora,
        keys=tuple(group.parts.values()),
    )


def _dora(tensors: Mapping[str, torch.Tensor], weight: Shape, rules: ScaleRules) -> Any:
    """The DoRA magnitude viewed as (1, in, 1...) or (out, 1, 1...), None without DoRA."""
    if "dora_scale" in tensors:
        value = tensors["dora_scale"]
        return value.reshape(dora_layout(tuple(value.shape), weight, rules.wd_on_output))
    if "magnitude" in tensors:  # PEFT: one norm per output row, whatever the shape says
        value = tensors["magnitude"]
        if value.numel() != weight[0] or len(weight) < 2:
            raise PartShapeError("magnitude", tuple(value.shape), f"({weight[0]},)")
        return value.reshape(weight[0], *([1] * (len(weight) - 1)))
    return None


def _alpha_scale(
    group: _Group, scalars: Mapping[str, float], rank: int | None, rules: ScaleRules
) -> tuple[float | None, float | None]:
    """(alpha, scale): the file's; PEFT alpha from the adapter config (else the rank);
    rs-LoRA's ``alpha / sqrt(rank)`` as the scale when asked for."""
    alpha, scale = scalars.get("alpha"), scalars.get("scale")
    rs_lora = rules.rs_lora
    if group.style in ("peft", "attn-procs"):
        config = rules.peft_config(group.layer.component)
        if alpha is None and config is not None:
            module = group.layer.module
            alpha = config.alpha_of((module, module.removeprefix("text_model.")))
        if alpha is None and rank is not None:
            alpha = float(rank)
        rs_lora = config.use_rslora if config is not None else False
    if scale is None and rs_lora and alpha is not None and rank:
        scale = alpha / math.sqrt(rank)
    return alpha, scale


def _nothing_matched(path: Path, shapes: Mapping[str, Shape]) -> str:
    keys = list(shapes)
    if any(key.startswith(("model.diffusion_model.", "first_stage_model.")) for key in keys):
        return (
            f"{path}: is a full model checkpoint, not a LoRA (it has model.diffusion_model.* keys)"
        )
    listed = ", ".join(repr(key)[:80] for key in keys[:_LISTED])
    return (
        f"{path}: no key matches a layer of this model ({len(keys)} keys: {listed or 'none'}); "
        "expected a LoRA file (kohya lora_unet_*/lora_te_*, diffusers unet./text_encoder. "
        "lora_A/lora_B, LyCORIS)"
    )
