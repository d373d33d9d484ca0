"""Memory layout of the convolution weights: contiguous (NCHW) or channels-last (NHWC).

``use_channels_last(components)`` re-lays the 4-D weights of the UNet and VAE as
``torch.channels_last`` (``module.to(memory_format=...)``); convolutions then pick
channels-last kernels (oneDNN on CPUs, cuDNN's NHWC kernels on GPUs) and pass that layout
on to their outputs. Only the order of the numbers in memory changes: a convolution
computes the same sums, in an order its kernel chooses, so results agree with the
contiguous layout up to float rounding (a few ulps of each output), never more.

Whether it is faster depends on the device (:func:`channels_last_default`), measured with
one UNet call (512x512, batch 2) and one VAE decode (512x512) in fp32 on the real-shape
SD1.5 fixture, 2 threads, means of 2 after a warm-up (max relative difference of the
outputs 3.7e-6 and 4.3e-6: float32 rounding):

- contiguous: UNet call 11.64 s, decode 19.49 s;
- channels-last weights: UNet call 11.26 s (-3 %), decode 16.91 s (-13 %);
- channels-last weights and input: 11.46 s, 17.22 s.

Channels-last measured faster on the CPU. The weight patcher (``patch_sum.sum_into``,
LoRAs and merges) now sums in a weight's own memory order, so channels-last weights take
patches (same values as contiguous ones, restored bit-exactly). The default stays
contiguous until the layout is measured again with bf16 compute (issue 14); pass
``channels_last=True`` to ``load_model`` to use it now.
``load_model`` re-lays the weights as it reads them
(``streaming.ConvertingReader``): one copy per tensor, the same as a dtype conversion, so
a file loaded in its own dtype is then copied rather than mapped.
"""

from __future__ import annotations

from typing import Any

from sdstack.models.components import ModelComponents

CHANNELS_LAST_BY_DEVICE: dict[str, bool] = {"cpu": False, "cuda": False, "mps": False}
"""The ``None`` default per device type (False everywhere until the layout is measured
with bf16 compute; the CPU measured faster with it in fp32, see the module docstring)."""


def channels_last_default(device: Any) -> bool:
    """The measured default for ``device`` (a ``torch.device`` or its name); False when the
    device type was never measured."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    return CHANNELS_LAST_BY_DEVICE.get(kind, False)


def _device_of(module: Any) -> Any:
    return next(module.parameters()).device


def use_channels_last(components: ModelComponents, enabled: bool | None = True) -> ModelComponents:
    """Put the UNet and VAE convolution weights in channels-last order (``enabled``), or
    back in contiguous order (False); None = :func:`channels_last_default` for the UNet's
    device. The text encoder has no 4-D weights and is left alone. Applied patches
    (LoRAs) are taken off and put back, as ``ModelComponents.to`` does.

    Returns:
        ``components``, changed in place.
    """
    import torch

    if enabled is None:
        enabled = channels_last_default(_device_of(components.unet))
    layout = torch.channels_last if enabled else torch.contiguous_format
    if all(_has_layout(module, layout) for module in (components.unet, components.vae)):
        return components
    return components.to(memory_format=layout, modules=("unet", "vae"))


def _has_layout(module: Any, layout: Any) -> bool:
    """Every 4-D parameter of ``module`` already laid out as ``layout``."""
    return all(p.is_contiguous(memory_format=layout) for p in module.parameters() if p.dim() == 4)
