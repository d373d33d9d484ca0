"""What a merge checks before it writes anything: architectures, shapes, conv_in channels.

Rules (the reference UI's merger, made strict where it would crash or allocate blindly):

- Every input must be an SD1.x checkpoint (``detect.detect_kind``): text-to-image,
  inpainting (9-channel ``conv_in``) or instruct-pix2pix (8-channel). An SDXL or SD 2.x
  file, a LoRA or a VAE is refused, naming the file, what it looks like and a few
  tensors that do not match A.
- B and C must have A's UNet: the same ``model.diffusion_model.*`` names and shapes.
  Text-encoder and VAE tensors they share with A must have A's shapes; those they lack
  keep A's values (a warning says how many). Tensors only in B or C are dropped.
- ``conv_in`` (``input_blocks.0.0.weight``): A with 9 (inpainting) or 8
  (instruct-pix2pix) input channels and B with 4: only ``[:, 0:4]`` is merged, the extra
  channels keep A's values. The opposite order is an error (the reference's too).
- The text encoder may be spelled with or without ``text_model.`` under
  ``cond_stage_model.transformer.``; the two spellings name the same tensor.
- ``position_ids`` are never merged: the output holds ``int64`` ``0..n-1``
  (:func:`position_ids`), whatever the inputs hold (float ids such as 75.9995 truncate
  to the wrong token position: reference issues #6728, #7450).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from sdstack.merge import MergeError
from sdstack.models.detect import CONV_IN_KEY, SD1, detect_kind, name_list
from sdstack.models.key_map.ldm import TEXT_MODEL, TEXT_PREFIX, UNET_PREFIX

CONV_IN_EXTRA = {9: "an inpainting", 8: "an instruct-pix2pix"}
"""conv_in input channels of the SD1.x variants A may be, besides 4."""
EXAMPLES = 3
"""Mismatched tensors named in an error message."""


def is_position_ids(key: str) -> bool:
    """Whether ``key`` is a CLIP ``position_ids`` buffer (never merged)."""
    return key.endswith("position_ids")


def position_ids(shape: Sequence[int]) -> torch.Tensor:
    """``int64`` ids ``0..n-1`` in ``shape`` (``[1, 77]`` on SD1.x: 0..76)."""
    count = 1
    for size in shape:
        count *= int(size)
    return torch.arange(count, dtype=torch.int64).reshape(tuple(shape))


def alternate_key(key: str) -> str | None:
    """The other spelling of a text-encoder key (with / without ``text_model.``)."""
    if key.startswith(TEXT_PREFIX + TEXT_MODEL):
        return TEXT_PREFIX + key[len(TEXT_PREFIX + TEXT_MODEL) :]
    if key.startswith(TEXT_PREFIX):
        return TEXT_PREFIX + TEXT_MODEL + key[len(TEXT_PREFIX) :]
    return None


def find_key(shapes: Mapping[str, object], key: str) -> str | None:
    """``key`` as ``shapes`` spells it (itself or its :func:`alternate_key`), or None."""
    if key in shapes:
        return key
    other = alternate_key(key)
    return other if other is not None and other in shapes else None


def _context_width(shapes: Mapping[str, Sequence[int]]) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def model_kind(shapes: Mapping[str, Sequence[int]]) -> str:
    """``detect_kind`` with the file's own context width (``SD1`` or a description)."""
    kind = detect_kind(shapes, _context_width(shapes) or 768)
    if kind.startswith(("an SD1.x inpainting", "an instruct-pix2pix")):
        return SD1
    return kind


def conv_in_channels(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Input channels of the UNet ``conv_in`` (4, 8 or 9 on SD1.x), None without one."""
    shape = shapes.get(CONV_IN_KEY)
    return int(shape[1]) if shape is not None and len(shape) == 4 else None


def _shape(shape: Sequence[int]) -> str:
    return str(list(shape))


def mismatches(
    a: Mapping[str, Sequence[int]], other: Mapping[str, Sequence[int]], skip: Iterable[str] = ()
) -> list[str]:
    """Descriptions of the tensors of ``other`` that do not fit ``a``: UNet names that only
    one has, and shared model tensors of another shape (``skip``: keys not compared)."""
    skipped = set(skip)
    found: list[str] = []
    matched = set()
    for key in sorted(a):
        if key in skipped or is_position_ids(key) or "model" not in key:
            continue
        theirs = find_key(other, key)
        if theirs is None:
            if key.startswith(UNET_PREFIX):
                found.append(f"{key} missing")
            continue
        matched.add(theirs)
        if tuple(other[theirs]) != tuple(a[key]):
            found.append(f"{key} {_shape(other[theirs])} (A: {_shape(a[key])})")
    for key in sorted(other):
        if key.startswith(UNET_PREFIX) and key not in matched and key not in skipped:
            found.append(f"{key} not in A")
    return found


def check_a(name: str, shapes: Mapping[str, Sequence[int]]) -> None:
    """Refuse an A that is not an SD1.x checkpoint.

    Raises:
        MergeError: names the file and what it looks like.
    """
    kind = model_kind(shapes)
    if kind != SD1:
        raise MergeError(
            f"{name}: cannot merge it: this looks like {kind}; expected an SD1.x checkpoint "
            "(text-to-image, inpainting or instruct-pix2pix)"
        )


def check_fits(
    a_name: str,
    a: Mapping[str, Sequence[int]],
    name: str,
    other: Mapping[str, Sequence[int]],
    reference: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Refuse ``other`` unless it is an SD1.x checkpoint with A's UNet and shapes.

    ``conv_in`` is compared with ``reference`` (B's shapes, for C), else with the conv_in
    rule of the module docstring.

    Raises:
        MergeError: names ``name``, what it looks like and a few mismatched tensors.
    """
    kind = model_kind(other)
    found = mismatches(a, other, skip=(CONV_IN_KEY,))
    if kind == SD1 and not found:
        _check_conv_in(a_name, a, name, other, reference)
        return
    what = f"this looks like {kind}" if kind != SD1 else "its tensors have other shapes"
    raise MergeError(
        f"{name}: cannot merge it with {a_name}: {what}; expected an SD1.x checkpoint with "
        f"the tensor names and shapes of A ({len(found)} differ: "
        f"{name_list(found, EXAMPLES, width=None)})"
    )


def _check_conv_in(
    a_name: str,
    a: Mapping[str, Sequence[int]],
    name: str,
    other: Mapping[str, Sequence[int]],
    reference: Mapping[str, Sequence[int]] | None,
) -> None:
    mine, theirs = conv_in_channels(a), conv_in_channels(other)
    if reference is not None:
        wanted = tuple(reference[CONV_IN_KEY])
        if tuple(other[CONV_IN_KEY]) != wanted:
            raise MergeError(
                f"{name}: its conv_in {CONV_IN_KEY} is {_shape(other[CONV_IN_KEY])}; expected "
                f"B's {_shape(wanted)} (C is subtracted from B)"
            )
        return
    if mine == theirs:
        return
    if mine == 4 and theirs in CONV_IN_EXTRA:
        raise MergeError(
            f"{name}: is {CONV_IN_EXTRA[theirs]} checkpoint ({theirs}-channel conv_in) and "
            f"{a_name} is not: give the {CONV_IN_EXTRA[theirs].split()[-1]} model first, as A "
            "(its extra conv_in channels are kept and the first 4 merged)"
        )
    if mine in CONV_IN_EXTRA and theirs == 4:
        return
    raise MergeError(
        f"{name}: its conv_in {CONV_IN_KEY} is {_shape(other[CONV_IN_KEY])} and A's "
        f"{_shape(a[CONV_IN_KEY])}; expected the same, or A with 9 or 8 input channels and "
        "this one with 4"
    )


def missing_from(a: Mapping[str, object], other: Mapping[str, object]) -> list[str]:
    """A's model tensors (not position_ids) that ``other`` does not have."""
    return [
        key
        for key in sorted(a)
        if "model" in key and not is_position_ids(key) and find_key(other, key) is None
    ]


def only_in(other: Mapping[str, object], a: Mapping[str, object]) -> list[str]:
    """Tensors of ``other`` that match no tensor of A (dropped by the merge)."""
    return [key for key in sorted(other) if find_key(a, key) is None]
