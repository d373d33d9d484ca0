"""``sdstack lora bake``: LoRAs merged into a single-file SD1 checkpoint, one tensor at a time.

For every tensor of the checkpoint (LDM names), the key map gives its layer; a layer that
some LoRA module changes is written as

    W = cast(W0 + sum_i s_i * dW_i)          (float32, ``patch_sum.layer_writers``)

with ``s_i = multiplier * lbw[block]`` and ``dW_i = module_delta(module, originals)``: the
patches ``lora.stack.lora_patches`` makes, summed as the model patcher sums them, so a
baked file loads to the same weights as ``set_loras`` on the loaded model. ``cast`` is to
the tensor's own dtype, or ``dtype`` for every floating tensor. Other tensors are copied.

The output is streamed: the header is computed from the input's shapes and dtypes, then
each tensor is read (memory-mapped), patched and written, so memory stays about one
tensor (plus the LoRA files). It is written beside the target under a temporary name and
renamed into place at the end; an input is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError

ProgressCallback = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phases "reading LoRAs" (files) and "baking" (tensors)."""
BAKED_METADATA_KEY = "sdstack_baked_loras"
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "complex64": "C64",
    "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}  # fmt: skip
_TEXT_PREFIX = "cond_stage_model.transformer."
_TEXT_MODEL = _TEXT_PREFIX + "text_model."


class BakeError(SdstackError):
    """A bake that cannot run: a bad output path, a model that is not a single file."""


@dataclass(frozen=True)
class BakeResult:
    """What :func:`bake_loras` wrote."""

    path: Path
    tensors: int
    layers_patched: int
    loras: tuple[str, ...]


def publish_output(temporary: Path, path: Path, *, overwrite: bool) -> None:
    """Move the finished ``temporary`` to ``path``: over it with ``overwrite``, else only
    if ``path`` still does not exist (claimed atomically).

    Raises:
        BakeError: ``path`` appeared since it was checked (and ``overwrite`` is off).
    """
    from sdstack.atomic_files import publish_new, replace

    if overwrite:
        replace(temporary, path)
        return
    try:
        publish_new(temporary, path)
    except FileExistsError:
        raise BakeError(f"{path}: was created meanwhile; nothing overwritten") from None


def check_output(output: str | Path, inputs: Iterable[Path], overwrite: bool, what: str) -> Path:
    """``output`` as a new ``.safetensors`` path that is none of ``inputs``.

    Raises:
        BakeError: another suffix, a folder, an input file (whatever ``overwrite`` says),
            or an existing file without ``overwrite``.
    """
    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise BakeError(f"{what} {output}: expected a .safetensors file name")
    if output.is_dir():
        raise BakeError(f"{what} {output}: is a folder; expected a .safetensors file name")
    if output.exists():
        for source in inputs:
            if source.exists() and os.path.samefile(output, source):
                raise BakeError(
                    f"{what} {output}: is an input file ({source}); write to a new file name"
                )
        if not overwrite:
            raise BakeError(
                f"{what} {output}: file exists; choose a new name (or allow overwriting it)"
            )
    return output


def architecture_key_map(config_dir: str | Path | None = None) -> Any:
    """The key map of a single-file checkpoint's architecture: packaged SD1.5, or the
    configs of ``config_dir`` (``load_model``'s ``config_dir``), built on the meta device."""
    from sdstack.models.key_map import key_map_of_configs, sd1_key_map

    if config_dir is None:
        return sd1_key_map()
    from sdstack.models.loading import model_configs
    from sdstack.models.text_encoder import sd15_text_config

    configs = model_configs(config_dir)
    return key_map_of_configs(configs.unet, configs.vae, configs.text or sd15_text_config())


def read_active_loras(
    loras: Sequence[Any], key_map: Any, library: Any, progress: ProgressCallback | None
) -> list[Any]:
    """Each stack entry found and read for ``key_map`` (``ActiveLora``), unmatched keys
    warned once per file."""
    from sdstack.lora.formats import read_lora
    from sdstack.lora.spec import specs_from_entries
    from sdstack.lora.stack import ActiveLora, warn_unmatched
    from sdstack.models.library import lora_sha256

    specs = specs_from_entries(loras)
    active = []
    for index, spec in enumerate(specs):
        if progress is not None:
            progress("reading LoRAs", index, len(specs))
        path = library.find(spec.name)
        file = read_lora(path, key_map)
        warn_unmatched(file, "baked")
        active.append(ActiveLora(spec, path, file, lora_sha256(path)))
    if progress is not None:
        progress("reading LoRAs", len(specs), len(specs))
    return active


def bake_loras(
    model: str | Path,
    loras: Sequence[Any],
    output: str | Path,
    *,
    config_dir: str | Path | None = None,
    dtype: str | None = None,
    library: Any = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> BakeResult:
    """Merge ``loras`` into the single-file checkpoint ``model``, written to ``output``.

    Args:
        model: an SD1.x single-file checkpoint (``.safetensors``, ``.ckpt``...).
        loras: stack entries as ``set_loras`` takes them: ``(file_or_name, w)``,
            ``(file_or_name, te_w, unet_w)``, a name or path, or ``LoraSpec``.
        output: the new ``.safetensors`` file.
        config_dir: diffusers configs of the architecture (default: packaged SD1.5).
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` for every floating tensor (None: keep).
        library: a ``LoraLibrary`` for names (default: files only).
        overwrite: replace an existing ``output`` (never an input).
        progress: ``progress(phase, done, total)``.

    Raises:
        BakeError: a bad output; CheckpointError: not an SD1.x single file;
            LoraFileError, ForeignLoraError, LoraNotFoundError: a LoRA that cannot be used.
    """
    import torch

    from sdstack.lora.library import LoraLibrary
    from sdstack.lora.stack import lora_patches
    from sdstack.models.assemble import resolve_dtype
    from sdstack.models.detect import check_sd1
    from sdstack.models.single_file import open_tensor_file

    # 1. Check the inputs and the output.
    model = _checked_model(model)
    out_dtype = None if dtype is None else resolve_dtype(dtype)
    key_map = architecture_key_map(config_dir)
    library = library if library is not None else LoraLibrary()
    active = read_active_loras(loras, key_map, library, progress)
    output = check_output(output, [model, *(a.path for a in active)], overwrite, "--out")
    # 2. The patches of every LoRA, by the LDM module of their layer.
    by_module: dict[str, list[Any]] = {}
    for lora in active:
        for patch in lora_patches(lora):
            by_module.setdefault(key_map[patch.layer].ldm, []).append(patch)
    # 3. Stream the checkpoint through the patches into the new file.
    with open_tensor_file(model) as source, torch.no_grad():
        check_sd1(model, source, context_width(key_map))
        dtypes = _stored_dtypes(source)
        names = sorted(source)
        _check_covered(model, by_module, key_map, set(names))
        baker = _Baker(source, key_map, by_module, out_dtype)
        entries = [(key, _out_dtype(dtypes[key], out_dtype), source[key]) for key in names]
        tensors = (baker.tensor(key) for key in names)
        metadata = {"format": "pt", BAKED_METADATA_KEY: _baked_note(model, active)}
        write_safetensors(
            output, entries, tensors, metadata, overwrite=overwrite, progress=progress
        )
    return BakeResult(output, len(names), baker.layers, tuple(a.name for a in active))


def _checked_model(model: str | Path) -> Path:
    path = Path(model)
    if path.is_dir():
        raise BakeError(f"{path}: is a folder; expected a single-file checkpoint (.safetensors)")
    if not path.is_file():
        raise BakeError(f"{path}: no such file; expected a single-file SD1.x checkpoint")
    return path


def context_width(key_map: Any) -> int:
    """The UNet cross-attention context width of the architecture (768 on SD1.x)."""
    for layer in key_map.component("unet"):
        if layer.module.endswith("attn2.to_k"):
            return layer.shape("weight")[1]
    return 768


def _stored_dtypes(source: Any) -> dict[str, Any]:
    """Each tensor's torch dtype, from the header (safetensors) or the loaded pickle.

    Raises:
        BakeError: a dtype the output cannot hold (named with its tensor).
    """
    import torch

    if source.path.suffix.lower() == ".safetensors":
        from sdstack.models.safetensors_header import check_safetensors_layout

        by_code = {code: name for name, code in _SAFETENSORS_DTYPES.items()}
        entries, _ = check_safetensors_layout(source.path)
        names = {key: by_code.get(entry.dtype, entry.dtype) for key, entry in entries.items()}
    else:
        names = {key: str(source.tensor(key).dtype).removeprefix("torch.") for key in source}
    for key, name in names.items():
        if name not in _SAFETENSORS_DTYPES or not hasattr(torch, name):
            raise BakeError(
                f"{source.path}: tensor {key!r:.100} is {name}; expected one of "
                f"{', '.join(_SAFETENSORS_DTYPES)}"
            )
    return {key: getattr(torch, name) for key, name in names.items()}


def _out_dtype(stored: Any, wanted: Any) -> Any:
    return wanted if wanted is not None and stored.is_floating_point else stored


def _ldm_module(key: str) -> tuple[str, str]:
    """(LDM module, leaf) of a checkpoint key, the text encoder spelled with text_model."""
    module, _, leaf = key.rpartition(".")
    if module.startswith(_TEXT_PREFIX) and not module.startswith(_TEXT_MODEL):
        module = _TEXT_MODEL + module[len(_TEXT_PREFIX) :]
    return module, leaf


def _check_covered(model: Path, by_module: dict, key_map: Any, names: set[str]) -> None:
    present = {_ldm_module(key) for key in names}
    for module in by_module:
        layer = key_map.find(module)
        missing = [leaf for leaf in layer.param_names if (module, leaf) not in present]
        if missing:
            raise BakeError(
                f"{model}: has no {module}.{missing[0]} for the LoRA layer {layer.key}; "
                "expected a complete SD1.x checkpoint"
            )


class _Baker:
    """Patched tensors, one layer at a time: the layer's other parameters are kept until
    written (weight and bias are neighbours in sorted key order)."""

    def __init__(self, source: Any, key_map: Any, by_module: dict, out_dtype: Any) -> None:
        self.source, self.key_map, self.by_module = source, key_map, by_module
        self.out_dtype = out_dtype
        self.pending: dict[str, Any] = {}
        self.layers = 0

    def tensor(self, key: str) -> Any:
        """The tensor to write under ``key``."""
        if key in self.pending:
            return self.pending.pop(key)
        module, leaf = _ldm_module(key)
        if module not in self.by_module:
            stored = self.source.tensor(key)
            keep = self.out_dtype is None or not stored.is_floating_point()
            return stored if keep else stored.to(self.out_dtype)
        prefix = key[: len(key) - len(leaf)]  # the file's own spelling of the module
        patched = self._patch_layer(prefix, module)
        self.layers += 1
        result = patched.pop(leaf)
        self.pending.update({prefix + other: tensor for other, tensor in patched.items()})
        return result

    def _patch_layer(self, prefix: str, module: str) -> dict[str, Any]:
        """Every parameter of the layer by leaf, summed as the patcher sums it
        (``patch_sum.layer_writers``: the same bits as applying the LoRAs)."""
        import torch

        from sdstack.models.patch_sum import DeltaCache, PatchStats, layer_writers

        layer = self.key_map.find(module)
        stored = {leaf: self.source.tensor(prefix + leaf) for leaf in layer.param_names}
        originals = {leaf: t.reshape(layer.shape(leaf)) for leaf, t in stored.items()}
        patches = self.by_module[module]
        writers = layer_writers(layer.key, patches, originals, DeltaCache(0), PatchStats())
        patched = {}
        for leaf, tensor in stored.items():
            dtype = self.out_dtype if self.out_dtype is not None else tensor.dtype
            if leaf not in writers:
                patched[leaf] = tensor.to(dtype)
                continue
            values = torch.empty(layer.shape(leaf), dtype=dtype)
            writers[leaf](values)
            patched[leaf] = values.reshape(tensor.shape)
        return patched


def _baked_note(model: Path, active: Sequence[Any]) -> str:
    """JSON of what was baked: the base file and each LoRA's name, hash and multipliers."""
    loras = []
    for lora in active:
        spec = lora.spec
        entry = {"name": lora.name, "hash": lora.short_hash, "te": spec.te}
        entry["unet"] = spec.unet_multiplier
        loras.append({**entry, "lbw": spec.lbw_text} if spec.lbw_text else entry)
    return json.dumps({"model": model.name, "loras": loras})


def write_safetensors(
    path: Path,
    entries: Sequence[tuple[str, Any, tuple[int, ...]]],
    tensors: Iterable[Any],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> None:
    """A ``.safetensors`` file streamed tensor by tensor, written atomically.

    ``entries`` are (key, torch dtype, shape) in file order; ``tensors`` yields them in
    that order. The header (8-byte little-endian length, then JSON padded with spaces to a
    multiple of 8) is written first, then each tensor's bytes. The file is renamed into
    place at the end: over an existing ``path`` only with ``overwrite``.

    Raises:
        BakeError: ``path`` appeared meanwhile (without ``overwrite``).
    """
    from sdstack.atomic_files import temporary_file
    from sdstack.models.patcher import tensor_bytes

    encoded = _header_bytes(entries, metadata)
    with temporary_file(path.parent, suffix=".safetensors") as temporary:
        with temporary.open("wb") as file:
            file.write(len(encoded).to_bytes(8, "little") + encoded)
            for index, (entry, tensor) in enumerate(zip(entries, tensors, strict=True)):
                key, dtype, shape = entry
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise BakeError(
                        f"{path}: tensor {key}: {tensor.dtype} {tuple(tensor.shape)}; expected "
                        f"{dtype} {tuple(shape)} (internal check)"
                    )
                file.write(tensor_bytes(tensor))
                if progress is not None:
                    progress("baking", index + 1, len(entries))
        publish_output(temporary, path, overwrite=overwrite)


def _header_bytes(entries: Sequence[tuple[str, Any, tuple[int, ...]]], metadata: dict) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return encoded + b" " * (-len(encoded) % 8)
