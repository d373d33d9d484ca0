"""Write a model in the SD1.x single-file (LDM) layout: a state dict, or a ``.safetensors`` file.

The names come from the key map's module tables (``sdstack.models.key_map.ldm``); the
tensors are the modules' own wherever no reshape is needed.
"""

from __future__ import annotations

from typing import Any

from sdstack.models.key_map.ldm import (
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    unet_key_map,
    vae_key_map,
)


def to_ldm_state_dict(components: Any) -> dict[str, Any]:
    """A single-file (LDM layout) state dict of ``components``' UNet, VAE and text encoder.

    Keys: ``model.diffusion_model.<LDM UNet key>``, ``first_stage_model.<LDM VAE key>``
    (attention projections reshaped to ``[C, C, 1, 1]``) and
    ``cond_stage_model.transformer.text_model.<CLIP text-model key>``. Tensors are shared with the
    modules where no reshape is needed (no copy).
    """
    out: dict[str, Any] = {}
    for module, prefix, key_map in (
        (components.unet, UNET_PREFIX, unet_key_map),
        (components.vae, VAE_PREFIX, vae_key_map),
    ):
        state = module.state_dict()
        for row in key_map(module):
            tensor = state[row.diffusers]
            out[prefix + row.ldm] = tensor[:, :, None, None] if row.conv1x1 else tensor
    for key, tensor in components.text_encoder.state_dict().items():
        # transformers 5 drops the ``text_model.`` level that SD1.x checkpoints carry.
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out[TEXT_PREFIX + name] = tensor
    return out


def save_single_file(
    components: Any, path: Any, *, dtype: Any = None, metadata: dict[str, str] | None = None
) -> None:
    """Write ``components`` as an SD1.x single-file ``.safetensors`` checkpoint (LDM keys).

    ``dtype`` (a ``torch.dtype``) casts floating-point tensors; ``None`` keeps them.
    The file is written next to ``path`` under a temporary name, then renamed over it
    with the mode a plain ``open()`` gives. The model's own file is never overwritten.

    Raises:
        CheckpointError: ``path`` is the file the model was loaded from.
    """
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    from sdstack.atomic_files import replace, temporary_file
    from sdstack.models.detect import CheckpointError

    source = getattr(components, "path", None)
    if source is not None and Path(path).exists() and os.path.samefile(path, source):
        raise CheckpointError(
            f"{path}: is the file this model was loaded from; save to a new file name"
        )

    state = {}
    for key, tensor in to_ldm_state_dict(components).items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.detach().contiguous()
    with temporary_file(Path(path).parent, suffix=".safetensors") as temporary:
        save_file(state, str(temporary), metadata={"format": "pt", **(metadata or {})})
        replace(temporary, path)
