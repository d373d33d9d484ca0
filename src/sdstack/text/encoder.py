"""Prompt -> UNet conditioning, as the reference web UI computes it for SD1.x.

Per text: reference chunks (``sdstack.prompt.tokenize_prompt``: emphasis, 75-token
chunks, BREAK, comma back-tracking, textual-inversion slots), one batched CLIP forward over
all distinct chunks, CLIP skip (``clip_skip``), emphasis (``emphasis``), chunks concatenated
along tokens into ``(1, 77 * n, width)``.

Texts are grouped into reference *calls* (one call of the reference's text encoder): a
lone text (``encode``), one AND part's schedule entries or the negative prompt's
(``encode_schedule``). A call pads its texts to one chunk count and "original" emphasis
restores one mean per chunk index over all its texts (``sdstack.text.emphasis``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdstack.prompt import PromptChunks, tokenize_prompt
from sdstack.prompt.chunks import check_comma_backtrack
from sdstack.text.clip_skip import (
    check_clip_skip,
    clip_skip_output,
    final_layer_norm,
    num_layers,
    token_embedding,
)
from sdstack.text.conditioning import Conditioning
from sdstack.text.embeddings import EmbeddingError
from sdstack.text.emphasis import apply_emphasis, check_emphasis
from sdstack.text.schedule_encoding import merge_schedules, part_schedules

ScheduledConditioning = list[tuple[int, list[tuple[Conditioning, float]]]]
"""``[(end_step, [(conditioning, AND weight), ...]), ...]`` as ``encode_schedule`` returns."""


def _embedding_vectors(embeddings: Mapping[str, Any] | None, width: int) -> dict[str, torch.Tensor]:
    """Name -> (n, width) float32 vectors; values may be ``Embedding``s or tensors."""
    vectors: dict[str, torch.Tensor] = {}
    for name, item in (embeddings or {}).items():
        tensor = getattr(item, "vectors", item)
        if not isinstance(tensor, torch.Tensor):
            raise EmbeddingError(
                f"embedding {name!r}: expected an Embedding or a tensor, got {type(item).__name__}"
            )
        tensor = tensor.detach().float()
        tensor = tensor[None] if tensor.ndim == 1 else tensor
        if tensor.ndim != 2 or tensor.shape[-1] != width or tensor.shape[0] < 1:
            raise EmbeddingError(
                f"embedding {name!r} has shape {tuple(tensor.shape)}: expected (vectors, {width}) "
                f"to match the text encoder's token-embedding width {width}"
            )
        vectors[name] = tensor
    return vectors


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
        self.comma_backtrack = check_comma_backtrack(comma_backtrack)
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
        """Conditioning of one text, a reference encoder call of one: ``(1, 77 * chunks, width)``.

        ``prompt`` is encoded as it is: no AND split, no schedule, network tags not removed.
        Being alone in its call, each of its chunks has its own "original" mean restored.

        Args:
            prompt: the text, with reference emphasis syntax.
            clip_skip: reference numbering, 1 = last layer, up to ``num_layers``; fractional
                values blend neighbouring layers (see ``sdstack.text.clip_skip``).
            emphasis: one of ``EMPHASIS_MODES`` (see ``sdstack.text.emphasis``).

        Raises:
            ValueError: bad ``clip_skip`` or ``emphasis``; ``PromptSyntaxError`` for bad syntax.
        """
        return self.encode_call([prompt], clip_skip=clip_skip, emphasis=emphasis)[0]

    def encode_many(
        self, prompts: Sequence[str], *, clip_skip: float = 1, emphasis: str = "original"
    ) -> list[Conditioning]:
        """``encode`` for several unrelated texts: each text is a call of its own.

        Results equal ``[encode(text) for text in prompts]`` (own chunk count, own
        "original" means); all chunks still go through one batched forward. For texts the
        reference encodes together (one AND part's schedule) use ``encode_call``.
        """
        clip_skip, emphasis = self._check(clip_skip, emphasis)
        chunked = [self.tokenize(text) for text in prompts]
        return self.encode_chunks(chunked, clip_skip=clip_skip, emphasis=emphasis)

    def encode_call(
        self, texts: Sequence[str], *, clip_skip: float = 1, emphasis: str = "original"
    ) -> list[Conditioning]:
        """One reference (A1111 v1.10) text-encoder call over ``texts``, in one forward.

        Every text is padded with the empty chunk (BOS + 76 x EOS, weights 1.0) to the
        call's largest chunk count ``n``, so all results have ``n`` chunks. For each chunk
        index ``i``, "original" emphasis takes ONE mean over the chunk-``i`` encodings of
        all texts: ``mean0 = z_i.mean(); z_i = z_i * m_i[..., None];
        z_i = z_i * (mean0 / z_i.mean())`` with ``z_i`` (texts, 77, width), which also
        scales the padding chunks of shorter texts. Repeated texts stay in the batch and
        so weigh in the mean, as repeated schedule entries do in the reference.

        Returns:
            One ``Conditioning`` per entry of ``texts``, in order.
        """
        clip_skip, emphasis = self._check(clip_skip, emphasis)
        tokens = {text: self.tokenize(text) for text in dict.fromkeys(texts)}
        (call,) = self.encode_calls(
            [[tokens[text] for text in texts]], clip_skip=clip_skip, emphasis=emphasis
        )
        return call

    def encode_pair(
        self,
        prompt: str,
        negative: str,
        *,
        clip_skip: float = 1,
        emphasis: str = "original",
    ) -> tuple[Conditioning, Conditioning]:
        """Prompt and negative prompt with the same chunk count (reference padding).

        Prompt and negative are separate calls (each as ``encode``). The side with fewer
        chunks then gets the separately encoded empty prompt's chunk appended until both
        match (the reference's ``pad_cond``); appending weight-1 empty chunks before a call
        of one is the same, since a chunk of all-1 weights keeps its encoding under every
        emphasis mode. Both sides go through one forward.
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
        """Composable (AND) and scheduled conditioning, one reference call per AND part.

        With ``split_and=True`` (positive prompts) network tags are removed first and the
        prompt is split on AND; ``split_and=False`` is the negative-prompt treatment (tags
        stay literal, no AND split, a trailing ``:2`` stays text). Every part is scheduled.

        As in the reference, each distinct part text's schedule entries (repeats included)
        form one ``encode_call``: its texts share the chunk count and the per-chunk-index
        "original" mean. Different parts are separate calls, so a text appearing in two
        parts with different schedules may be encoded differently in each. All calls run
        in one batched forward.

        Returns:
            ``[(end_step, [(Conditioning, AND weight), ...]), ...]``; step ``s`` (0-based)
            uses the first entry with ``s <= end_step``.
        """
        clip_skip, emphasis = self._check(clip_skip, emphasis)
        parts = part_schedules(prompt, steps, split_and=split_and)
        calls = {text: [entry for _, entry in schedule] for text, _, schedule in parts}
        tokens = {t: self.tokenize(t) for texts in calls.values() for t in dict.fromkeys(texts)}
        encoded = self.encode_calls(
            [[tokens[t] for t in texts] for texts in calls.values()],
            clip_skip=clip_skip,
            emphasis=emphasis,
        )
        table: dict[tuple[str, str], Conditioning] = {}
        for (part, texts), results in zip(calls.items(), encoded, strict=True):
            for text, cond in zip(texts, results, strict=True):
                table.setdefault((part, text), cond)
        plan = []
        for end, row in merge_schedules(parts):
            entries = zip(parts, row, strict=True)
            plan.append((end, [(table[part[0], text], w) for part, (text, w) in entries]))
        return plan

    def empty(self, *, clip_skip: float = 1, emphasis: str = "original") -> Conditioning:
        """The empty prompt ``""`` encoded: one chunk, used to pad shorter conditionings."""
        return self.encode("", clip_skip=clip_skip, emphasis=emphasis)

    def encode_chunks(
        self, prompts: Sequence[PromptChunks], *, clip_skip: float = 1, emphasis: str = "original"
    ) -> list[Conditioning]:
        """Encode already-chunked prompts, each a call of its own, in one forward."""
        calls = self.encode_calls([[p] for p in prompts], clip_skip=clip_skip, emphasis=emphasis)
        return [call[0] for call in calls]

    def encode_calls(
        self,
        calls: Sequence[Sequence[PromptChunks]],
        *,
        clip_skip: float = 1,
        emphasis: str = "original",
    ) -> list[list[Conditioning]]:
        """Encode reference calls of already-chunked texts: one forward over everything.

        Steps: pad each call's texts with empty chunks to the call's largest chunk count;
        run the text model once over the distinct chunks of all calls (plus the empty chunk
        when ``"comfy"`` emphasis needs ``z_empty``), placing textual-inversion vectors in
        their slots; apply CLIP skip; apply emphasis per call (see ``encode_call`` and
        ``sdstack.text.emphasis``); concatenate each text's chunks along tokens.
        """
        clip_skip, emphasis = self._check(clip_skip, emphasis)
        padded = []
        for call in calls:
            n_chunks = max((len(chunks.chunks) for chunks in call), default=0)
            padded.append([chunks.padded(n_chunks) for chunks in call])
        rows = [chunk for call in padded for chunks in call for chunk in chunks.chunks]
        if not rows:
            return [[] for _ in padded]
        needs_empty = emphasis == "comfy" and any(w != 1 for row in rows for w in row.weights)
        z, pooled, z_empty = self._forward_distinct(rows, clip_skip, needs_empty)
        results, start = [], 0
        for call in padded:
            results.append(self._finish_call(call, z, pooled, start, emphasis, z_empty))
            start += sum(len(chunks.chunks) for chunks in call)
        return results

    def _finish_call(
        self,
        call: Sequence[PromptChunks],
        z: torch.Tensor,
        pooled: torch.Tensor,
        start: int,
        emphasis: str,
        z_empty: torch.Tensor | None,
    ) -> list[Conditioning]:
        """Emphasis over one call's rows ``start ...`` of ``z``, split into Conditionings."""
        if not call:
            return []
        texts, n_chunks = len(call), len(call[0].chunks)
        block = z[start : start + texts * n_chunks].reshape(texts, n_chunks, *z.shape[1:])
        weights = [[chunk.weights for chunk in chunks.chunks] for chunks in call]
        multipliers = torch.tensor(weights, dtype=torch.float32, device=z.device)
        block = apply_emphasis(block, multipliers, emphasis, z_empty)
        results = []
        for index, chunks in enumerate(call):
            first = start + index * n_chunks
            names = (slot.name for chunk in chunks.chunks for slot in chunk.embeddings)
            results.append(
                Conditioning(
                    tensor=block[index].reshape(1, -1, z.shape[-1]),
                    pooled=pooled[first : first + 1],
                    embeddings_used=tuple(dict.fromkeys(names)),
                )
            )
        return results

    def _forward_distinct(
        self, rows: Sequence[Any], clip_skip: float, with_empty: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``_forward`` over the distinct chunks of ``rows`` (same ids and slots run once).

        Returns per-row encodings (rows, 77, width), per-row pooled, and the empty chunk's
        encoding when ``with_empty``.
        """
        keys: dict[Any, int] = {}
        distinct: list[Any] = []
        extra = [PromptChunks.empty_chunk()] if with_empty else []
        index = []
        for chunk in [*rows, *extra]:
            key = (chunk.ids, chunk.embeddings)
            if key not in keys:
                keys[key] = len(distinct)
                distinct.append(chunk)
            index.append(keys[key])
        z, pooled = self._forward(distinct, clip_skip)
        z_empty = z[index[-1]] if with_empty else None
        if len(distinct) != len(rows) or with_empty:
            pick = torch.tensor(index[: len(rows)], device=z.device)
            z, pooled = z[pick], pooled[pick]
        return z, pooled, z_empty

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
            raise EmbeddingError(
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
