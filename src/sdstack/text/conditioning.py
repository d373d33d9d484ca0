"""The UNet conditioning of one prompt: the (1, 77*n, width) tensor and the pooled vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_TOKENS = 77
"""Token positions per chunk: BOS, 75 body tokens, EOS."""


@dataclass
class Conditioning:
    """Encoded prompt, chunks concatenated along tokens (reference layout).

    Attributes:
        tensor: (1, 77 * chunks, width) cross-attention context for the UNet.
        pooled: (1, width) the last layer's final-LN output at the first chunk's first EOS
            (``CLIPTextModel.pooler_output``; width equals the projection width on SD1.x).
            Taken before emphasis and independent of CLIP skip.
        embeddings_used: textual-inversion names placed in the prompt, in order of first
            use (for the infotext ``TI hashes``).
    """

    tensor: torch.Tensor
    pooled: torch.Tensor
    embeddings_used: tuple[str, ...] = ()

    def __repr__(self) -> str:
        shape = tuple(self.tensor.shape)
        return (
            f"Conditioning(tensor={shape} {self.tensor.dtype}, chunks={self.chunks}, "
            f"embeddings_used={self.embeddings_used!r})"
        )

    @property
    def chunks(self) -> int:
        """Number of 77-token chunks: ``tensor.shape[1] // 77``."""
        return self.tensor.shape[1] // CHUNK_TOKENS

    def padded_to(self, n_chunks: int, empty: Conditioning) -> Conditioning:
        """This conditioning followed by copies of ``empty``'s chunk up to ``n_chunks``.

        The reference pads the shorter of a prompt and its negative this way (with the
        empty prompt's encoding) so both sides of classifier-free guidance have the same
        token count. ``pooled`` is kept.

        Raises:
            ValueError: ``n_chunks`` below the current count, or ``empty`` not one chunk.
        """
        if empty.chunks != 1:
            raise ValueError(f"empty must be one 77-token chunk, got {empty.chunks} chunks")
        if n_chunks < self.chunks:
            raise ValueError(
                f"n_chunks must be at least the {self.chunks} chunks already held, got {n_chunks}"
            )
        if n_chunks == self.chunks:
            return self
        pad = empty.tensor.to(self.tensor).repeat(1, n_chunks - self.chunks, 1)
        return Conditioning(
            tensor=torch.cat([self.tensor, pad], dim=1),
            pooled=self.pooled,
            embeddings_used=self.embeddings_used,
        )
