"""CLIP text side of SD1.x: prompt -> UNet conditioning, CLIP skip, emphasis, embeddings.

``PromptEncoder`` turns prompts into ``Conditioning`` exactly as the reference web UI
(A1111 v1.10) does; ``sdstack.text.clip_skip`` and ``sdstack.text.emphasis`` document the
formulas; ``sdstack.text.embeddings`` loads textual-inversion files.
"""

from sdstack.text.clip_skip import check_clip_skip, clip_skip_output, final_layer_norm
from sdstack.text.conditioning import Conditioning
from sdstack.text.embeddings import Embedding, EmbeddingLibrary, load_embedding_file
from sdstack.text.emphasis import EMPHASIS_MODES, apply_emphasis, check_emphasis
from sdstack.text.encoder import PromptEncoder, ScheduledConditioning
from sdstack.text.schedule_encoding import schedule_plan

__all__ = [
    "EMPHASIS_MODES",
    "Conditioning",
    "Embedding",
    "EmbeddingLibrary",
    "PromptEncoder",
    "ScheduledConditioning",
    "apply_emphasis",
    "check_clip_skip",
    "check_emphasis",
    "clip_skip_output",
    "final_layer_norm",
    "load_embedding_file",
    "schedule_plan",
]
