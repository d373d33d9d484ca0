"""Emphasis: how the ``(word:1.2)`` multipliers act on the encoded chunk tensor.

For one 77-token chunk, ``z`` is its encoding (77, width) after CLIP skip and ``m`` its
77 multipliers (1.0 at BOS, EOS and padding):

==========  ===================================================================
mode        formula
==========  ===================================================================
original    reference web UI default: ``mean0 = z.mean(); z' = z * m[:, None];``
            ``z' = z' * (mean0 / z'.mean())`` (one scalar mean over the whole
            chunk tensor, restored after weighting)
no-norm     reference "No norm": ``z' = z * m[:, None]``
ignore      reference "Ignore": brackets are parsed and stripped, ``z' = z``
comfy       ComfyUI core: ``z' = z_empty + (z - z_empty) * m[:, None]``, where
            ``z_empty`` encodes the empty prompt (BOS + 76 x EOS) at the same
            clip skip; a chunk whose multipliers are all 1 is left as ``z``
==========  ===================================================================

The arithmetic is done in float32 and the result cast back to ``z``'s dtype.
"""

from __future__ import annotations

import difflib

import torch

EMPHASIS_MODES = ("original", "no-norm", "ignore", "comfy")
"""Valid ``emphasis`` values (reference UI names are accepted too, e.g. ``"No norm"``)."""


def check_emphasis(mode: str) -> str:
    """The canonical emphasis mode for ``mode``.

    Case, spaces and underscores are normalised, so the reference UI's infotext names
    (``Original``, ``No norm``, ``Ignore``) are accepted.

    Raises:
        ValueError: unknown mode; the message lists the valid modes and the nearest one.
    """
    name = str(mode).strip().lower().replace("_", "-").replace(" ", "-")
    if name in EMPHASIS_MODES:
        return name
    nearest = difflib.get_close_matches(name, EMPHASIS_MODES, n=1)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    raise ValueError(
        f"unknown emphasis mode {mode!r}: expected one of {', '.join(EMPHASIS_MODES)}{hint}"
    )


def emphasis_original(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Reference "Original": weight, then restore each chunk's mean.

    ``z`` (chunks, 77, width), ``multipliers`` (chunks, 77). Per chunk ``c``:
    ``mean0 = z[c].mean(); w = z[c] * m[c, :, None]; out[c] = w * (mean0 / w.mean())``.
    """
    z32 = z.float()
    mean0 = z32.mean(dim=(1, 2), keepdim=True)
    weighted = z32 * multipliers.float()[:, :, None]
    restored = weighted * (mean0 / weighted.mean(dim=(1, 2), keepdim=True))
    return restored.to(z.dtype)


def emphasis_no_norm(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Reference "No norm": ``z * m[..., None]`` per position, no mean restoration."""
    return (z.float() * multipliers.float()[:, :, None]).to(z.dtype)


def emphasis_comfy(
    z: torch.Tensor, multipliers: torch.Tensor, z_empty: torch.Tensor
) -> torch.Tensor:
    """ComfyUI: ``z_empty + (z - z_empty) * m[..., None]``; chunks with all m == 1 unchanged.

    ``z_empty`` (77, width) is the empty prompt's encoding at the same clip skip.
    """
    m = multipliers.float()
    empty = z_empty.float()[None]
    blended = (empty + (z.float() - empty) * m[:, :, None]).to(z.dtype)
    plain = (m == 1).all(dim=1)[:, None, None]
    return torch.where(plain, z, blended)


def apply_emphasis(
    z: torch.Tensor,
    multipliers: torch.Tensor,
    mode: str,
    z_empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply emphasis ``mode`` (see the module table) to chunk encodings.

    Args:
        z: (chunks, 77, width) encodings after CLIP skip.
        multipliers: (chunks, 77) emphasis weights.
        mode: one of ``EMPHASIS_MODES`` (already checked).
        z_empty: (77, width) empty-prompt encoding; required for ``"comfy"`` unless every
            multiplier is 1.

    Raises:
        ValueError: ``"comfy"`` without ``z_empty``.
    """
    if mode == "original":
        return emphasis_original(z, multipliers)
    if mode == "no-norm":
        return emphasis_no_norm(z, multipliers)
    if mode == "comfy":
        if bool((multipliers == 1).all()):
            return z
        if z_empty is None:
            raise ValueError("emphasis 'comfy' needs z_empty, the empty prompt's encoding")
        return emphasis_comfy(z, multipliers, z_empty)
    return z
