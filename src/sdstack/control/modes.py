"""The reference ControlNet extension's control modes and the residual scales they give.

sd-webui-controlnet (``scripts/enums.py`` ``ControlMode``, ``scripts/hook.py``) has three
modes; two flags follow from the mode:

- ``soft_injection = mode != "Balanced"`` and ``cfg_injection = mode == "ControlNet is
  more important"``.
- Scales of the 13 SD1 ControlNet outputs (12 skip residuals after input blocks 0..11,
  then the middle block): Balanced ``[w] * 13``; with soft injection
  ``w * 0.825 ** (12 - i)`` for output ``i`` (0.0994 w for the first skip, 0.825 w for
  the deepest, w for the middle block).
- With cfg injection each output is multiplied by the row's ``cond_mark`` (1 for prompt
  rows, 0 for negative-prompt rows), so the negative prompt's prediction gets no
  residual: guidance then pushes towards the control. Balanced and "My prompt is more
  important" add to every row.

So "My prompt is more important" is soft injection on both sides, and "ControlNet is more
important" is soft injection on the prompt rows only. (diffusers' ``guess_mode`` is a
different formula: ``logspace(-1, 0, 13)`` scales, cond rows only.)
"""

from __future__ import annotations

from dataclasses import dataclass

from sdstack.errors import UnknownNameError
from sdstack.registry import Registry

SD1_CONTROL_OUTPUTS = 13
"""12 skip residuals (``zero_convs``) + the middle block's (``middle_block_out``)."""
SOFT_INJECTION_BASE = 0.825


class UnknownControlModeError(UnknownNameError):
    """A control mode name that is none of the reference's three."""


@dataclass(frozen=True)
class ControlMode:
    """One control mode: its reference name and the two injection flags."""

    name: str
    soft_injection: bool
    cfg_injection: bool


BALANCED = ControlMode("Balanced", soft_injection=False, cfg_injection=False)
PROMPT_MORE_IMPORTANT = ControlMode(
    "My prompt is more important", soft_injection=True, cfg_injection=False
)
CONTROLNET_MORE_IMPORTANT = ControlMode(
    "ControlNet is more important", soft_injection=True, cfg_injection=True
)

CONTROL_MODES: Registry[ControlMode] = Registry("control mode", UnknownControlModeError)
CONTROL_MODES.register(BALANCED.name, BALANCED, aliases=("0",))
CONTROL_MODES.register(PROMPT_MORE_IMPORTANT.name, PROMPT_MORE_IMPORTANT, aliases=("1", "prompt"))
CONTROL_MODES.register(
    CONTROLNET_MORE_IMPORTANT.name, CONTROLNET_MORE_IMPORTANT, aliases=("2", "controlnet")
)


def control_mode(name: str | int) -> ControlMode:
    """The mode named ``name`` (the reference's names, case and spacing free; ``0``, ``1``,
    ``2`` as the extension's API accepts; ``prompt``, ``controlnet`` for short).

    Raises:
        UnknownControlModeError: any other name, with the nearest valid ones.
    """
    return CONTROL_MODES[str(name)]


def control_scales(
    mode: ControlMode, weight: float, outputs: int = SD1_CONTROL_OUTPUTS
) -> list[float]:
    """Per-output residual scales: ``[w] * n`` (Balanced) or ``w * 0.825 ** (n - 1 - i)``
    (soft injection), output ``i`` counted from the first skip residual, the middle
    block's last."""
    if not mode.soft_injection:
        return [float(weight)] * outputs
    return [float(weight) * SOFT_INJECTION_BASE ** (outputs - 1 - i) for i in range(outputs)]
