"""Emphasis: how the ``(word:1.2)`` multipliers act on the encoded chunk tensors of a call.

A *call* is one batch of texts encoded together, as the reference web UI (A1111 v1.10) calls
its text encoder: one text alone (``PromptEncoder.encode``), or every schedule entry of one
AND part (``PromptEncoder.encode_schedule``; the negative prompt's schedule is a call of its
own). All texts of a call are padded with the empty chunk (BOS + 76 x EOS, multipliers 1.0)
to the same chunk count ``n``. For chunk index ``i``, ``z_i`` is the (texts, 77, width)
encoding after CLIP skip of chunk ``i`` of every text of the call and ``m_i`` its
(texts, 77) multipliers (1.0 at BOS, EOS and padding):

==========  ===================================================================
mode        formula, per chunk index ``i`` of a call
==========  ===================================================================
original    reference web UI default: ``mean0 = z_i.mean(); z' = z_i * m_i[..., None];``
            ``z' = z' * (mean0 / z'.mean())`` -- ONE scalar mean over the whole
            (texts, 77, width) batch of the call, not per text; the padding chunks
            of a shorter text are scaled by that same factor
no-norm     reference "No norm": ``z' = z_i * m_i[..., None]``
ignore      reference "Ignore": brackets are parsed and stripped, ``z' = z_i``
comfy       ComfyUI core, per text: ``z' = z_empty + (z_i - z_empty) * m_i[..., None]``,
            where ``z_empty`` encodes the empty prompt (BOS + 76 x EOS) at the same
            clip skip; a chunk whose multipliers are all 1 is left as ``z_i``
==========  ===================================================================

Only "original" depends on which texts share a call; the other modes are position-wise.
The arithmetic is done in float32 and the result cast back to ``z``'s dtype.
"""

from __future__ import annotations

import torch

# One registry of emphasis names for the encoder, generation and the CLI (torch-free).
from sdstack.validate import EMPHASIS_MODES as EMPHASIS_MODES
from sdstack.validate import check_emphasis as check_emphasis


def emphasis_original(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Reference "Original": weight, then restore the call's mean per chunk index.

    ``z`` (texts, chunks, 77, width) is one call, ``multipliers`` (texts, chunks, 77). Per
    chunk index ``i``: ``mean0 = z[:, i].mean(); w = z[:, i] * m[:, i, :, None];
    out[:, i] = w * (mean0 / w.mean())`` -- one scalar over all texts of the call.
    """
    z32 = z.float()
    mean0 = z32.mean(dim=(0, 2, 3), keepdim=True)
    weighted = z32 * multipliers.float()[..., None]
    restored = weighted * (mean0 / weighted.mean(dim=(0, 2, 3), keepdim=True))
    return restored.to(z.dtype)


def emphasis_no_norm(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Reference "No norm": ``z * m[..., None]`` per position, no mean restoration."""
    return (z.float() * multipliers.float()[..., None]).to(z.dtype)


def emphasis_comfy(
    z: torch.Tensor, multipliers: torch.Tensor, z_empty: torch.Tensor
) -> torch.Tensor:
    """ComfyUI: ``z_empty + (z - z_empty) * m[..., None]``; chunks with all m == 1 unchanged.

    ``z`` (..., 77, width), ``multipliers`` (..., 77); ``z_empty`` (77, width) is the empty
    prompt's encoding at the same clip skip.
    """
    m = multipliers.float()
    empty = z_empty.float()
    blended = (empty + (z.float() - empty) * m[..., None]).to(z.dtype)
    plain = (m == 1).all(dim=-1)[..., None, None]
    return torch.where(plain, z, blended)


def apply_emphasis(
    z: torch.Tensor,
    multipliers: torch.Tensor,
    mode: str,
    z_empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply emphasis ``mode`` (see the module table) to the chunk encodings of ONE call.

    Args:
        z: (texts, chunks, 77, width) encodings after CLIP skip: every text of the call,
            padded to the same chunk count. ``"original"`` takes one mean over all texts
            per chunk index; pass a call of one, (1, chunks, 77, width), for a lone text.
        multipliers: (texts, chunks, 77) emphasis weights.
        mode: one of ``EMPHASIS_MODES`` (already checked).
        z_empty: (77, width) empty-prompt encoding; required for ``"comfy"`` unless every
            multiplier is 1.

    Raises:
        ValueError: ``"comfy"`` without ``z_empty``, or ``z`` / ``multipliers`` not of the
            shapes above.
    """
    if z.ndim != 4 or tuple(multipliers.shape) != tuple(z.shape[:3]):
        raise ValueError(
            f"apply_emphasis: expected z (texts, chunks, 77, width) and multipliers "
            f"(texts, chunks, 77), got {tuple(z.shape)} and {tuple(multipliers.shape)}"
        )
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
