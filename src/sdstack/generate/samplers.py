"""Reference sampler names mapped onto diffusers schedulers.

The reference UI (AUTOMATIC1111 v1.10) names samplers "Euler a", "DPM++ 2M", ... and,
since v1.9, writes the sigma schedule apart ("Schedule type: Karras"); older
infotexts fold it into the name ("DPM++ 2M Karras"). Each name here is a
:class:`SamplerSpec`: the diffusers scheduler class, its options, the schedule the
reference picks for "Automatic", and whether the sampler calls the denoiser twice per
step (the reference then resolves prompt schedules over ``2 * steps``).

``timestep_spacing="linspace"`` gives the same timesteps as k-diffusion's
``get_sigmas(n)`` (``linspace(999, 0, n)``) but not bit-identical sigmas: between
integer timesteps diffusers interpolates sigma linearly, k-diffusion interpolates
log-sigma. On the SD1 schedule the largest relative sigma difference is 1.7e-5 at 20
steps and 3.3e-5 at 30 steps. DDIM keeps the reference's "leading" uniform timesteps
with offset 1.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sdstack.errors import SdstackError, UnknownNameError
from sdstack.registry import Registry

SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential")
"""Schedule types: Automatic = the sampler's reference default; Uniform = the model's own."""

_SIGMA_OPTIONS = {
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
}


class UnknownSamplerError(UnknownNameError):
    """A sampler or schedule type name that is not registered (message suggests near names)."""


class SamplerUnavailableError(SdstackError):
    """A known sampler that needs a package which is not installed, or a schedule it lacks."""


@dataclass(frozen=True)
class SamplerSpec:
    """One reference sampler name and the diffusers scheduler that implements it.

    Attributes:
        name: the reference UI name ("DPM++ 2M").
        scheduler_class: the diffusers class name.
        options: extra scheduler config (``algorithm_type``, ...).
        automatic: the schedule type "Automatic" means for this sampler in the reference.
        second_order: two denoiser calls per step (reference ``second_order``).
        schedule_types: the schedule types this scheduler class can produce.
        requires: a pip package the scheduler needs, or None.
        timestep_spacing: diffusers ``timestep_spacing``.
    """

    name: str
    scheduler_class: str
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    automatic: str = "Uniform"
    second_order: bool = False
    schedule_types: tuple[str, ...] = ("Uniform", "Karras", "Exponential")
    requires: str | None = None
    timestep_spacing: str = "linspace"

    def schedule_steps(self, steps: int) -> int:
        """Steps the reference resolves prompt schedules over: ``2 * steps`` if second order."""
        return steps * 2 if self.second_order else steps


SAMPLERS: Registry[SamplerSpec] = Registry("sampler", UnknownSamplerError)
"""Reference sampler names -> :class:`SamplerSpec`, in the reference UI's order."""
SCHEDULES: Registry[str] = Registry("schedule type", UnknownSamplerError)
for _schedule in SCHEDULE_TYPES:
    SCHEDULES.register(_schedule, _schedule)


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add ``spec`` to :data:`SAMPLERS` under its name; duplicate names are an error."""
    return SAMPLERS.register(spec.name, spec)


_FIXED = ("Uniform",)
for _spec in (
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", schedule_types=_FIXED),
    SamplerSpec("Euler", "EulerDiscreteScheduler"),
    SamplerSpec("LMS", "LMSDiscreteScheduler", requires="scipy"),
    SamplerSpec("Heun", "HeunDiscreteScheduler", second_order=True),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", second_order=True),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", second_order=True),
    SamplerSpec(
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2}),
        automatic="Karras",
    ),
    SamplerSpec(
        "DPM++ SDE",
        "DPMSolverSDEScheduler",
        automatic="Karras",
        second_order=True,
        requires="torchsde",
    ),
    SamplerSpec(
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        MappingProxyType({"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        automatic="Exponential",
    ),
    SamplerSpec("DDIM", "DDIMScheduler", schedule_types=_FIXED, timestep_spacing="leading"),
    SamplerSpec("UniPC", "UniPCMultistepScheduler"),
):
    register_sampler(_spec)


def _lookup(name: str) -> SamplerSpec | None:
    return SAMPLERS.get(name) if name in SAMPLERS else None


def resolve_sampler(name: str, schedule_type: str = "Automatic") -> tuple[SamplerSpec, str]:
    """Reference name lookup: exact, then ignoring case/spaces, then old "<name> Karras"
    forms.

    Returns ``(spec, schedule_type)`` where ``schedule_type`` is what the user asked for
    (``"Automatic"`` stays ``"Automatic"``; a suffix such as " Karras" in an old combined
    name sets it when the given one is Automatic).

    Raises:
        UnknownSamplerError: unknown sampler or schedule type, naming the nearest names.
    """
    if not isinstance(name, str) or not isinstance(schedule_type, str):
        raise UnknownSamplerError(
            f"sampler and schedule type must be names, got {name!r} and {schedule_type!r}"
        )
    schedule = SCHEDULES.canonical(schedule_type)
    spec = _lookup(name)
    if spec is None:
        for suffix in ("Karras", "Exponential"):
            if name.strip().lower().endswith(" " + suffix.lower()):
                spec = _lookup(name.strip()[: -len(suffix) - 1])
                if spec is not None and schedule == "Automatic":
                    schedule = suffix
                break
    if spec is None:
        raise UnknownSamplerError(SAMPLERS.unknown_message(name))
    return spec, schedule


def effective_schedule(spec: SamplerSpec, schedule_type: str) -> str:
    """The sigma schedule actually used: Automatic -> the sampler's reference default."""
    return spec.automatic if schedule_type == "Automatic" else schedule_type


def scheduler_config(
    spec: SamplerSpec, schedule_type: str, base_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The diffusers config for ``spec``: the model's noise schedule + sampler options.

    Raises:
        SamplerUnavailableError: the schedule type is not available for this sampler.
    """
    schedule = effective_schedule(spec, schedule_type)
    if schedule not in spec.schedule_types:
        raise SamplerUnavailableError(
            f"schedule type {schedule_type!r} is not available for sampler {spec.name!r} "
            f"(diffusers {spec.scheduler_class}); use one of: Automatic, "
            + ", ".join(spec.schedule_types)
        )
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(spec.options)
    config.update(_SIGMA_OPTIONS[schedule])
    config["timestep_spacing"] = spec.timestep_spacing
    return config


def make_scheduler(spec: SamplerSpec, schedule_type: str, base_config: Mapping[str, Any]) -> Any:
    """A fresh diffusers scheduler for one sampling run (schedulers keep per-run state).

    Raises:
        SamplerUnavailableError: the scheduler needs a package that is not installed.
    """
    if spec.requires is not None and importlib.util.find_spec(spec.requires) is None:
        raise SamplerUnavailableError(
            f"sampler {spec.name!r} needs the {spec.requires!r} package, which is not "
            f"installed: pip install {spec.requires}"
        )
    import diffusers

    cls = getattr(diffusers, spec.scheduler_class)
    return cls.from_config(scheduler_config(spec, schedule_type, base_config))


def sampler_table() -> list[tuple[str, str, str, str]]:
    """Rows (name, diffusers class, Automatic schedule, schedule types) for docs and --help."""
    return [
        (s.name, s.scheduler_class, s.automatic, ", ".join(s.schedule_types))
        for s in SAMPLERS.values()
    ]
