"""Token merging (ToMe for SD), the reference's "Token merging ratio", through ``tomesd``.

ToMe for SD (Bolya & Hoffman 2023, arXiv 2303.17604) shortens the token sequence
before the self-attention of each transformer block and restores it after: tokens are
split into destinations (one per ``sx x sy`` cell, here its top-left token) and sources;
each source is matched to its most cosine-similar destination (bipartite soft matching),
the ``r = int(ratio * N)`` best-matched sources are averaged into their destinations,
attention runs on ``N - r`` tokens, and every merged source takes its destination's
output back ("unmerge"). At most the sources can merge, so ratios above
``1 - 1/(sx*sy) = 0.75`` act as 0.75.

This module applies the ``tomesd`` package (the implementation the reference uses)
with the reference's settings (``modules/sd_models.py: apply_token_merging``):
``use_rand=False`` (deterministic destinations), merging for self-attention only,
``max_downsample=1`` (only the blocks at full latent resolution: 5 of SD1's 16
transformer blocks, 4096 tokens each at 512x512), ``sx = sy = 2``.

tomesd swaps the class of each diffusers ``BasicTransformerBlock`` for a subclass
whose ``forward`` merges; its forward is tomesd's copy of diffusers' (0.1.3 works with
diffusers 0.42 for SD1 blocks: layer norm, no positional embedding, no feed-forward
chunking, which :func:`apply_token_merging` checks). Removing the patch puts the classes
back, so the UNet computes exactly what it did before.

Minimum size: a merged level needs at least ``sx x sy`` = 2x2 tokens, i.e. latents of
at least ``2 * max_downsample`` on each side (SD1 with ``max_downsample=1``: 2, always
met; the tiny test UNet, whose only attention is at downsample 2: 4x4 latents).
Smaller inputs are refused with a :class:`TokenMergingError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sdstack.errors import SdstackError
from sdstack.validate import SettingError, check_number

MAX_RATIO = 0.9
"""The reference's slider maximum; tomesd merges at most 0.75 of the tokens."""
MAX_DOWNSAMPLES = (1, 2, 4, 8)
INSTALL_HINT = "install it with `pip install tomesd` (a dependency of sdstack)"


class TokenMergingError(SdstackError):
    """Token merging cannot be applied: tomesd missing, an unsupported UNet block, or
    latents too small for a 2x2 merge grid."""


def check_ratio(ratio: Any, name: str = "token merging ratio") -> float:
    """``ratio`` as a float in ``[0, 0.9]`` (0 = off).

    Raises:
        SettingError: ``<name> must be between 0 and 0.9 (0 = off), got <value>``.
    """
    return check_number(name, ratio, 0.0, MAX_RATIO, hint=" (0 = off)")


def _tomesd() -> Any:
    try:
        import tomesd
    except ImportError as error:
        raise TokenMergingError(
            f"token merging needs the tomesd package, which is not installed; {INSTALL_HINT}"
        ) from error
    return tomesd


def _transformer_blocks(unet: Any) -> list[Any]:
    """The diffusers ``BasicTransformerBlock`` modules of ``unet``, checked to be ones
    tomesd's forward reproduces.

    Raises:
        TokenMergingError: no such block, or one tomesd would compute differently.
    """
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    if not blocks:
        raise TokenMergingError(
            f"token merging: {type(unet).__name__} has no diffusers BasicTransformerBlock "
            "to merge tokens in; expected an SD1 UNet2DConditionModel"
        )
    for block in blocks:
        if block.norm_type != "layer_norm" or block.pos_embed is not None or block._chunk_size:
            raise TokenMergingError(
                f"token merging: a transformer block with norm {block.norm_type!r}, "
                f"positional embedding {block.pos_embed is not None}, feed-forward chunks "
                f"{block._chunk_size}; tomesd supports SD1 blocks only (layer_norm, none, none)"
            )
    return blocks


def _size_hook(info: dict[str, Any], max_downsample: int) -> Any:
    """A UNet forward pre-hook that records the latent size for tomesd (whose own hook
    reads only a positional ``sample``) and refuses latents too small to merge."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        height, width = sample.shape[-2:]
        smallest = 2 * max_downsample
        if info["args"]["ratio"] > 0 and min(height, width) < smallest:
            raise TokenMergingError(
                f"token merging: latents {width}x{height} are too small; merging at "
                f"downsample {max_downsample} needs at least {smallest}x{smallest} latent "
                "pixels (use token merging ratio 0)"
            )
        info["size"] = (height, width)

    return hook


def apply_token_merging(unet: Any, ratio: float, *, max_downsample: int = 1) -> None:
    """Patch ``unet`` (a diffusers ``UNet2DConditionModel``) in place to merge tokens.

    ``ratio`` 0 removes any patch and leaves the UNet as it was. Applying again replaces
    the earlier patch (the reference re-applies when the ratio changes).

    Args:
        unet: the UNet to patch.
        ratio: fraction of tokens merged before each self-attention (0..0.9).
        max_downsample: merge in blocks with at most this downsampling (1, 2, 4, 8;
            the reference: 1).

    Raises:
        SettingError: ``ratio`` or ``max_downsample`` out of range.
        TokenMergingError: tomesd missing, or blocks tomesd cannot patch faithfully.
    """
    ratio = check_ratio(ratio)
    if max_downsample not in MAX_DOWNSAMPLES:
        raise SettingError(
            f"token merging max_downsample must be one of 1, 2, 4, 8, got {max_downsample!r}"
        )
    remove_token_merging(unet)
    if ratio == 0:
        return
    tomesd = _tomesd()
    _transformer_blocks(unet)
    tomesd.apply_patch(
        unet,
        ratio=ratio,
        max_downsample=max_downsample,
        sx=2,
        sy=2,
        use_rand=False,  # the reference: random destinations upset some samplers
        merge_attn=True,
        merge_crossattn=False,
        merge_mlp=False,
    )
    info = unet._tome_info
    for handle in info["hooks"]:  # tomesd's hook needs a positional sample
        handle.remove()
    info["hooks"][:] = [
        unet.register_forward_pre_hook(_size_hook(info, max_downsample), with_kwargs=True)
    ]


def remove_token_merging(unet: Any) -> None:
    """Undo :func:`apply_token_merging`: original block classes, hooks removed, tomesd's
    attributes deleted. A UNet that is not patched is left as it is."""
    if not hasattr(unet, "_tome_info"):
        return
    tomesd = _tomesd()
    tomesd.remove_patch(unet)
    for module in unet.modules():
        if "_tome_info" in module.__dict__:
            del module._tome_info


def token_merging_ratio(unet: Any) -> float:
    """The ratio ``unet`` is patched with, 0.0 when it is not (for the infotext)."""
    info = getattr(unet, "_tome_info", None)
    return 0.0 if info is None else float(info["args"]["ratio"])


@contextmanager
def token_merging(unet: Any, ratio: float, *, max_downsample: int = 1) -> Iterator[Any]:
    """``with token_merging(unet, 0.3): ...``: :func:`apply_token_merging` for the block,
    then the UNet's earlier state back (its earlier patch, if it had one)."""
    info = getattr(unet, "_tome_info", None)
    before = (0.0, 1) if info is None else (info["args"]["ratio"], info["args"]["max_downsample"])
    apply_token_merging(unet, ratio, max_downsample=max_downsample)
    try:
        yield unet
    finally:
        apply_token_merging(unet, before[0], max_downsample=before[1])
