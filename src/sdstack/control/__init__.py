"""ControlNet for SD 1.x: single-file models, several units, the reference's control modes.

A :class:`ControlUnit` (module, model, image, weight, guidance start/end, resize mode,
control mode) is checked before anything loads; ``generate(model, job)`` with
``job.controls`` (or ``generate(..., controls=[...])``) finds and loads each ControlNet,
makes each control map and runs the ControlNets inside the denoising loop on the same
rows, conditioning and timestep as every UNet call (``sdstack.control.hook``).

Names are imported on first use, so ``import sdstack.control`` costs nothing.
"""

from __future__ import annotations

from sdstack.lazy import lazy_exports

_EXPORTS = {
    "ControlUnit": "unit",
    "ControlUnitError": "unit",
    "parse_control_option": "unit",
    "serialize_unit": "unit",
    "parse_unit_infotext": "unit",
    "CONTROL_MODES": "modes",
    "control_scales": "modes",
    "ControlNetHook": "hook",
    "PreparedControl": "hook",
    "ControlNetCache": "prepare",
    "prepare_controls": "prepare",
    "load_controlnet": "files",
    "identify_control_file": "files",
    "ControlNetFileError": "files",
    "LoadedControlNet": "files",
    "find_controlnet": "library",
    "open_controlnet": "library",
    "ControlNetNotFoundError": "library",
    "KnownControlModel": "names",
    "ldm_to_diffusers": "keys",
    "diffusers_to_ldm": "keys",
    "known_control_model": "names",
    "PREPROCESSORS": "preprocessors",
    "preprocess": "preprocessors",
    "RESIZE_MODES": "resize",
    "resize_control_map": "resize",
    "control_map": "images",
    "read_control_image": "images",
    "tiny_controlnet": "tiny",
    "write_tiny_controlnet": "tiny",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
