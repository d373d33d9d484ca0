"""A ControlNet unit as the reference extension describes it, its option form and infotext.

A unit is one ControlNet applied to one job: preprocessor ``module``, ControlNet
``model``, control ``image``, ``weight``, guidance start/end (fractions of the steps),
resize mode and control mode (sd-webui-controlnet ``internal_controlnet/args.py``):

- ``weight`` in [0, 2] (default 1), ``0 <= guidance_start <= guidance_end <= 1``
  (defaults 0 and 1); resize mode default "Crop and Resize", control mode "Balanced".
- Infotext (``ControlNetUnit.serialize``): ``ControlNet {i}`` for the i-th unit, the value
  ``Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode:
  Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance
  Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced`` (field order
  of the reference; names are the attribute words capitalised; the whole value is
  quoted by the infotext writer). Reading splits on ``,`` then on ``": "``; values
  ``True``/``False`` are booleans, else int, else float, else text; keys map back by
  lower case and ``_``. Fields the reference writes that sdstack does not use (``Low
  Vram``, ``Save Detected Map``, ...) are ignored. The control image is not in the
  infotext.

This module does not import torch: units are checked before any model loads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstack.control.modes import control_mode
from sdstack.errors import SdstackError
from sdstack.validate import check_number

INFOTEXT_FIELDS = (
    "module",
    "model",
    "weight",
    "resize_mode",
    "processor_res",
    "threshold_a",
    "threshold_b",
    "guidance_start",
    "guidance_end",
    "pixel_perfect",
    "control_mode",
)
"""The reference's serialisation order (``ControlNetUnit.infotext_fields``)."""
MAX_WEIGHT = 2.0
MAX_PROCESSOR_RES = 2048
UNSET = -1
"""The reference's "not set" for processor resolution and thresholds: :meth:`ControlUnit.checked`
puts the module's defaults there (512, and e.g. canny's 100 and 200), as the reference's
UI fills its sliders, so the infotext records the values used."""
DEFAULT_PROCESSOR_RES = 512


class ControlUnitError(SdstackError):
    """A ControlNet unit setting or ``--control`` value that cannot be used."""


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit (reference ``ControlNetUnit``), checked by :meth:`checked`.

    Attributes:
        module: the preprocessor (``none``, ``canny``, ``invert``, ...).
        model: the ControlNet: a file, or a name under ``models/ControlNet``
            (``control_v11p_sd15_canny`` or the reference's ``name [hash]`` label).
        image: the control image (a path or a PIL image); None until supplied (an infotext
            does not carry it).
        weight: residual multiplier, 0..2.
        guidance_start, guidance_end: the unit acts at sampler steps whose fraction of the
            run ``pct = step / steps`` has ``start <= pct <= end``.
        resize_mode: "Just Resize", "Crop and Resize" or "Resize and Fill".
        control_mode: "Balanced", "My prompt is more important", "ControlNet is more
            important" (see ``sdstack.control.modes``).
        processor_res, threshold_a, threshold_b: preprocessor settings; ``-1`` means the
            module's default.
        pixel_perfect: recorded for the infotext (sdstack preprocesses at
            ``processor_res``).
    """

    module: str = "none"
    model: str = ""
    image: Any = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    resize_mode: str = "Crop and Resize"
    control_mode: str = "Balanced"
    processor_res: int = UNSET
    threshold_a: float = UNSET
    threshold_b: float = UNSET
    pixel_perfect: bool = False

    def checked(self, what: str = "ControlNet unit") -> ControlUnit:
        """This unit with canonical names and every setting range-checked.

        Raises:
            ControlUnitError: a value out of range, start after end, no model; with
                ``what`` (e.g. ``--control 1``) naming the unit.
            PreprocessorError: a threshold out of the module's range.
            PreprocessorUnavailableError: a reference module that needs weights.
            UnknownNameError: an unknown module, resize mode or control mode.
        """
        from sdstack.control.preprocessors import PREPROCESSORS, check_threshold
        from sdstack.control.resize import resize_mode_name

        try:
            weight = check_number(f"{what} weight", self.weight, 0.0, MAX_WEIGHT)
            start = check_number(f"{what} guidance start", self.guidance_start, 0.0, 1.0)
            end = check_number(f"{what} guidance end", self.guidance_end, 0.0, 1.0)
            res = self.processor_res
            if res != UNSET:
                res = int(check_number(f"{what} processor res", res, 64, MAX_PROCESSOR_RES))
        except SdstackError as error:
            raise ControlUnitError(str(error)) from error
        if start > end:
            raise ControlUnitError(
                f"{what}: guidance start {start:g} is after guidance end {end:g}; "
                "expected 0 <= start <= end <= 1"
            )
        if not str(self.model).strip():
            raise ControlUnitError(f"{what}: no ControlNet model given")
        for name in ("threshold_a", "threshold_b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ControlUnitError(f"{what} {name.replace('_', ' ')} must be a number")
            if not math.isfinite(float(value)):
                raise ControlUnitError(f"{what} {name.replace('_', ' ')} must be finite")
        module = PREPROCESSORS[self.module]
        for which in ("a", "b"):
            check_threshold(module, which, getattr(self, f"threshold_{which}"))
        if res == UNSET and module.uses_resolution:
            res = DEFAULT_PROCESSOR_RES
        thresholds = {
            name: slider.default
            for name, slider in (
                ("threshold_a", module.threshold_a),
                ("threshold_b", module.threshold_b),
            )
            if slider is not None and getattr(self, name) == UNSET
        }
        return dataclasses.replace(
            self,
            **thresholds,
            module=module.name,
            weight=weight,
            guidance_start=start,
            guidance_end=end,
            resize_mode=resize_mode_name(self.resize_mode),
            control_mode=control_mode(self.control_mode).name,
            processor_res=res,
        )

    def active_at(self, fraction: float) -> bool:
        """Reference guidance schedule: the unit acts when ``start <= fraction <= end``."""
        return self.guidance_start <= fraction <= self.guidance_end


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def parse_control_option(text: str, *, what: str = "--control") -> ControlUnit:
    """``MODULE:MODEL:IMAGE[:WEIGHT[:START:END]]`` -> an unchecked :class:`ControlUnit`.

    The image may contain ``:`` (a Windows drive): trailing numbers after the third field
    are read from the right, as the weight or the weight with start and end. An empty
    IMAGE leaves the image to ``--control-image`` (with ``--from-infotext``).

    Raises:
        ControlUnitError: fewer than three fields, or two trailing numbers.
    """
    parts = text.split(":")
    if len(parts) < 3 or not parts[0].strip() or not parts[1].strip():
        raise ControlUnitError(
            f"{what} {text!r}: expected MODULE:MODEL:IMAGE[:WEIGHT[:START:END]], e.g. "
            "canny:control_v11p_sd15_canny:photo.png:0.8"
        )
    module, model, rest = parts[0].strip(), parts[1].strip(), parts[2:]
    numbers: list[float] = []
    while len(rest) > 1 and len(numbers) < 3 and _is_number(rest[-1]):
        numbers.insert(0, float(rest.pop()))
    if len(numbers) == 2:
        raise ControlUnitError(
            f"{what} {text!r}: give the weight alone or weight:start:end, not two numbers"
        )
    settings: dict[str, Any] = {}
    if numbers:
        settings["weight"] = numbers[0]
    if len(numbers) == 3:
        settings.update(guidance_start=numbers[1], guidance_end=numbers[2])
    image = ":".join(rest).strip()
    return ControlUnit(module=module, model=model, image=image or None, **settings)


def format_number(value: Any) -> str:
    """An infotext number: integral values without ``.0`` (``1``, ``200``), else ``repr``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def display_name(field: str) -> str:
    """``resize_mode`` -> ``Resize Mode`` (each ``_``-separated word capitalised)."""
    return " ".join(word.capitalize() for word in field.split("_"))


def serialize_unit(unit: ControlUnit, model_label: str) -> str:
    """The reference's ``ControlNet {i}`` infotext value of ``unit`` (see module doc);
    ``model_label`` is what the Model field shows (``name [hash]``).

    Raises:
        ControlUnitError: a value holding ``,`` or ``:`` (the reference then writes
            nothing; sdstack refuses so that no image is made without its record).
    """
    values = {**dataclasses.asdict(unit), "model": model_label}
    items = []
    for field in INFOTEXT_FIELDS:
        text = format_number(values[field])
        if "," in text or ":" in text:
            raise ControlUnitError(
                f"ControlNet {field.replace('_', ' ')} {text!r} holds ',' or ':', which the "
                "reference infotext cannot record; rename the file"
            )
        items.append(f"{display_name(field)}: {text}")
    return ", ".join(items)


def _infotext_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_unit_infotext(value: str, *, field: str = "ControlNet 0") -> ControlUnit:
    """A ``ControlNet {i}`` infotext value -> an unchecked :class:`ControlUnit` (no image).

    Raises:
        ControlUnitError: an item that is not ``Name: value``, or no Model.
    """
    known = {f.name for f in dataclasses.fields(ControlUnit)}
    settings: dict[str, Any] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        name, sep, text = item.strip().partition(": ")
        if not sep:
            raise ControlUnitError(f"infotext {field}: item {item.strip()!r} is not 'Name: value'")
        key = name.strip().lower().replace(" ", "_")
        if key in known and key != "image":
            settings[key] = _infotext_value(text.strip())
    if "model" not in settings:
        raise ControlUnitError(f"infotext {field}: no Model in {value!r}")
    settings["model"] = str(settings["model"])
    settings["module"] = str(settings.get("module", "none"))
    return ControlUnit(**settings)


def units_from_infotext(info: Mapping[str, str]) -> list[ControlUnit]:
    """The ``ControlNet 0``, ``ControlNet 1``, ... fields of a parsed infotext, in order."""
    indices = sorted(
        int(key.split()[1])
        for key in info
        if key.startswith("ControlNet ") and key.split()[1:2] and key.split()[1].isdigit()
    )
    return [parse_unit_infotext(info[f"ControlNet {i}"], field=f"ControlNet {i}") for i in indices]


def with_image(unit: ControlUnit, image: str | Path | Any) -> ControlUnit:
    """``unit`` with its control image set."""
    return dataclasses.replace(unit, image=image)
