"""Prompt -> UNet conditioning, as the reference web UI computes it for SD1.x.

Per prompt: reference chunks (``sdstack.prompt.tokenize_prompt``: emphasis, 75-token
chunks, BREAK, comma back-tracking, textual-inversion slots), one batched CLIP forward over
all chunks, CLIP skip (``clip_skip``), emphasis (``emphasis``), chunks concatenated along
tokens into ``(1, 77 * n, width)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdstack.prompt import PromptChunks, tokenize_prompt
from sdstack.text.clip_skip import (
    check_clip_skip,
    clip_skip_output,
    final_layer_norm,
    num_layers,
    token_embedding,
)
from sdstack.text.conditioning import Conditioning
from sdstack.text.emphasis import apply_emphasis, check_emphasis
from sdstack.text.schedule_encoding import schedule_plan

ScheduledConditioning = list[tuple[int, list[tuple[Conditioning, float]]]]
"""``[(end_step, [(conditioning, AND weight), ...]), ...]`` as ``encode_schedule`` returns."""


def _embedding_vectors(embeddings: Mapping[str, Any] | None, width: int) -> dict[str, torch.Tensor]:
    """Name -> (n, width) float32 vectors; values may be ``Embedding``s or tensors."""
    vectors: dict[str, torch.Tensor] = {}
    for name, item in (embeddings or {}).items():
        tensor = getattr(item, "vectors", item)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"embedding {name!r}: expected an Embedding or a tensor, got {type(item).__name__}"
            )
        tensor = tensor.detach().float()
        tensor = tensor[None] if tensor.ndim == 1 else tensor
        if tensor.ndim != 2 or tensor.shape[-1] != width or tensor.shape[0] < 1:
            raise ValueError(
                f"embedding {name!r} has shape {tuple(tensor.shape)}: expected (vectors, {width}) "
                f"to match the text encoder's token-embedding width {width}"
            )
        vectors[name] = tensor
    return vectors


def _check_comma_backtrack(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 74:
        raise ValueError(f"comma_backtrack must be an integer in 0..74, got {value!r}")
    return value


class PromptEncoder:
    """Reference (A1111 v1.10) SD1.x text conditioning over a transformers ``CLIPTextModel``.

    Args:
        text_model: ``transformers.CLIPTextModel`` (4.x or 5.x); its dtype and device are
            used as they are.
        tokenizer: the SD1.x ``CLIPTokenizer`` (``sdstack.prompt.load_tokenizer()``).
        embeddings: textual-inversion name -> ``Embedding`` (``.vectors`` (n, width)) or a
            tensor, e.g. an ``EmbeddingLibrary``.
        comma_backtrack: the reference ``comma_padding_backtrack`` option, 0..74.

    Raises:
        ValueError: an embedding whose width differs from the text encoder's, or a bad
            ``comma_backtrack``.
    """

    def __init__(
        self,
        text_model: Any,
        tokenizer: Any,
        embeddings: Mapping[str, Any] | None = None,
        *,
        comma_backtrack: int = 20,
    ) -> None:
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.comma_backtrack = _check_comma_backtrack(comma_backtrack)
        self._vectors = _embedding_vectors(embeddings, self.width)
        self._counts = {name: int(v.shape[0]) for name, v in self._vectors.items()}

    @property
    def width(self) -> int:
        """Token-embedding width of the text model (768 on SD1.x)."""
        return int(token_embedding(self.text_model).embedding_dim)

    @property
    def num_layers(self) -> int:
        """Transformer layers; the largest valid ``clip_skip``."""
        return num_layers(self.text_model)

    def tokenize(self, text: str) -> PromptChunks:
        """Reference chunks of one text (no AND split, no schedule, tags kept)."""
        return tokenize_prompt(
            text, self.tokenizer, self._counts or None, comma_backtrack=self.comma_backtrack
        )

    def encode(
        self, prompt: str, *, clip_skip: float = 1, emphasis: str = "original"
    ) -> Conditioning:
        """Conditioning of one text: ``(1, 77 * chunks, width)``.

        ``prompt`` is encoded as it is: no AND split, no schedule, network tags not removed.

        Args:
            prompt: the text, with reference emphasis syntax.
            clip_skip: reference numbering, 1 = last layer, up to ``num_layers``; fractional
                values blend neighbouring layers (see ``sdstack.text.clip_skip``).
            emphasis: one of ``EMPHASIS_MODES`` (see ``sdstack.text.emphasis``).

        Raises:
            ValueError: bad ``clip_skip`` or ``emphasis``; ``PromptSyntaxError`` for bad syntax.
        """
        return self.encode_many([prompt], clip_skip=clip_skip, emphasis=emphasis)[0]

    def encode_many(
        self, prompts: Sequence[str], *, clip_skip: float = 1, emphasis: str = "original"
    ) -> list[Conditioning]:
        """``encode`` for several texts, all chunks in one batched forward."""
        clip_skip, emphasis = self._check(clip_skip, emphasis)
        chunked = [self.tokenize(text) for text in prompts]
        return self.encode_chunks(chunked, clip_skip=clip_skip, emphasis=emphasis)

    def encode_pair(
        self,
        prompt: str,
        negative: str,
        *,
        clip_skip: float = 1,
        emphasis: str = "original",
    ) -> tuple[Conditioning, Conditioning]:
        """Prompt and negative prompt with the same chunk count (reference padding).

        The side with fewer chunks gets the empty prompt's chunk (BOS + 76 x EOS) appended
        until both match; both sides are encoded in one forward.
        """
        clip_skip, emphasis = self._check(clip_skip, emphasis)
        cond, uncond = self.tokenize(prompt), self.tokenize(negative)
        n_chunks = max(len(cond.chunks), len(uncond.chunks))
        pair = [cond.padded(n_chunks), uncond.padded(n_chunks)]
        first, second = self.encode_chunks(pair, clip_skip=clip_skip, emphasis=emphasis)
        return first, second

    def encode_schedule(
        self,
        prompt: str,
        steps: int,
        *,
        clip_skip: float = 1,
        emphasis: str = "original",
        split_and: bool = True,
    ) -> ScheduledConditioning:
        """Composable (AND) and scheduled conditioning, each distinct text encoded once.

        With ``split_and=True`` (positive prompts) network tags are removed first and the
        prompt is split on AND; ``split_and=False`` is the negative-prompt treatment (tags
        stay literal, no AND split, a trailing ``:2`` stays text). Every part is scheduled.

        Returns:
            ``[(end_step, [(Conditioning, AND weight), ...]), ...]``; step ``s`` (0-based)
            uses the first entry with ``s <= end_step``.
        """
        clip_skip, emphasis = self._check(clip_skip, emphasis)
        plan = schedule_plan(prompt, steps, split_and=split_and)
        texts = list(dict.fromkeys(text for _, parts in plan for text, _ in parts))
        encoded = dict(
            zip(texts, self.encode_many(texts, clip_skip=clip_skip, emphasis=emphasis), strict=True)
        )
        return [(end, [(encoded[text], weight) for text, weight in parts]) for end, parts in plan]

    def empty(self, *, clip_skip: float = 1, emphasis: str = "original") -> Conditioning:
        """The empty prompt ``""`` encoded: one chunk, used to pad shorter conditionings."""
        return self.encode("", clip_skip=clip_skip, emphasis=emphasis)

    def encode_chunks(
        self, prompts: Sequence[PromptChunks], *, clip_skip: float = 1, emphasis: str = "original"
    ) -> list[Conditioning]:
        """Encode already-chunked prompts: one forward over every chunk of every prompt.

        Steps: stack all chunks' ids on the batch dimension (plus the empty chunk when
        ``"comfy"`` emphasis needs ``z_empty``); run the text model once, placing
        textual-inversion vectors in their slots; apply CLIP skip and emphasis per chunk;
        concatenate each prompt's chunks along tokens.
        """
        clip_skip, emphasis = self._check(clip_skip, emphasis)
        if not prompts:
            return []
        rows = [chunk for chunks in prompts for chunk in chunks.chunks]
        weights = torch.tensor([chunk.weights for chunk in rows], dtype=torch.float32)
        needs_empty = emphasis == "comfy" and bool((weights != 1).any())
        if needs_empty:
            rows.append(PromptChunks.empty_chunk())
        z, pooled = self._forward(rows, clip_skip)
        z_empty = z[-1] if needs_empty else None
        z = apply_emphasis(z[: len(weights)], weights.to(z.device), emphasis, z_empty)
        results, start = [], 0
        for chunks in prompts:
            count = len(chunks.chunks)
            names = (slot.name for chunk in chunks.chunks for slot in chunk.embeddings)
            results.append(
                Conditioning(
                    tensor=z[start : start + count].reshape(1, -1, z.shape[-1]),
                    pooled=pooled[start : start + 1],
                    embeddings_used=tuple(dict.fromkeys(names)),
                )
            )
            start += count
        return results

    def _check(self, clip_skip: float, emphasis: str) -> tuple[float, str]:
        return check_clip_skip(clip_skip, self.num_layers), check_emphasis(emphasis)

    def _forward(self, rows: Sequence[Any], clip_skip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP over the stacked chunks -> (chunks, 77, width) after CLIP skip, and pooled."""
        model = self.text_model
        device = next(model.parameters()).device
        ids = torch.tensor([chunk.ids for chunk in rows], dtype=torch.long, device=device)
        placements = [
            (row, slot.position, self._slot_vectors(slot))
            for row, chunk in enumerate(rows)
            for slot in chunk.embeddings
        ]
        want_hidden = clip_skip != 1
        with torch.no_grad(), _PlacedVectors(token_embedding(model), placements):
            output = model(input_ids=ids, output_hidden_states=want_hidden)
            z = clip_skip_output(
                output.hidden_states if want_hidden else (),
                output.last_hidden_state,
                final_layer_norm(model),
                clip_skip,
            )
        return z, output.pooler_output

    def _slot_vectors(self, slot: Any) -> torch.Tensor:
        vectors = self._vectors.get(slot.name)
        if vectors is None or vectors.shape[0] != slot.vectors:
            raise ValueError(
                f"chunk slot names embedding {slot.name!r} ({slot.vectors} vectors), which this "
                f"encoder does not hold with that many vectors; known: {sorted(self._counts)}"
            )
        return vectors


class _PlacedVectors:
    """Forward hook on the token embedding that overwrites textual-inversion slot rows.

    ``placements`` holds ``(batch row, first position, (n, width) vectors)``; rows
    ``position .. position + n - 1`` of that batch row get the vectors (cast to the output's
    dtype and device). Position embeddings are added afterwards by the model, as for words.
    """

    def __init__(self, module: Any, placements: list[tuple[int, int, torch.Tensor]]) -> None:
        self.module = module
        self.placements = placements
        self.handle: Any = None

    def _hook(self, _module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        for row, position, vectors in self.placements:
            output[row, position : position + vectors.shape[0]] = vectors.to(output)
        return output

    def __enter__(self) -> _PlacedVectors:
        if self.placements:
            self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()
