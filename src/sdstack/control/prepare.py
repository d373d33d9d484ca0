"""Units -> ready ControlNets: find and load each model once, make each control map.

For a job of ``width x height`` pixels, each checked unit's ControlNet is found (a file,
or a name under ``models/ControlNet``), loaded onto the UNet's device and dtype (two
units naming one file share one model), and checked against the UNet (same
cross-attention width and block channels). Its control image is read, preprocessed
with the unit's module and resized with its resize mode to the job's size, then made a
``(1, 3, H, W)`` tensor in [0, 1] (``sdstack.control.images``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sdstack.control.hook import ControlNetHook, PreparedControl
from sdstack.control.unit import ControlUnit, ControlUnitError, serialize_unit


class ControlNetMismatchError(ControlUnitError):
    """A ControlNet whose shapes do not fit the UNet it is used with."""


def check_units(units: Sequence[ControlUnit], *, root: Any = None) -> list[ControlUnit]:
    """Every unit checked (ranges, names) and its ControlNet found, before anything loads.

    Raises:
        ControlUnitError, UnknownNameError: a bad setting, module or mode.
        ControlNetNotFoundError: a model that cannot be found.
    """
    from sdstack.control.library import find_controlnet

    checked = []
    for index, unit in enumerate(units):
        unit = unit.checked(f"ControlNet unit {index}")
        find_controlnet(unit.model, root=root)
        checked.append(unit)
    return checked


def _check_fits(loaded: Any, unet: Any) -> None:
    control, target = loaded.model.config, unet.config
    mine = (control.cross_attention_dim, tuple(control.block_out_channels))
    theirs = (target.cross_attention_dim, tuple(target.block_out_channels))
    if mine != theirs:
        raise ControlNetMismatchError(
            f"ControlNet {loaded.name!r} is for a UNet with cross-attention width {mine[0]} "
            f"and block channels {list(mine[1])}, but the model has {theirs[0]} and "
            f"{list(theirs[1])}: use a ControlNet made for this model's base (SD 1.x)"
        )


class ControlNetCache:
    """Loaded ControlNets by file, so that grids and repeated jobs load each once."""

    def __init__(self) -> None:
        self._models: dict[tuple[Path, Any, Any], Any] = {}

    def load(self, path: Path, unet: Any) -> Any:
        """The ``LoadedControlNet`` of ``path`` on ``unet``'s device and dtype."""
        from sdstack.control.files import load_controlnet

        key = (Path(path).resolve(), str(unet.device), unet.dtype)
        if key not in self._models:
            loaded = load_controlnet(path, device=unet.device, dtype=unet.dtype)
            _check_fits(loaded, unet)
            self._models[key] = loaded
        return self._models[key]


def prepare_controls(
    units: Sequence[ControlUnit],
    components: Any,
    width: int,
    height: int,
    *,
    root: Any = None,
    cache: ControlNetCache | None = None,
) -> list[PreparedControl]:
    """Checked units -> :class:`PreparedControl` list (see the module doc).

    Raises:
        ControlUnitError: a unit without an image.
        ControlImageError: an image that cannot be read.
        ControlNetFileError, ControlNetMismatchError: a model that cannot be used.
    """
    from sdstack.control.images import control_map, control_tensor
    from sdstack.control.library import find_controlnet

    cache = cache if cache is not None else ControlNetCache()
    unet = components.unet
    prepared = []
    for index, unit in enumerate(units):
        if unit.image is None:
            raise ControlUnitError(
                f"ControlNet unit {index} ({unit.module}, {unit.model}) has no control image; "
                "an infotext does not carry it: pass it with --control-image"
            )
        loaded = cache.load(find_controlnet(unit.model, root=root), unet)
        control = control_map(
            unit.image,
            module=unit.module,
            width=width,
            height=height,
            resize_mode=unit.resize_mode,
            resolution=unit.processor_res if unit.processor_res > 0 else 512,
            threshold_a=None if unit.threshold_a == -1 else unit.threshold_a,
            threshold_b=None if unit.threshold_b == -1 else unit.threshold_b,
        )
        hint = control_tensor(control).to(device=unet.device, dtype=unet.dtype)
        known = getattr(loaded, "known", None)
        pooling = bool(getattr(known, "global_average_pooling", False))
        label = f"{loaded.name} [{loaded.short_hash}]"
        prepared.append(PreparedControl(unit, loaded.model, hint, label, pooling))
    return prepared


def control_fields(controls: Sequence[PreparedControl]) -> dict[str, str]:
    """The infotext's ``ControlNet {i}`` fields, one per unit, in order; modules by their
    reference names (``scribble_xdog``, ``tile_resample``), which read back as aliases."""
    from sdstack.control.preprocessors import PREPROCESSORS

    fields = {}
    for index, control in enumerate(controls):
        unit = dataclasses.replace(
            control.unit, module=PREPROCESSORS[control.unit.module].reference
        )
        fields[f"ControlNet {index}"] = serialize_unit(unit, control.label)
    return fields


def job_control_hooks(
    components: Any,
    params: Any,
    controls: Sequence[ControlUnit],
    *,
    steps: int,
    calls: int,
    options: Mapping[str, Any] | None = None,
) -> tuple[tuple[ControlNetHook, ...], dict[str, str]]:
    """The hook of a job's units and their infotext fields; ``((), {})`` with no units.

    ``params`` gives the pixel size; ``options`` may hold ``root`` and ``cache`` (see
    :func:`prepare_controls`).
    """
    if not controls:
        return (), {}
    options = dict(options or {})
    units = check_units(controls, root=options.get("root"))
    prepared = prepare_controls(units, components, params.width, params.height, **options)
    return (control_hook(prepared, steps=steps, calls=calls),), control_fields(prepared)


def control_hook(controls: Sequence[PreparedControl], *, steps: int, calls: int) -> ControlNetHook:
    """The UNet hook applying ``controls`` over a run of ``steps`` steps, ``calls`` calls."""
    return ControlNetHook(controls, steps=steps, calls=calls)
