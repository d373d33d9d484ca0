"""Memory layout of the convolution weights: contiguous (NCHW) or channels-last (NHWC).

``use_channels_last(components)`` re-lays the 4-D weights of the UNet and VAE as
``torch.channels_last`` (``module.to(memory_format=...)``); convolutions then pick
channels-last kernels (oneDNN on CPUs, cuDNN's NHWC kernels on GPUs) and pass that layout
on to their outputs. Only the order of the numbers in memory changes: a convolution
computes the same sums, in an order its kernel chooses, so results agree with the
contiguous layout up to float rounding (a few ulps of each output), never more.

Whether it is faster depends on the device (:func:`channels_last_default`). Measured with
``bench/layout.py`` (one UNet call at 512x512, batch 2, and one 512x512 VAE decode on the
real-shape SD1.5 fixture, 2 threads, median of 3 after a warm-up; an Intel Xeon with AMX):

| call | dtype | contiguous s | channels-last s | change | max rel. diff |
|---|---|---:|---:|---:|---:|
| UNet call | fp32 | 13.58 | 14.21 | +4.7 % | 2e-6 |
| VAE decode | fp32 | 22.60 | 20.48 | -9.4 % | 2e-6 |
| UNet call | bf16 | 5.28 | 4.88 | -7.5 % | 4.6e-3 |
| VAE decode | bf16 | 14.45 | 6.85 | -52.6 % | 5.0e-3 |

(an earlier fp32 run on the same machine: UNet -3 %, decode -13 %; the UNet's fp32
difference is within run-to-run noise.) The differences are rounding of the dtype (bf16
has 8 significant bits). Channels-last is therefore the CPU default: it halves the bf16
decode, the slowest part of a CPU job after the steps. GPUs were not measured and stay
contiguous. The weight patcher (``patch_sum.sum_into``, LoRAs and merges) sums in a
weight's own memory order, so channels-last weights take patches (same values as
contiguous ones, restored bit-exactly). ``load_model(channels_last=False)`` keeps the
NCHW order. ``load_model`` re-lays the weights as it reads them
(``streaming.ConvertingReader``): one copy per tensor, the same as a dtype conversion, so
a file loaded in its own dtype is then copied rather than mapped.
"""

from __future__ import annotations

from typing import Any

from sdstack.models.components import ModelComponents

CHANNELS_LAST_BY_DEVICE: dict[str, bool] = {"cpu": True, "cuda": False, "mps": False}
"""The ``None`` default per device type: channels-last on the CPU, where it measured faster
(module docstring); contiguous on the unmeasured GPUs."""


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
