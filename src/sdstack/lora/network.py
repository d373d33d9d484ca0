"""What a LoRA file holds once read: one :class:`ModuleWeights` per layer it changes.

A file is read by ``sdstack.lora.formats.read_lora`` into a :class:`LoraFile`: its
modules keyed by ``Layer.key`` (``"unet:down_blocks.1.attentions.0...attn1.to_q"``), the
file keys that matched no layer of the model, the textual-inversion embeddings bundled
in it and its metadata. ``sdstack.lora.algorithms.module_delta`` turns one module into
the weight delta of its layer. Nothing here imports torch at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdstack.errors import SdstackError

if TYPE_CHECKING:
    import torch

    from sdstack.models.key_map import Layer


class LoraFileError(SdstackError):
    """A LoRA file that cannot be used: unreadable, a tensor that does not fit its layer,
    a missing or malformed part (the message names the file, key, shape and expectation)."""


class ForeignLoraError(LoraFileError):
    """A LoRA made for another model family (SDXL, SD 2.x...) than the loaded SD 1.x model.

    ``kind`` is what the file is for ("SDXL", "SD 2.x", ...); ``evidence`` says how that
    was seen (a metadata value, key names, a tensor width).
    """

    def __init__(self, message: str, kind: str, evidence: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.evidence = evidence


@dataclass
class ModuleWeights:
    """One layer's entry in a LoRA file.

    Attributes:
        layer: the model layer it changes (``sdstack.models.key_map.Layer``).
        algorithm: a name of ``sdstack.lora.algorithms.ALGORITHMS``: "lora" (LoRA/LoCon,
            conv 3x3 and Tucker ``lora_mid`` included), "loha", "lokr", "full", "norm", "ia3".
        tensors: the algorithm's parts in the file's dtype, named as kohya/LyCORIS name
            them (``lora_down.weight``, ``lora_up.weight``, ``lora_mid.weight``,
            ``lora_up.bias``, ``hada_w1_a``..., ``lokr_w1``..., ``diff``, ``diff_b``,
            ``w_norm``, ``b_norm``, ``weight`` + ``on_input`` for IA3); PEFT's
            ``lora_A``/``lora_B`` are stored as ``lora_down``/``lora_up``.
        alpha: the ``alpha`` of the file (PEFT: from the adapter metadata, or the rank
            when the file has none); None when absent.
        scale: the delta's scale when it is not ``alpha / rank``: an explicit ``scale``
            key, or ``alpha / sqrt(rank)`` for rs-LoRA; it wins over alpha/rank.
        dora_scale: DoRA magnitudes, shaped to say the convention: ``(1, in, 1...)`` is
            normalised per input column (the reference UI, kohya), ``(out, 1, 1...)`` per
            output row (LyCORIS ``wd_on_output``, PEFT ``lora_magnitude_vector``).
        keys: the file keys it came from.
    """

    layer: Layer
    algorithm: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    scale: float | None = None
    dora_scale: torch.Tensor | None = None
    keys: tuple[str, ...] = ()

    @property
    def rank(self) -> int | None:
        """The rank that ``alpha`` divides (None for full, norm, IA3 and full-factor LoKr)."""
        from sdstack.lora.algorithms import ALGORITHMS

        return ALGORITHMS[self.algorithm].rank(self.tensors)

    @property
    def effective_scale(self) -> float:
        """The factor on the algorithm's raw product: ``scale`` if set, else ``alpha / rank``
        when both are known, else 1 (the reference UI's ``calc_scale``)."""
        if self.scale is not None:
            return self.scale
        rank = self.rank
        if self.alpha is not None and rank is not None:
            return self.alpha / rank
        return 1.0


@dataclass
class LoraFile:
    """A LoRA/LyCORIS file read for one model.

    Attributes:
        path: the file.
        name: its stem.
        metadata: the safetensors ``__metadata__`` (``{}`` for pickles).
        modules: one entry per layer, by ``Layer.key``.
        unmatched: file keys that matched no layer of the model (the caller warns once).
        embeddings: bundled textual-inversion embeddings (``bundle_emb.<name>.*``), by
            name, float32 ``[n, width]``.
        format: the naming read: "kohya", "compvis", "webui", "peft", "attn-procs" (or
            "embeddings" for a file that only bundles embeddings).
    """

    path: Path
    name: str
    metadata: dict[str, str]
    modules: dict[str, ModuleWeights]
    unmatched: tuple[str, ...] = ()
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    format: str = "kohya"

    def algorithms(self) -> dict[str, int]:
        """How many modules use each algorithm (for ``lora inspect``)."""
        counts: dict[str, int] = {}
        for module in self.modules.values():
            counts[module.algorithm] = counts.get(module.algorithm, 0) + 1
        return counts
