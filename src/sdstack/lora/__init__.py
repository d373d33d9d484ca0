"""LoRA and LyCORIS for SD 1.x: reading every common format, deltas, stacks.

``set_loras(model, [(file_or_name, w), (file, te_w, unet_w), ...])`` applies exactly that
stack through the model's patcher (``sdstack.models.patcher``); ``set_loras(model, [])``
restores the original weights bit for bit.

Names are imported on first use, so ``import sdstack.lora`` costs nothing (the prompt
parser checks LoRA tags without torch).
"""

from __future__ import annotations

from sdstack.lazy import lazy_exports

_EXPORTS = {
    "set_loras": "stack",
    "active_loras": "stack",
    "ActiveLora": "stack",
    "LoraStack": "stack",
    "LoraSpec": "spec",
    "LoraSpecError": "spec",
    "parse_lora_option": "spec",
    "LoraLibrary": "library",
    "LoraNotFoundError": "library",
    "LBW_PRESETS": "block_weights",
    "BlockWeightError": "block_weights",
    "parse_block_weights": "block_weights",
    "trained_clip_skip": "trained_clip_skip",
    "ALGORITHMS": "algorithms",
    "module_delta": "algorithms",
    "read_lora": "formats",
    "ForeignLoraError": "network",
    "LoraFile": "network",
    "LoraFileError": "network",
    "ModuleWeights": "network",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("sdstack.lora", _EXPORTS, globals())
