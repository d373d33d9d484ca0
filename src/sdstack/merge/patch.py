"""Merges as patches: ``--model "merge:A,B,alpha=0.3"`` builds the merged weights on load.

A merge whose result is linear in its multiplier is a patch of A (``sdstack.models.patcher``,
owner ``"merge"``), per layer:

    weighted-sum      W = A + a (B - A)        (= (1 - a) A + a B)
    add-difference    W = A + a (B - C)

with ``a`` the block value of the layer's merge block when ``blocks=`` is given
(``merge.blocks.alpha_of_key``; BASE for the text encoder and the VAE). So a grid can
re-weight a merge cell by cell through the patcher, without writing or reloading a model,
and LoRAs apply on top. The weights equal those of ``sdstack merge`` within float32
rounding (the patch sums ``A + a * (B - A)``, the merge ``(1 - a) A + a B``). Other methods
(TIES, DARE, slerp, train difference) are not linear in ``a``: write them with
``sdstack merge``.

Spec syntax: ``merge:A,B[,C][,alpha=X][,method=NAME][,blocks=PRESET or 26 values]``;
``blocks=`` comes last (its values are comma-separated). A, B, C are files, or names under
``--root``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackError

MERGE_PREFIX = "merge:"
MERGE_OWNER = "merge"
PATCH_METHODS = ("weighted-sum", "add-difference")


class MergeSpecError(SdstackError):
    """A ``merge:`` model spec that cannot be read or applied as patches."""


@dataclass(frozen=True)
class MergeSpec:
    """A merge to apply as patches: the models and how to weigh them."""

    a: str
    b: str
    c: str | None = None
    method: str = "weighted-sum"
    alpha: float = 0.5
    blocks: tuple[float, ...] | None = None
    blocks_text: str | None = None

    @property
    def base(self) -> tuple[str, str, str | None, str]:
        """What must be loaded (the same for every alpha and block weights)."""
        return (self.a, self.b, self.c, self.method)

    def text(self) -> str:
        """The spec as written: ``merge:A,B,alpha=0.3`` (``parse_merge_spec`` reads it back)."""
        items = [self.a, self.b] + ([self.c] if self.c else [])
        items.append(f"alpha={self.alpha:g}")
        if self.method != "weighted-sum":
            items.append(f"method={self.method}")
        if self.blocks_text is not None:
            items.append(f"blocks={self.blocks_text}")
        return MERGE_PREFIX + ",".join(items)

    def with_files(self, resolve: Callable[[str], str]) -> MergeSpec:
        """The spec with A, B, C replaced by ``resolve(name)`` (paths under a root)."""
        c = resolve(self.c) if self.c else None
        return dataclasses.replace(self, a=resolve(self.a), b=resolve(self.b), c=c)


def is_merge_spec(model: Any) -> bool:
    return isinstance(model, str) and model.startswith(MERGE_PREFIX)


def parse_merge_spec(text: str) -> MergeSpec:
    """``merge:A,B[,C][,alpha=X][,method=NAME][,blocks=...]`` -> MergeSpec (torch-free).

    Raises:
        MergeSpecError: not ``merge:``, fewer than two models, more than three, an unknown
            option, a method that is not linear in alpha, a bad alpha or blocks value.
    """
    from sdstack.merge.blocks import parse_merge_blocks
    from sdstack.merge.methods import MERGE_METHODS

    if not is_merge_spec(text):
        raise MergeSpecError(f"model {text!r}: a merge is written merge:A,B[,C][,alpha=X]")
    body, blocks_text = text[len(MERGE_PREFIX) :], None
    if ",blocks=" in body:
        body, blocks_text = body.split(",blocks=", 1)
    items = [item.strip() for item in body.split(",")]
    models = [item for item in items if "=" not in item]
    options = dict(item.split("=", 1) for item in items if "=" in item)
    where = f"--model {text!r}"
    if not 2 <= len(models) <= 3 or not all(models):
        raise MergeSpecError(f"{where}: expected 2 or 3 models, merge:A,B[,C][,alpha=X]")
    unknown = set(options) - {"alpha", "method"}
    if unknown:
        raise MergeSpecError(
            f"{where}: unknown option {sorted(unknown)[0]!r}; expected alpha=, method=, blocks="
        )
    method = MERGE_METHODS[options.get("method", "weighted-sum")].name
    if method not in PATCH_METHODS:
        raise MergeSpecError(
            f"{where}: {method} is not linear in alpha, so it cannot be applied as patches; "
            f"use {' or '.join(PATCH_METHODS)}, or write the model with `sdstack merge`"
        )
    needed = 3 if method == "add-difference" else 2
    if len(models) != needed:
        raise MergeSpecError(f"{where}: {method} takes {needed} models, got {len(models)}")
    alpha = _alpha(options.get("alpha", "0.5"), where)
    blocks = parse_merge_blocks(blocks_text) if blocks_text is not None else None
    c = models[2] if needed == 3 else None
    return MergeSpec(models[0], models[1], c, method, alpha, blocks, blocks_text)


def _alpha(text: str, where: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or abs(value) > 100:
        raise MergeSpecError(f"{where}: alpha={text!r}; expected a number (e.g. alpha=0.3)")
    return value


def apply_merge(components: Any, spec: MergeSpec) -> Any:
    """Make ``components`` (model A, loaded) carry ``spec`` as patches (owner ``"merge"``),
    replacing a merge applied before; LoRAs stay on top. Returns the patcher's stats.

    Every floating parameter of the key map's layers that B (and C) hold with the same
    shape is patched; a 9-channel ``conv_in`` with a 4-channel B takes the difference on
    its first 4 input channels only, as the reference merges it.

    Raises:
        MergeSpecError: B or C is not an SD1 checkpoint of A's shapes (a few keys named).
    """
    from sdstack.merge.blocks import alpha_of_key
    from sdstack.models.patcher import Patch, patcher_of

    patcher = patcher_of(components)
    files = _open_files(patcher, spec)
    patches, matched, source = [], 0, _source(spec)
    for layer in patcher.key_map.layers:
        recipe = _layer_recipe(layer, files, spec)
        if recipe is None:
            continue
        matched += 1
        strength = alpha_of_key(layer.ldm + ".weight", spec.alpha, spec.blocks)
        if strength != 0:
            patches.append(Patch(layer.key, source, strength, recipe))
    if not matched:
        raise MergeSpecError(f"{spec.b}: holds no tensor of {spec.a}'s layers; nothing to merge")
    return patcher.apply(patches, owner=MERGE_OWNER)


def remove_merge(components: Any) -> None:
    """Take a merge applied by :func:`apply_merge` off (LoRAs stay)."""
    patcher = getattr(components, "patcher", None)
    if patcher is not None:
        patcher.apply([], owner=MERGE_OWNER)


def load_merged(spec: MergeSpec | str, **load_options: Any) -> Any:
    """``load_model(A, **load_options)``, then :func:`apply_merge`; the model's ``name`` is
    the spec (what the infotext writes as ``Model``), its ``path`` None."""
    from sdstack.models import load_model

    spec = parse_merge_spec(spec) if isinstance(spec, str) else spec
    components = load_model(spec.a, **load_options)
    apply_merge(components, spec)
    components.name, components.path = spec.text(), None
    return components


def _source(spec: MergeSpec) -> str:
    """The deltas' identity for the patcher's cache: the files and the method."""
    parts = [spec.method]
    for name in (spec.b, spec.c):
        if name is not None:
            stat = os.stat(name)
            parts.append(f"{os.path.realpath(name)}:{stat.st_size}:{stat.st_mtime_ns}")
    return "merge:" + "|".join(parts)


def _open_files(patcher: Any, spec: MergeSpec) -> dict[str, Any]:
    """B (and C) opened once per patcher and kept open (recipes read them on a cache miss)."""
    from sdstack.models.single_file import open_tensor_file

    kept = patcher.__dict__.setdefault("merge_files", {})
    files = {}
    for role, name in (("b", spec.b), ("c", spec.c)):
        if name is None:
            continue
        key = os.path.realpath(name)
        if key not in kept:
            kept[key] = open_tensor_file(Path(name))
        files[role] = kept[key]
    return files


def _layer_recipe(layer: Any, files: dict[str, Any], spec: MergeSpec) -> Any:
    """The delta recipe of one layer, or None when B (or C) lacks a tensor of it."""
    names = {}
    for leaf, _shape in layer.params:
        key = f"{layer.ldm}.{leaf}"
        if all(key in file for file in files.values()):
            names[leaf] = key
    if not names:
        return None

    def recipe(originals: Any) -> dict[str, Any]:
        deltas = {}
        for leaf, key in names.items():
            w0 = originals[leaf]
            b = _fitted(files["b"].tensor(key), w0, key, spec.b)
            if spec.method == "weighted-sum":
                other = w0
            else:
                other = _fitted(files["c"].tensor(key), w0, key, str(spec.c))
            deltas[leaf] = b - other
        return deltas

    return recipe


def _fitted(tensor: Any, w0: Any, key: str, name: str) -> Any:
    """``tensor`` in float32 and ``W0``'s shape; a 4-channel conv_in on a 9/8-channel
    model fills the first 4 input channels and leaves the rest as ``W0`` (no change)."""
    import torch

    value = tensor.to(torch.float32)
    if value.numel() == w0.numel():
        return value.reshape(w0.shape)
    fewer_channels = value.ndim == w0.ndim == 4 and value.shape[1] < w0.shape[1]
    if fewer_channels and value.shape[0] == w0.shape[0] and value.shape[2:] == w0.shape[2:]:
        full = w0.clone()
        full[:, : value.shape[1]] = value
        return full
    raise MergeSpecError(
        f"{name}: {key} has shape {tuple(tensor.shape)}; model A's is {tuple(w0.shape)} "
        "(not the same architecture)"
    )


def set_merge_alpha(job: Any, value: float) -> Any:
    """``job`` with its ``merge:`` model's alpha set to ``value`` (the grid's merge-alpha).

    Raises:
        MergeSpecError: the job's model is not a ``merge:`` spec.
    """
    spec = _job_merge(job, "merge-alpha")
    return dataclasses.replace(job, model=dataclasses.replace(spec, alpha=float(value)).text())


def set_merge_blocks(job: Any, value: str) -> Any:
    """``job`` with its ``merge:`` model's block weights set to ``value`` (a preset or 26
    values; the grid's merge-blocks)."""
    from sdstack.merge.blocks import parse_merge_blocks

    spec = _job_merge(job, "merge-blocks")
    blocks = parse_merge_blocks(value)
    merged = dataclasses.replace(spec, blocks=blocks, blocks_text=value)
    return dataclasses.replace(job, model=merged.text())


def _job_merge(job: Any, axis: str) -> MergeSpec:
    if not is_merge_spec(job.model):
        raise MergeSpecError(
            f"the {axis} axis re-weights a merge: give --model merge:A,B[,alpha=X] "
            f"(the model is {job.model!r})"
        )
    return parse_merge_spec(job.model)
