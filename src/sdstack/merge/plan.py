"""The merge of each output tensor, decided from the inputs' headers before anything is read.

Per key of A (sorted), the reference merger's rules (``modules/extras.py``), made explicit:

- a key the ``discard`` expression matches is left out;
- ``...position_ids``: ``int64`` ``0..n-1`` (never merged, never copied);
- ``first_stage_model.*`` with a baked VAE: the VAE file's tensor;
- a key without ``model`` in its name (``alphas_cumprod``...), or not floating point in A
  or B: A's tensor;
- the text encoder / VAE side ``"a"``: A's; ``"b"``: B's;
- a key B lacks: A's (reported); a 3-model method and a key C lacks: A's (the
  reference's "0 difference": ``A + a * 0``);
- else merged with the method in float32: the whole tensor, or, for A's 9/8-channel
  ``conv_in`` and a 4-channel B, only ``[:, 0:4]`` (the extra channels stay A's).

Keys only in B or C are dropped (reported). Every floating tensor is written in the
output dtype; other tensors keep their dtype.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

from sdstack.errors import SdstackWarning
from sdstack.merge import MergeError
from sdstack.merge.checks import (
    check_a,
    check_fits,
    conv_in_channels,
    find_key,
    is_position_ids,
    missing_from,
    only_in,
)
from sdstack.merge.reader import TensorSource
from sdstack.merge.settings import CheckedSettings
from sdstack.merge.vae_bake import same_vae_shape
from sdstack.models.detect import CONV_IN_KEY, name_list
from sdstack.models.key_map.ldm import VAE_PREFIX

MERGE, MERGE_4CH, FROM_A, FROM_B, FROM_VAE, POSITION_IDS = (
    "merge", "merge [:, 0:4]", "A", "B", "VAE", "position ids",
)  # fmt: skip
_TEXT_PARTS = ("cond_stage_model.",)
_WARNED = 4  # tensor names shown in a warning


@dataclass(frozen=True)
class KeyPlan:
    """What is written under ``key``: ``action`` (one of the constants above), the output
    shape and dtype, the key's spelling in B and C, and its alpha and beta."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    action: str
    b_key: str | None = None
    c_key: str | None = None
    alpha: float = 0.0
    beta: float = 0.0


@dataclass(frozen=True)
class MergeInputs:
    """The open inputs of a merge: A, B, optional C and a VAE file to bake."""

    a: TensorSource
    b: TensorSource
    c: TensorSource | None = None
    vae: TensorSource | None = None

    def sources(self) -> list[TensorSource]:
        """The inputs that are given, A first."""
        return [s for s in (self.a, self.b, self.c, self.vae) if s is not None]

    def close(self) -> None:
        """Close every input."""
        for source in self.sources():
            source.close()


@dataclass(frozen=True)
class MergePlan:
    """Every output tensor in file order, and what the rules left out or kept from A."""

    keys: tuple[KeyPlan, ...]
    conv_in_channels: int | None
    kept_from_a: tuple[str, ...]
    dropped: tuple[str, ...]
    discarded: tuple[str, ...]

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, shape) of each output tensor, for the file header."""
        return [(k.key, k.dtype, k.shape) for k in self.keys]

    def count(self, *actions: str) -> int:
        """How many output tensors have one of ``actions``."""
        return sum(k.action in actions for k in self.keys)


def check_inputs(inputs: MergeInputs, uses_c: bool) -> None:
    """Every input an SD1.x checkpoint with A's UNet and shapes (``checks``), before work.

    Raises:
        MergeError: the first input that does not fit, named, with a few tensors.
    """
    a = inputs.a
    check_a(a.name, a)
    check_fits(a.name, a, inputs.b.name, inputs.b)
    if uses_c and inputs.c is not None:
        check_fits(a.name, a, inputs.c.name, inputs.c, reference=inputs.b)
    if inputs.vae is not None:
        _check_vae(a, inputs.vae)


def _check_vae(a: TensorSource, vae: TensorSource) -> None:
    mine = {key: shape for key, shape in a.items() if key.startswith(VAE_PREFIX)}
    if not mine:
        return
    found = [f"{key} missing" for key in sorted(mine) if key not in vae]
    found += [
        f"{key} {list(vae[key])} (A: {list(mine[key])})"
        for key in sorted(mine)
        if key in vae and not same_vae_shape(mine[key], vae[key])
    ]
    found += [f"{key} not in A" for key in sorted(vae) if key not in mine]
    if found:
        raise MergeError(
            f"{vae.name}: does not fit the VAE of {a.name}; expected the same tensors and "
            f"shapes ({len(found)} differ: {name_list(found, 3, width=None)})"
        )


def _side(key: str, checked: CheckedSettings) -> str:
    if key.startswith(_TEXT_PARTS):
        return checked.settings.text_encoder
    if key.startswith(VAE_PREFIX):
        return checked.settings.vae_from
    return "merge"


def _multipliers(key: str, checked: CheckedSettings) -> tuple[float, float]:
    from sdstack.merge.blocks import alpha_of_key

    settings = checked.settings
    alpha = alpha_of_key(key, float(settings.alpha), checked.alpha_blocks)
    beta = alpha_of_key(key, float(settings.beta), checked.beta_blocks)
    return alpha, beta


def _written(stored: torch.dtype, checked: CheckedSettings) -> torch.dtype:
    """The output dtype of a tensor stored as ``stored``."""
    return checked.dtype if stored.is_floating_point else stored


def _key_plan(key: str, inputs: MergeInputs, checked: CheckedSettings, uses_c: bool) -> KeyPlan:
    """The plan of one of A's keys (module docstring), discard aside."""
    a, b, c = inputs.a, inputs.b, inputs.c
    shape, stored = tuple(a[key]), a.dtype(key)
    out = _written(stored, checked)
    if is_position_ids(key):
        return KeyPlan(key, shape, torch.int64, POSITION_IDS)
    if inputs.vae is not None and key.startswith(VAE_PREFIX):
        return KeyPlan(key, shape, _written(inputs.vae.dtype(key), checked), FROM_VAE)
    b_key = find_key(b, key)
    side = _side(key, checked)
    if side == "b" and b_key is not None:
        return KeyPlan(key, shape, _written(b.dtype(b_key), checked), FROM_B, b_key)
    floating = stored.is_floating_point and b_key is not None and b.dtype(b_key).is_floating_point
    if side == "a" or "model" not in key or not floating:
        return KeyPlan(key, shape, out, FROM_A)
    c_key = find_key(c, key) if uses_c and c is not None else None
    if uses_c and (c_key is None or not c.dtype(c_key).is_floating_point):
        return KeyPlan(key, shape, out, FROM_A)
    alpha, beta = _multipliers(key, checked)
    action = MERGE_4CH if key == CONV_IN_KEY and tuple(b[b_key]) != shape else MERGE
    return KeyPlan(key, shape, out, action, b_key, c_key, alpha, beta)


def plan_merge(inputs: MergeInputs, checked: CheckedSettings) -> MergePlan:
    """The :class:`MergePlan` of ``inputs``, after :func:`check_inputs`; warns (once per
    kind) about A's tensors that B or C lack and about tensors only in B or C.

    Raises:
        MergeError: as :func:`check_inputs`; block values for a key in no block.
    """
    uses_c = checked.method.inputs == 3
    check_inputs(inputs, uses_c)
    pattern: re.Pattern[str] | None = checked.discard
    keys = sorted(inputs.a)
    if inputs.vae is not None and not any(key.startswith(VAE_PREFIX) for key in keys):
        keys = sorted([*keys, *inputs.vae])  # bake into a model that has no VAE
    plans, discarded = [], []
    for key in keys:
        if pattern is not None and pattern.search(key):
            discarded.append(key)
        elif key in inputs.a:
            plans.append(_key_plan(key, inputs, checked, uses_c))
        else:
            dtype = _written(inputs.vae.dtype(key), checked)
            plans.append(KeyPlan(key, tuple(inputs.vae[key]), dtype, FROM_VAE))
    kept, dropped = _report(inputs, uses_c, checked)
    channels = conv_in_channels(inputs.a)
    return MergePlan(tuple(plans), channels, tuple(kept), tuple(dropped), tuple(discarded))


def _report(inputs: MergeInputs, uses_c: bool, checked: CheckedSettings) -> tuple[list, list]:
    """Warn about A's tensors B (or C) lacks and tensors only in B (or C)."""
    others = [inputs.b, *([inputs.c] if uses_c and inputs.c is not None else [])]
    kept, dropped = [], []
    for other in others:
        missing = [k for k in missing_from(inputs.a, other) if _side(k, checked) != "a"]
        if inputs.vae is not None:
            missing = [k for k in missing if not k.startswith(VAE_PREFIX)]
        extra = only_in(other, inputs.a)
        if missing:
            warnings.warn(
                f"{other.name}: lacks {len(missing)} of A's tensors (e.g. "
                f"{name_list(missing, _WARNED, width=None)}); A's values are kept for them",
                SdstackWarning,
                stacklevel=3,
            )
        if extra:
            warnings.warn(
                f"{other.name}: {len(extra)} tensors that A does not have are left out (e.g. "
                f"{name_list(extra, _WARNED, width=None)})",
                SdstackWarning,
                stacklevel=3,
            )
        kept += [k for k in missing if k not in kept]
        dropped += extra
    return kept, dropped
