"""What a merge is asked to do (:class:`MergeSettings`) and its check, before any file is read.

Sides: ``text_encoder`` applies to ``cond_stage_model.*`` tensors and ``vae_from`` to
``first_stage_model.*``: ``"merge"`` merges them with the method like the UNet, ``"a"``
copies A's, ``"b"`` copies B's (A's where B has none). ``vae`` (a VAE file) replaces the
``first_stage_model.*`` tensors instead, so it cannot be combined with ``vae_from``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdstack.merge import MergeError

DTYPES = ("fp16", "bf16", "fp32")
SIDES = ("merge", "a", "b")


@dataclass(frozen=True)
class MergeSettings:
    """A merge: method, multipliers, output dtype, VAE, discarded keys, sides, options.

    Attributes:
        method: a registered merge method (``MERGE_METHODS``) by name or reference label.
        alpha, beta: the multipliers (beta only for the methods that use it).
        alpha_blocks, beta_blocks: 26 block values (BASE, IN00..IN11, M00, OUT00..OUT11)
            that replace alpha / beta per key (``merge.blocks.alpha_of_key``).
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"``: the output dtype of every floating
            tensor; the merge itself computes in float32.
        vae: a VAE file baked in as ``first_stage_model.*``.
        discard: a regular expression; keys it matches (``re.search``) are left out.
        text_encoder, vae_from: ``"merge"``, ``"a"`` or ``"b"`` (module docstring).
        options: method options (``merge.methods.resolve_options``): ties ``density``;
            dare ``drop``, ``seed``, ``ties``, ``density``.
    """

    method: str = "weighted-sum"
    alpha: float = 0.5
    beta: float = 0.0
    alpha_blocks: tuple[float, ...] | None = None
    beta_blocks: tuple[float, ...] | None = None
    dtype: str = "fp16"
    vae: Path | None = None
    discard: str | None = None
    text_encoder: str = "merge"
    vae_from: str = "merge"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckedSettings:
    """:class:`MergeSettings` resolved: the method, its full options, the torch dtype."""

    settings: MergeSettings
    method: Any
    options: dict[str, Any]
    dtype: Any
    discard: re.Pattern[str] | None
    alpha_blocks: tuple[float, ...] | None
    beta_blocks: tuple[float, ...] | None


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeError(f"{name}: {value!r}; expected a finite number")
    return float(value)


def _check_models(method: Any, models: int) -> None:
    if method.inputs == 3 and models == 2:
        raise MergeError(
            f"merge method {method.name!r} ({method.formula}) needs three models A, B, C; "
            "got two: give C"
        )
    if method.inputs == 2 and models == 3:
        raise MergeError(
            f"merge method {method.name!r} ({method.formula}) merges two models A and B; "
            "got a third (C), which it would not use"
        )


def _check_sides(settings: MergeSettings) -> None:
    for name in ("text_encoder", "vae_from"):
        value = getattr(settings, name)
        if value not in SIDES:
            raise MergeError(f"{name}: {value!r}; expected one of {', '.join(SIDES)}")
    if settings.vae is not None and settings.vae_from != "merge":
        raise MergeError(
            f"vae_from {settings.vae_from!r} and vae {str(settings.vae)!r}: both choose the "
            "VAE; give one of them"
        )


def _discard(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None or pattern == "":
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise MergeError(f"discard {pattern!r}: not a regular expression ({error})") from error


def check_settings(settings: MergeSettings, models: int) -> CheckedSettings:
    """Check ``settings`` for a merge of ``models`` (2 or 3) inputs.

    Raises:
        UnknownMergeMethodError: an unknown method (with the nearest names).
        MergeError: A B C count wrong for the method, beta (or beta blocks) for a method
            without beta, a multiplier that is not finite, bad block values, dtype, side,
            regular expression or option; ``vae`` together with ``vae_from``.
    """
    import torch

    from sdstack.merge.blocks import check_merge_blocks
    from sdstack.merge.methods import MERGE_METHODS, resolve_options

    method = MERGE_METHODS.get(settings.method)
    _check_models(method, models)
    _finite("alpha", settings.alpha)
    if _finite("beta", settings.beta) != 0 and not method.uses_beta:
        raise MergeError(f"beta {settings.beta!r}: merge method {method.name!r} has no beta")
    if settings.beta_blocks is not None and not method.uses_beta:
        raise MergeError(f"beta blocks: merge method {method.name!r} has no beta")
    alpha_blocks = beta_blocks = None
    if settings.alpha_blocks is not None:
        alpha_blocks = check_merge_blocks(settings.alpha_blocks, "alpha blocks")
    if settings.beta_blocks is not None:
        beta_blocks = check_merge_blocks(settings.beta_blocks, "beta blocks")
    if settings.dtype not in DTYPES:
        raise MergeError(f"dtype {settings.dtype!r}: expected one of {', '.join(DTYPES)}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    _check_sides(settings)
    options = resolve_options(method, settings.options)
    return CheckedSettings(
        settings,
        method,
        options,
        dtype[settings.dtype],
        _discard(settings.discard),
        alpha_blocks,
        beta_blocks,
    )
