"""``sdstack lora extract``: a kohya LoRA from two checkpoints, by SVD per module (kohya's
``extract_lora_from_models``).

For every layer a kohya LoRA covers, ``dW = tuned - base`` (float32) is viewed as a matrix
``[out, in * k * k]`` and truncated to rank ``r`` (``torch.linalg.svd``):

    up = U[:, :r] diag(S[:r]),   down = Vh[:r],   alpha = r   (scale alpha / r = 1)

so ``up @ down`` is the best rank-``r`` approximation of ``dW`` (Eckart-Young: its
Frobenius error is ``sqrt(sum of the dropped S_i^2)``). Then both factors are clamped to
``[-h, h]``, ``h`` the ``clamp_quantile`` (0.99) quantile of their absolute values, as
kohya does to cut outliers; :func:`quantile` computes it with ``kthvalue``, which, unlike
``torch.quantile``, works above 2^24 elements. ``r`` is capped by the matrix's sides.

Layers (kohya ``networks.lora`` targets): in the UNet every linear and conv layer of the
transformers (``attentions``: proj_in/out, attn1/attn2 q/k/v/out, ff); with
``conv_rank``, also those of the ResNet blocks and down/up samplers (3x3 convs get
``conv_rank``, linear and 1x1 layers ``rank``); in the text encoder q/k/v/out_proj and
fc1/fc2 of every layer. The text encoder is skipped when no ``|dW|`` there exceeds
``min_diff`` (0.01): the two models then share it, as kohya decides.

Both checkpoints are read lazily, one module at a time; only the factors are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError
from sdstack.lora.bake import architecture_key_map, check_output, context_width

ProgressCallback = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phases "text encoder", "unet" (modules), "writing"."""
CLAMP_QUANTILE = 0.99
MIN_DIFF = 0.01
_TEXT_TARGET = re.compile(r"\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_RESNET_PARTS = (".resnets.", ".downsamplers.", ".upsamplers.")
_TEXT_PREFIX, _TEXT_MODEL = "cond_stage_model.transformer.", "text_model."


class ExtractError(SdstackError):
    """An extraction that cannot run: a bad rank, the same file twice, shapes that differ."""


@dataclass(frozen=True)
class ExtractResult:
    """What :func:`extract_lora` wrote."""

    path: Path
    unet_modules: int
    text_modules: int
    text_encoder_skipped: bool
    text_encoder_max_diff: float | None
    notes: tuple[str, ...]


def check_rank(value: Any, what: str, *, optional: bool = False) -> int | None:
    """A whole number >= 1 (None passes when ``optional``).

    Raises:
        ExtractError: anything else, naming ``what``.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExtractError(f"{what} {value!r}: expected a whole number >= 1 (e.g. 32)")
    return value


def extract_layers(key_map: Any, conv: bool) -> list[tuple[Any, bool]]:
    """``(layer, uses_conv_rank)`` of the layers a kohya LoRA covers (module docstring)."""
    found = []
    for layer in key_map.layers:
        if layer.kind not in ("linear", "conv"):
            continue
        text = layer.component == "text_encoder" and _TEXT_TARGET.search(layer.module)
        if text or (layer.component == "unet" and ".attentions." in f".{layer.module}"):
            found.append((layer, False))
        elif layer.component == "unet" and conv and any(p in layer.module for p in _RESNET_PARTS):
            kernel = layer.shape("weight")[2:]
            found.append((layer, any(size > 1 for size in kernel)))
    return found


def quantile(values: Any, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation between the order statistics
    around ``q * (n - 1)``) computed with ``kthvalue``, so any number of elements works."""
    flat = values.reshape(-1)
    position = q * (flat.numel() - 1)
    low = math.floor(position)
    below = float(flat.kthvalue(low + 1).values)
    if position == low:
        return below
    above = float(flat.kthvalue(low + 2).values)
    return below + (above - below) * (position - low)


def low_rank(delta: Any, rank: int, clamp_quantile: float | None = CLAMP_QUANTILE) -> tuple:
    """``(up [out, r], down [r, in*k*k])``, ``r = min(rank, sides)``: the SVD truncation
    of ``delta`` (float32) with both factors clamped to the ``clamp_quantile`` quantile of
    their absolute values (None: no clamp)."""
    import torch

    matrix = delta.reshape(delta.shape[0], -1).float()
    r = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up, down = u[:, :r] * s[:r], vh[:r].clone()
    if clamp_quantile is not None:
        limit = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]).abs(), clamp_quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    return up.contiguous(), down.contiguous()


def extract_lora(
    tuned: str | Path,
    base: str | Path,
    output: str | Path,
    *,
    rank: int,
    conv_rank: int | None = None,
    clamp_quantile: float | None = CLAMP_QUANTILE,
    min_diff: float = MIN_DIFF,
    dtype: str = "fp32",
    device: str = "cpu",
    config_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ExtractResult:
    """Write the kohya LoRA of ``tuned - base`` (module docstring) to ``output``.

    Args:
        tuned, base: SD1.x single-file checkpoints of one architecture.
        output: the new ``.safetensors`` file.
        rank: rank of linear and 1x1 layers; conv_rank: of 3x3 convs (None: no ResNets).
        clamp_quantile: in (0, 1]; None or 1 leave the factors unclamped.
        min_diff: the text encoder is extracted only if some ``|dW|`` there exceeds it.
        dtype: "fp32", "fp16" or "bf16" for the factors; device: where the SVDs run.
        config_dir: diffusers configs of the architecture (default: packaged SD1.5).
        overwrite: replace an existing ``output`` (never an input).
        progress: ``progress(phase, done, total)``.

    Raises:
        ExtractError: bad rank/quantile, the same file twice, shapes that differ, weights
            that are not finite. BakeError: a bad output. CheckpointError: not SD1.x.
    """
    import torch

    from sdstack.models.assemble import resolve_device, resolve_dtype
    from sdstack.models.detect import check_sd1
    from sdstack.models.single_file import open_tensor_file

    # 1. Check the inputs.
    rank = check_rank(rank, "rank")
    conv_rank = check_rank(conv_rank, "conv rank", optional=True)
    clamp_quantile = _check_quantile(clamp_quantile)
    tuned, base = _checked_pair(Path(tuned), Path(base))
    output = check_output(output, [tuned, base], overwrite, "--out")
    out_dtype, torch_device = resolve_dtype(dtype), resolve_device(device)
    key_map = architecture_key_map(config_dir)
    layers = extract_layers(key_map, conv_rank is not None)
    # 2. One module at a time: dW, SVD, factors.
    with open_tensor_file(tuned) as tuned_file, open_tensor_file(base) as base_file:
        for path, source in ((tuned, tuned_file), (base, base_file)):
            check_sd1(path, source, context_width(key_map))
        pair = _Pair(tuned_file, base_file, torch_device)
        ranks = {False: rank, True: conv_rank or rank}
        with torch.no_grad():
            factors, largest = _factors(pair, layers, ranks, clamp_quantile, out_dtype, progress)
    # 3. The text encoder only if it differs, then the file.
    notes = []
    skipped = largest["text_encoder"] <= min_diff
    if skipped:
        notes.append(
            f"text encoder: max |tuned - base| is {largest['text_encoder']:.3g}, not above "
            f"{min_diff:g}; not extracted (the two models share it)"
        )
        factors["text_encoder"] = {}
    metadata = _metadata(tuned, base, output, rank, conv_rank, clamp_quantile, skipped)
    if progress is not None:
        progress("writing", 0, 1)
    _write(output, {**factors["text_encoder"], **factors["unet"]}, metadata, overwrite)
    return ExtractResult(
        output,
        len(factors["unet"]) // 3,
        len(factors["text_encoder"]) // 3,
        skipped,
        largest["text_encoder"],
        tuple(notes),
    )


def _factors(
    pair: _Pair,
    layers: list[tuple[Any, bool]],
    ranks: dict[bool, int],
    clamp: float | None,
    dtype: Any,
    progress: ProgressCallback | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """The kohya tensors by component, and the largest ``|dW|`` of each component."""
    factors: dict[str, dict[str, Any]] = {"text_encoder": {}, "unet": {}}
    largest = {"text_encoder": 0.0, "unet": 0.0}
    for part, phase in (("text_encoder", "text encoder"), ("unet", "unet")):
        chosen = [(layer, conv) for layer, conv in layers if layer.component == part]
        for index, (layer, conv) in enumerate(chosen):
            if progress is not None:
                progress(phase, index, len(chosen))
            delta = pair.delta(layer)
            largest[part] = max(largest[part], float(delta.abs().max()))
            up, down = low_rank(delta, ranks[conv], clamp)
            factors[part].update(_kohya_tensors(layer, up, down, dtype))
        if progress is not None:
            progress(phase, len(chosen), len(chosen))
    return factors, largest


def _check_quantile(value: float | None) -> float | None:
    if value is None or value == 1:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ExtractError(f"clamp quantile {value!r}: expected a number in (0, 1], e.g. 0.99")
    return float(value)


def _checked_pair(tuned: Path, base: Path) -> tuple[Path, Path]:
    import os

    for path, what in ((tuned, "TUNED"), (base, "BASE")):
        if not path.is_file():
            raise ExtractError(f"{path}: no such file; expected the {what} single-file checkpoint")
    if os.path.samefile(tuned, base):
        raise ExtractError(
            f"{tuned}: TUNED and BASE are the same file; expected two checkpoints to subtract"
        )
    return tuned, base


class _Pair:
    """The two checkpoints: ``delta(layer)`` = tuned - base of the layer's weight."""

    def __init__(self, tuned: Any, base: Any, device: Any) -> None:
        self.tuned, self.base, self.device = tuned, base, device

    def _key(self, source: Any, layer: Any) -> str:
        key = f"{layer.ldm}.weight"
        if key not in source and layer.component == "text_encoder":
            key = _TEXT_PREFIX + f"{layer.module.removeprefix(_TEXT_MODEL)}.weight"
        if key not in source:
            raise ExtractError(f"{source.path}: has no {layer.ldm}.weight; expected an SD1.x model")
        return key

    def delta(self, layer: Any) -> Any:
        import torch

        expected = layer.ldm_shape("weight")
        weights = []
        for source in (self.tuned, self.base):
            key = self._key(source, layer)
            if tuple(source[key]) != tuple(expected):
                raise ExtractError(
                    f"{source.path}: {key} has shape {list(source[key])}, expected "
                    f"{list(expected)}; both checkpoints must be of this architecture "
                    "(--config-dir for other sizes)"
                )
            weights.append(source.tensor(key).to(self.device, torch.float32))
        delta = (weights[0] - weights[1]).reshape(layer.shape("weight"))
        if not torch.isfinite(delta).all():
            raise ExtractError(f"{layer.ldm}.weight: not finite in one checkpoint (NaN or inf)")
        return delta


def _kohya_tensors(layer: Any, up: Any, down: Any, dtype: Any) -> dict[str, Any]:
    """kohya's three keys of one module: ``lora_down`` [r, in(, k, k)], ``lora_up``
    [out, r(, 1, 1)], ``alpha`` (0-d float32, = r)."""
    import torch

    shape = layer.shape("weight")
    r = down.shape[0]
    if len(shape) == 4:
        down = down.reshape(r, *shape[1:])
        up = up.reshape(shape[0], r, 1, 1)
    name = layer.kohya
    return {
        f"{name}.lora_down.weight": down.to("cpu", dtype).contiguous(),
        f"{name}.lora_up.weight": up.to("cpu", dtype).contiguous(),
        f"{name}.alpha": torch.tensor(float(r), dtype=torch.float32),
    }


def _metadata(
    tuned: Path,
    base: Path,
    output: Path,
    rank: int,
    conv_rank: int | None,
    clamp: float | None,
    skipped: bool,
) -> dict[str, str]:
    """kohya's metadata of an extracted LoRA, the SAI model-spec keys, and what was done."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": base.name,
        "ss_output_name": output.stem,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output.stem,
        "sdstack_extract": json.dumps(
            {
                "tuned": tuned.name,
                "base": base.name,
                "rank": rank,
                "conv_rank": conv_rank,
                "clamp_quantile": clamp,
                "text_encoder": "skipped" if skipped else "extracted",
            }
        ),
    }
    if conv_rank is not None:
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)}
        metadata["ss_network_args"] = json.dumps(args)
    return metadata


def _write(
    output: Path, tensors: dict[str, Any], metadata: dict[str, str], overwrite: bool
) -> None:
    """kohya's ``sshs_*`` hashes (of the file serialised with its ``ss_`` metadata only),
    then the file, written atomically."""
    from safetensors.torch import save, save_file

    from sdstack.atomic_files import temporary_file
    from sdstack.lora.bake import publish_output

    data = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    start = 8 + int.from_bytes(data[:8], "little")
    metadata["sshs_model_hash"] = hashlib.sha256(data[start:]).hexdigest()
    metadata["sshs_legacy_hash"] = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    with temporary_file(output.parent, suffix=".safetensors") as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
        publish_output(temporary, output, overwrite=overwrite)
