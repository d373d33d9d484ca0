"""Sampler names, schedule types and the diffusers configs they become."""

from __future__ import annotations

import importlib.util

import pytest

from sdstack.generate.params import GenerationParams, GenerationParamsError, check_inputs
from sdstack.generate.samplers import (
    SAMPLERS,
    SamplerUnavailableError,
    UnknownSamplerError,
    make_scheduler,
    resolve_sampler,
    scheduler_config,
)
from sdstack.models.components import SD1_SCHEDULER_CONFIG

REFERENCE_NAMES = [
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DDIM",
    "UniPC",
]


def test_reference_names_registered():
    assert list(SAMPLERS) == REFERENCE_NAMES


@pytest.mark.parametrize(
    ("name", "schedule", "expected"),
    [
        ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Karras", "Automatic", ("DPM++ 2M SDE", "Karras")),
        ("LMS Karras", "Automatic", ("LMS", "Karras")),
        ("DPM++ 2M Karras", "Exponential", ("DPM++ 2M", "Exponential")),
        ("euler a", "karras", ("Euler a", "Karras")),
        ("Euler", "Automatic", ("Euler", "Automatic")),
    ],
)
def test_resolve_old_and_new_names(name, schedule, expected):
    spec, resolved = resolve_sampler(name, schedule)
    assert (spec.name, resolved) == expected


def test_unknown_sampler_suggests_nearest():
    with pytest.raises(
        UnknownSamplerError,
        match=r"unknown sampler 'Eulr a'; did you mean "
        r"'Euler a', 'Euler'",
    ):
        resolve_sampler("Eulr a")


def test_unknown_schedule_type():
    with pytest.raises(
        UnknownSamplerError,
        match=r"unknown schedule type 'Karas'; did you "
        r"mean 'Karras'",
    ):
        resolve_sampler("Euler", "Karas")


@pytest.mark.parametrize(
    ("name", "schedule", "flags"),
    [
        ("DPM++ 2M", "Automatic", {"use_karras_sigmas": True}),
        ("DPM++ 2M SDE", "Automatic", {"use_exponential_sigmas": True}),
        ("Euler", "Automatic", {}),
        ("Euler", "Karras", {"use_karras_sigmas": True}),
        ("Heun", "Exponential", {"use_exponential_sigmas": True}),
    ],
)
def test_schedule_type_flags(name, schedule, flags):
    spec, schedule = resolve_sampler(name, schedule)
    config = scheduler_config(spec, schedule, SD1_SCHEDULER_CONFIG)
    for key in ("use_karras_sigmas", "use_exponential_sigmas"):
        assert config.get(key, False) == flags.get(key, False)
    assert config["timestep_spacing"] == "linspace"


def test_dpmpp_configs():
    assert (
        make_scheduler(SAMPLERS["DPM++ 2M"], "Automatic", SD1_SCHEDULER_CONFIG).config[
            "algorithm_type"
        ]
        == "dpmsolver++"
    )
    assert (
        make_scheduler(SAMPLERS["DPM++ 2M SDE"], "Automatic", SD1_SCHEDULER_CONFIG).config[
            "algorithm_type"
        ]
        == "sde-dpmsolver++"
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers vs numpy 2
def test_karras_sigmas_follow_the_formula():
    """Karras et al. rho=7 between the schedule's sigma_max and sigma_min."""
    import torch

    scheduler = make_scheduler(SAMPLERS["Euler"], "Karras", SD1_SCHEDULER_CONFIG)
    scheduler.set_timesteps(5)
    sigmas = scheduler.sigmas[:-1].double()
    lo, hi = sigmas.min(), sigmas.max()
    ramp = torch.linspace(0, 1, 5, dtype=torch.float64)
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    # diffusers evaluates the formula in float64 and stores float32: the sigmas and the
    # endpoints taken from them are each one rounding (2^-24 relative) off, and the formula
    # passes relative errors through with gain <= 1 (measured: 0.6 * 2^-24). rtol 1e-5 also
    # admits a float32 evaluation (the 7th power multiplies a few roundings by 7), while a
    # wrong rho or ramp is off by percent.
    torch.testing.assert_close(sigmas, expected, rtol=1e-5, atol=0)


def test_schedule_type_not_available():
    spec, schedule = resolve_sampler("DDIM", "Karras")
    with pytest.raises(
        SamplerUnavailableError,
        match=r"schedule type 'Karras' is not available "
        r"for sampler 'DDIM' \(diffusers DDIMScheduler\)",
    ):
        scheduler_config(spec, schedule, SD1_SCHEDULER_CONFIG)


@pytest.mark.parametrize(("name", "package"), [("LMS", "scipy"), ("DPM++ SDE", "torchsde")])
def test_missing_package_names_the_install(name, package, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda module, *args: None if module == package else real_find_spec(module, *args),
    )
    with pytest.raises(SamplerUnavailableError, match=rf"pip install {package}$"):
        make_scheduler(SAMPLERS[name], "Automatic", SD1_SCHEDULER_CONFIG)


def test_second_order_schedule_steps():
    assert SAMPLERS["Heun"].schedule_steps(20) == 40
    assert SAMPLERS["Euler a"].schedule_steps(20) == 20


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("width", 500, r"width must be a multiple of 8, got 500 \(nearest: 496 or 504\)"),
        ("height", 32, r"height must be between 64 and 4096, got 32"),
        ("width", 8192, r"width must be between 64 and 4096, got 8192"),
        ("steps", 0, r"steps must be between 1 and 1000, got 0"),
        ("seed", -2, r"seed must be between 0 and 4294967295 \(or -1 for a random seed\), got -2"),
        ("clip_skip", 13, r"clip_skip must be between 1 and 12 \(SD1 has 12 CLIP layers; .*got 13"),
        ("denoising_strength", 1.5, r"denoising_strength must be between 0 and 1, got 1.5"),
        (
            "emphasis",
            "strong",
            r"unknown emphasis mode 'strong'; expected one of: original, no-norm, "
            r"ignore, comfy",
        ),
        ("batch_size", 1.0, r"batch_size must be an integer, got 1.0"),
    ],
)
def test_check_inputs_names_field_and_value(field, value, message):
    params = GenerationParams("a cat", **{field: value})
    with pytest.raises(GenerationParamsError, match=message):
        check_inputs(params)
