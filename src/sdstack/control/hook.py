"""The ControlNet UNet hook: residuals from the very rows and conditioning the UNet sees.

For every UNet call of the denoising loop (``sdstack.generate.hooks.UNetCall``) and
every unit active at that step, the ControlNet runs on the call's own ``sample`` rows,
``timestep`` and ``encoder_hidden_states``: the per-step prompt schedule entry, all
75-token chunks, every AND part and the negative prompt, as the UNet gets them. Its 13
outputs ``r_i`` (12 skip residuals, then the middle block's) are scaled and summed over
units (reference ``scripts/hook.py``):

``R_i = sum_units mask * s_i(mode, w) * r_i``

with ``s_i`` from :func:`sdstack.control.modes.control_scales` and ``mask`` 1 on every
row, except with cfg injection ("ControlNet is more important"), where it is 0 on the
negative prompt's rows. Those rows are then not run through the ControlNet at all (the
reference runs and multiplies by 0: the result is the same, the work half). Models with
global average pooling (v1.1 shuffle) average each output over height and width.
``R_0..R_11`` go to the UNet as ``down_block_additional_residuals`` and ``R_12`` as
``mid_block_additional_residual``, added to what an earlier hook put there.

Guidance schedule (reference ``guidance_schedule_handler``): a unit acts at a call when
``start <= step / steps <= end``, both bounds inclusive, where ``steps`` are the sampler
steps of the run and ``step`` the sampler step of the call (the denoiser call index for
first-order samplers; for Heun/DPM2-type samplers ``floor(call * steps / calls)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sdstack.control.modes import control_mode, control_scales
from sdstack.control.unit import ControlUnit
from sdstack.generate.hooks import ROW_UNCOND, UNetCall

DOWN_KEY = "down_block_additional_residuals"
MID_KEY = "mid_block_additional_residual"


@dataclass
class PreparedControl:
    """A unit ready to run: its ControlNet and its control image as a tensor.

    Attributes:
        unit: the checked unit (canonical names).
        model: ``diffusers.ControlNetModel`` on the UNet's device and dtype.
        hint: the control map ``(1, 3, H, W)`` in [0, 1] at the job's pixel size.
        label: the infotext's Model value (``name [hash]``).
        global_pooling: average each residual over height and width (v1.1 shuffle).
    """

    unit: ControlUnit
    model: Any
    hint: torch.Tensor
    label: str = ""
    global_pooling: bool = False

    def scales(self, outputs: int) -> list[float]:
        """Per-output scales of the unit's mode and weight (13 outputs on SD1)."""
        return control_scales(control_mode(self.unit.control_mode), self.unit.weight, outputs)

    @property
    def cond_rows_only(self) -> bool:
        """cfg injection: the negative prompt's rows get no residual."""
        return control_mode(self.unit.control_mode).cfg_injection


def sampler_step(call_index: int, calls: int, steps: int) -> int:
    """The sampler step of denoiser call ``call_index`` of ``calls`` over ``steps`` steps."""
    if calls <= steps:
        return call_index
    return call_index * steps // calls


def control_residuals(
    control: PreparedControl, call: UNetCall
) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """One unit's scaled residuals for ``call`` (all rows; zero on masked rows), or None
    when cfg injection leaves no row to act on."""
    rows = torch.arange(call.sample.shape[0], device=call.sample.device)
    if control.cond_rows_only:
        keep = [i for i, kind in enumerate(call.row_kinds) if kind != ROW_UNCOND]
        if not keep:
            return None
        rows = torch.tensor(keep, device=call.sample.device)
    subset = len(rows) != call.sample.shape[0]
    sample = call.sample[rows] if subset else call.sample
    states = call.encoder_hidden_states[rows] if subset else call.encoder_hidden_states
    hint = control.hint.to(device=sample.device, dtype=sample.dtype)
    down, mid = control.model(
        sample,
        call.timestep,
        encoder_hidden_states=states,
        controlnet_cond=hint.expand(sample.shape[0], -1, -1, -1),
        conditioning_scale=1.0,
        return_dict=False,
    )
    outputs = [*down, mid]
    scaled = []
    for output, scale in zip(outputs, control.scales(len(outputs)), strict=True):
        if control.global_pooling:
            output = output.mean(dim=(2, 3), keepdim=True)
        output = output * scale
        if subset:
            full = output.new_zeros((call.sample.shape[0], *output.shape[1:]))
            full[rows] = output
            output = full
        scaled.append(output)
    return scaled[:-1], scaled[-1]


class ControlNetHook:
    """A :data:`~sdstack.generate.hooks.UNetHook` adding the units' residuals to each call.

    Args:
        controls: the prepared units, in order.
        steps: sampler steps of the run; calls: denoiser calls of the run (as the
            pipeline's ``calls_per_batch``).
    """

    def __init__(self, controls: Sequence[PreparedControl], *, steps: int, calls: int) -> None:
        self.controls = list(controls)
        self.steps = max(int(steps), 1)
        self.calls = max(int(calls), 1)

    def active(self, call_index: int) -> list[PreparedControl]:
        """The units acting at denoiser call ``call_index``."""
        fraction = sampler_step(call_index, self.calls, self.steps) / self.steps
        return [c for c in self.controls if c.unit.active_at(fraction)]

    def __call__(self, call: UNetCall) -> UNetCall:
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for control in self.active(call.step):
            result = control_residuals(control, call)
            if result is None:
                continue
            if down is None:
                down, mid = result
            else:
                down = [a + b for a, b in zip(down, result[0], strict=True)]
                mid = mid + result[1]
        if down is None:
            return call
        kwargs = dict(call.unet_kwargs)
        if DOWN_KEY in kwargs:
            down = [a + b for a, b in zip(kwargs[DOWN_KEY], down, strict=True)]
        if MID_KEY in kwargs:
            mid = kwargs[MID_KEY] + mid
        kwargs[DOWN_KEY] = tuple(down)
        kwargs[MID_KEY] = mid
        return dataclasses.replace(call, unet_kwargs=kwargs)
