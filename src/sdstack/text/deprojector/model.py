"""The CLIP text deprojector model (nanashi161382's v1 design, with its later options).

Rebuilds the UNet conditioning ``H = (h_0 .. h_76)`` (77 x W: CLIP's hidden state at the
clip skip, ``last_hidden_state`` for 1, ``final_layer_norm(hidden_states[-N])`` for N > 1)
from one sentence embedding ``e`` (CLIP's pooled EOS state, or its projection
``text_embeds = W_proj pooled``).

Input vector::

    s = W_proj^-1 e              (frozen; exact inverse, or pseudo-inverse; identity for pooled)
    s = W_proj^-1 (e - null)     (relative_to_null; null = the empty prompt's embedding)
    s = s + MLP(s)               (input_mlp; its last layer starts at zero: s unchanged at first)

Autoregressive decoder (the v1 layout): input ``[s, h_0, ..., h_75] + pos`` through
``layers`` causal CLIP encoder layers and the final LayerNorm predicts
``[h_0, ..., h_76]``; output 0 is replaced by the fixed BOS state ``h_0`` (prompt
independent under the causal mask). ``teacher_forced`` feeds the teacher's states;
``decode`` feeds back its own outputs, through a key/value cache: the two first slots
``[s, h_0]`` in one pass, then one position per step (76 steps of one position instead of
the original's 76 passes over the whole prefix).

relative_to_null centres only the embedding slot. The author's later notebooks also
subtract ``null`` from every fed-back state and move the embedding to slot 1
(``[null, e - null, h_1 - null, ...]``); on the tiny test CLIP (300 Adam steps, 360
captions) that layout trained to a 3x larger teacher-forced loss and diverged when run
free (MSE 2.5 vs 0.07), so sdstack keeps the v1 sequence and centres the input vector.

Parallel decoder (an sdstack design): input ``[s, h_0, x_2, ..., x_76] + pos`` with::

    x_k = s + q_k + (s V) U_k        k = 2 .. 76

learned position queries ``q_k`` initialised to the empty prompt's states ``h_{k-1}``, and
a per-position rank-r linear map of ``s`` (``V = query_down``, W x r, shared;
``U = query_up``, 75 x r x W; ``r = query_rank``, default ``min(QUERY_RANK, W)`` with
``QUERY_RANK = 32``; 0: no term), ``V`` seeded Gaussian and ``U = 0`` at the start (so at
initialisation it is the autoregressive decoder teacher-forced on the empty prompt's
states), through the same causal layers: all 77 positions in one pass, nothing fed
back, no compounding error. ``teacher_forced`` and ``decode`` both return its prediction.
Why the ``(s V) U_k`` term: one shared layer reads every position's input through the
same weights, so ``s + q_k`` gives each position only a different offset of one vector;
the term lets position k read its own directions of ``s`` (the linear-map baseline's
``h_k ~ A_k s + b_k``, at rank r, as input to the layer). On the tiny test CLIP (300
Adam steps, lr 3e-3, batch 32) the held-out loss is 0.0594 with the term (r = 32) and
0.0772 without it; the linear map's is 0.0619. (The same rank-r term added to the output
instead reached 0.0637; on both input and output, sharing ``V``, 0.0573, for twice the
parameters.)

Ensembles: ``ensemble`` layer stacks, each followed by the shared final LayerNorm, their
outputs averaged; members after the first start from CLIP's weights plus a small seeded
perturbation (1% of each weight matrix's standard deviation) so that they can diverge.

Initialisation from CLIP (``from_clip``, helpers in
:mod:`~sdstack.text.deprojector.clip_init`): position embeddings, the final LayerNorm, and
the ``layers`` layers ending at the clip skip's layer (layer ``L - N`` counted from 0, the
one whose output ``hidden_states[-N]`` is; for N = 1 CLIP's last layer).
"""

from __future__ import annotations

from typing import Any

import torch

from sdstack.text.clip_skip import num_layers
from sdstack.text.deprojector import DeprojectorError
from sdstack.text.deprojector.clip_init import clip_config, copy_clip_weights, init_query_term
from sdstack.text.deprojector.clip_init import clip_outputs as clip_outputs
from sdstack.text.deprojector.config import DECODER_KINDS, inverse_projection
from sdstack.text.deprojector.config import DeprojectorConfig as DeprojectorConfig
from sdstack.text.deprojector.decoding import LayerStack
from sdstack.validate import check_bool, check_int

DECODERS = DECODER_KINDS

QUERY_RANK = 32
"""The parallel decoder's default ``query_rank`` (capped at the width)."""


class Deprojector(torch.nn.Module):
    """Sentence embedding -> 77 x W hidden state (see the module docstring).

    Buffers: ``bos`` (W,), ``null`` (E,: the empty prompt's embedding), and, for
    ``embedding == "text_embeds"``, ``projection`` (E, W) and ``inverse_projection``
    (W, E) with ``pooled = e @ inverse_projection.T``.
    """

    def __init__(self, config: DeprojectorConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        width = config.width
        self.stacks = torch.nn.ModuleList(
            LayerStack(
                config.layers,
                width,
                config.heads,
                config.intermediate_size,
                config.layer_norm_eps,
                config.hidden_act,
            )
            for _ in range(config.ensemble)
        )
        self.position_embedding = torch.nn.Parameter(torch.zeros(config.positions, width))
        self.final_layer_norm = torch.nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.input_mlp: torch.nn.Sequential | None = None
        if config.input_mlp:
            self.input_mlp = torch.nn.Sequential(
                torch.nn.Linear(width, config.intermediate_size),
                torch.nn.GELU(),
                torch.nn.Linear(config.intermediate_size, width),
            )
            torch.nn.init.zeros_(self.input_mlp[2].weight)
            torch.nn.init.zeros_(self.input_mlp[2].bias)
        self.queries: torch.nn.Parameter | None = None
        if config.decoder == "parallel":
            self.queries = torch.nn.Parameter(torch.zeros(config.positions - 2, width))
        self.query_down: torch.nn.Parameter | None = None
        self.query_up: torch.nn.Parameter | None = None
        if config.query_rank:
            rank = config.query_rank
            self.query_down = torch.nn.Parameter(torch.zeros(width, rank))
            self.query_up = torch.nn.Parameter(torch.zeros(config.positions - 2, rank, width))
        self.register_buffer("bos", torch.zeros(width))
        self.register_buffer("null", torch.zeros(config.embedding_dim))
        projection, inverse = None, None  # None buffers: not in the state dict
        if config.embedding == "text_embeds":
            projection = torch.zeros(config.embedding_dim, width)
            inverse = torch.zeros(width, config.embedding_dim)
        self.register_buffer("projection", projection)
        self.register_buffer("inverse_projection", inverse)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_clip(
        cls,
        text_encoder: Any,
        tokenizer: Any,
        *,
        layers: int = 1,
        clip_skip: int = 1,
        decoder: str = "autoregressive",
        input_mlp: bool = False,
        ensemble: int = 1,
        projection: torch.Tensor | None = None,
        relative_to_null: bool = True,
        query_rank: int | None = None,
    ) -> Deprojector:
        """A deprojector initialised from ``text_encoder``'s own weights.

        Copies the position embeddings, the final LayerNorm and the ``layers`` CLIP layers
        ending at the clip skip's layer (CLIP layer ``L - N``, 0-based, whose output is
        ``hidden_states[-N]``; N = 1: the last layer) into every ensemble member; runs
        CLIP on the empty prompt for the BOS state, ``null`` and the parallel queries.

        Args:
            layers: causal layers per member (1 .. L - N + 1).
            clip_skip: N, which CLIP layer the deprojector rebuilds (1 = last).
            decoder: ``"autoregressive"`` or ``"parallel"`` (:data:`DECODERS`).
            input_mlp: a residual MLP on the input vector.
            ensemble: number of layer stacks averaged (1 .. 16).
            projection: CLIP's text projection weight (E x W, ``text_projection.weight``)
                when the input is ``text_embeds``; None: the pooled output itself.
            relative_to_null: feed ``W^-1 (e - null)`` instead of ``W^-1 e``.
            query_rank: r of the parallel decoder's ``(s V) U_k`` term (0 .. W; 0: none);
                None: ``min(QUERY_RANK, W)`` for the parallel decoder, 0 otherwise.

        Raises:
            SettingError / DeprojectorError: a setting out of range, a bad projection.
        """
        # 1. check inputs
        decoder = DECODERS.canonical(decoder)
        width = int(text_encoder.config.hidden_size)
        if query_rank is None:
            query_rank = min(QUERY_RANK, width) if decoder == "parallel" else 0
        query_rank = check_int("query_rank", query_rank, 0, width)
        total = num_layers(text_encoder)
        clip_skip = check_int("clip_skip", clip_skip, 1, total)
        usable = total - clip_skip + 1
        layers = check_int("layers", layers, 1, usable, hint=f" (clip skip {clip_skip})")
        if projection is not None and not isinstance(projection, torch.Tensor):
            raise DeprojectorError(
                f"projection must be a tensor (text_projection.weight), got "
                f"{type(projection).__name__}"
            )
        # 2. the teacher's empty prompt: null embedding, BOS state, the parallel queries
        pooled_null, states_null = clip_outputs(text_encoder, tokenizer, [""], clip_skip)
        pooled_null, states_null = pooled_null[0].float().cpu(), states_null[0].float().cpu()
        # 3. config (projection and its frozen inverse)
        inverse, condition = None, None
        if projection is not None:
            weight = projection.detach().to("cpu", torch.float64)
            inverse, condition = inverse_projection(weight, width)
        config = clip_config(
            text_encoder,
            layers=layers,
            positions=int(states_null.shape[0]),
            clip_skip=clip_skip,
            decoder=decoder,
            input_mlp=check_bool("input_mlp", input_mlp),
            ensemble=check_int("ensemble", ensemble, 1, 16),
            relative_to_null=check_bool("relative_to_null", relative_to_null),
            embedding="pooled" if projection is None else "text_embeds",
            embedding_dim=width if projection is None else int(projection.shape[0]),
            condition_number=condition,
            query_rank=query_rank,
        )
        # 4. the module, CLIP's weights copied in
        model = cls(config)
        copy_clip_weights(model, text_encoder, usable - layers, usable)
        model._init_from_empty_prompt(pooled_null, states_null, projection, inverse)
        return model

    @torch.no_grad()
    def _init_from_empty_prompt(
        self,
        pooled_null: torch.Tensor,
        states_null: torch.Tensor,
        projection: torch.Tensor | None,
        inverse: torch.Tensor | None,
    ) -> None:
        """BOS state, projection and its inverse, ``null``, the parallel queries (the
        empty prompt's states ``h_1 .. h_75``) and the query term (``U = 0``)."""
        self.bos.copy_(states_null[0])
        if projection is not None:
            self.projection.copy_(projection.detach().float().cpu())
            self.inverse_projection.copy_(inverse.float())
            self.null.copy_(self.embedding_from_pooled(pooled_null))
        else:
            self.null.copy_(pooled_null)
        if self.queries is not None:
            self.queries.copy_(states_null[1:-1])
        if self.query_up is not None:
            init_query_term(self.query_down, self.query_up)

    # -- the sentence embedding ---------------------------------------------------------

    def embed(self, text_encoder: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
        """The sentence embedding of ``texts`` as this deprojector takes it: (B, E).

        ``pooled`` (CLIP's pooled EOS state) or ``text_embeds = pooled @ projection.T``;
        float32 on this deprojector's device.
        """
        pooled, _ = clip_outputs(text_encoder, tokenizer, texts, 1)
        return self.embedding_from_pooled(pooled.to(self.bos.device, torch.float32))

    def teacher(
        self, text_encoder: Any, tokenizer: Any, texts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pairs: ``(embed(texts) (B, E), target states at the clip skip (B, 77, W))``.

        float32, on this deprojector's device.
        """
        pooled, states = clip_outputs(text_encoder, tokenizer, texts, self.config.clip_skip)
        device = self.bos.device
        embedding = self.embedding_from_pooled(pooled.to(device, torch.float32))
        return embedding, states.to(device, torch.float32)

    def embedding_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled @ projection.T`` (text_embeds), or ``pooled`` itself."""
        if self.projection is None:
            return pooled
        return pooled @ self.projection.T.to(pooled.dtype)

    def pooled_from_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        """The frozen inverse projection: ``e @ inverse_projection.T`` (or ``e`` itself)."""
        if self.inverse_projection is None:
            return embedding
        return embedding @ self.inverse_projection.T.to(embedding.dtype)

    def input_vector(self, embedding: torch.Tensor) -> torch.Tensor:
        """The embedding as the layers take it: ``s = W^-1 e`` (v1) or ``d = W^-1 (e - null)``
        (relative to null), plus ``MLP(.)`` with ``input_mlp``; shape (B, W)."""
        embedding = self._check_embedding(embedding)
        if self.config.relative_to_null:
            embedding = embedding - self.null
        vector = self.pooled_from_embedding(embedding)
        if self.input_mlp is not None:
            vector = vector + self.input_mlp(vector)
        return vector

    def _prefix(self, vector: torch.Tensor) -> torch.Tensor:
        """Slots 0 and 1 of the input sequence: ``[s, h_0 = bos]``; (B, 2, W)."""
        return torch.stack([vector, self.bos.expand(vector.shape[0], -1)], dim=1)

    # -- decoders -----------------------------------------------------------------------

    def teacher_forced(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Training output (B, 77, W): slots 2..76 fed the teacher's ``h_1..h_75``
        (parallel decoder: its one-pass prediction; ``target`` is not used)."""
        if self.queries is not None:
            return self._parallel(embedding)
        target = self._check_states(target, embedding.shape[0])
        prefix = self._prefix(self.input_vector(embedding))
        x = torch.cat([prefix, target[:, 1:-1]], dim=1) + self.position_embedding
        return self._with_bos(self._heads(x))

    def decode(self, embedding: torch.Tensor, *, cache: bool = True) -> torch.Tensor:
        """Free-running prediction (B, 77, W) from the embedding alone.

        Autoregressive: output ``k - 1`` is fed back as input slot ``k`` (k >= 2);
        ``cache=True`` keeps each layer's keys/values (the two prefix slots in one pass,
        then one position per step), ``cache=False`` re-runs the whole prefix every step
        (the original's method; equal within float rounding). The cached decode writes
        into its cache in place, so it runs without autograd (inference); differentiate
        through ``cache=False``. Parallel: one pass, ``cache`` ignored.
        """
        if self.queries is not None:
            return self._parallel(embedding)
        prefix = self._prefix(self.input_vector(embedding))
        return self._decode_cached(prefix) if cache else self._decode_naive(prefix)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``decode(embedding)``."""
        return self.decode(embedding)

    def _heads(self, x: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """Mean over ensemble members of ``final_layer_norm(stack(x))``."""
        outputs = [
            self.final_layer_norm(stack(x, None if caches is None else caches[i]))
            for i, stack in enumerate(self.stacks)
        ]
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(dim=0)

    def _with_bos(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` with position 0 replaced by the fixed BOS state."""
        bos = self.bos.to(out.dtype).expand(out.shape[0], 1, -1)
        return torch.cat([bos, out[:, 1:]], dim=1)

    def _parallel(self, embedding: torch.Tensor) -> torch.Tensor:
        """The parallel decoder: ``x_k = s + q_k + (s V) U_k`` (module docstring)."""
        vector = self.input_vector(embedding)
        rest = vector[:, None] + self.queries
        if self.query_up is not None:
            rest = rest + torch.einsum("br,krw->bkw", vector @ self.query_down, self.query_up)
        x = torch.cat([self._prefix(vector), rest], dim=1) + self.position_embedding
        return self._with_bos(self._heads(x))

    @torch.no_grad()
    def _decode_cached(self, prefix: torch.Tensor) -> torch.Tensor:
        positions = self.config.positions
        batch = prefix.shape[0]
        caches = [stack.new_caches(batch, positions, prefix) for stack in self.stacks]
        position = self.position_embedding
        previous = self._heads(prefix + position[:2], caches)[:, 1]
        outputs = [self.bos.expand(batch, -1), previous]
        for k in range(2, positions):
            x = (previous + position[k])[:, None]
            previous = self._heads(x, caches)[:, 0]
            outputs.append(previous)
        return torch.stack(outputs, dim=1)

    def _decode_naive(self, prefix: torch.Tensor) -> torch.Tensor:
        positions = self.config.positions
        batch = prefix.shape[0]
        slots = [prefix[:, 0], prefix[:, 1]]
        outputs = [self.bos.expand(batch, -1)]
        for k in range(1, positions):
            x = torch.stack(slots, dim=1) + self.position_embedding[: k + 1]
            outputs.append(self._heads(x)[:, -1])
            slots.append(outputs[-1])
        return torch.stack(outputs, dim=1)

    # -- checks -------------------------------------------------------------------------

    def _check_embedding(self, embedding: torch.Tensor) -> torch.Tensor:
        expected = self.config.embedding_dim
        if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2:
            got = getattr(embedding, "shape", type(embedding).__name__)
            raise DeprojectorError(f"embedding must be a (batch, {expected}) tensor, got {got}")
        if embedding.shape[1] != expected:
            raise DeprojectorError(
                f"embedding width {embedding.shape[1]} does not match this deprojector's "
                f"{expected} ({self.config.embedding})"
            )
        return embedding.to(self.bos.device, self.bos.dtype)

    def _check_states(self, target: torch.Tensor, batch: int) -> torch.Tensor:
        expected = (batch, self.config.positions, self.config.width)
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != expected:
            got = tuple(getattr(target, "shape", ()))
            raise DeprojectorError(f"target states must have shape {expected}, got {got}")
        return target.to(self.bos.device, self.bos.dtype)
