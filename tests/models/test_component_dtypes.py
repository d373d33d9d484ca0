"""A dtype per network: ``load_model(dtype="auto" | ComponentDtypes)``, tensor-by-tensor
conversion without a float32 copy, mixed-dtype generation against float32, and the
channels-last layout against the contiguous one."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdstack.generate import GenerationParams, generate
from sdstack.models import load_model
from sdstack.models.layout import channels_last_default, use_channels_last
from sdstack.models.ldm_file import save_single_file
from sdstack.models.precision import ComponentDtypes, resolve_dtypes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
UNIT = {FP32: 2.0**-24, FP16: 2.0**-11, BF16: 2.0**-8}
"""Unit roundoff of each dtype (half the distance from 1 to the next number)."""
FORWARD_UNITS = 32
"""Elementwise error of one forward of a tiny network in dtype ``d``, in units of
``UNIT[d] * max|output|``. Measured against float64 on the tiny models: UNet 3.3 (bf16,
fp16) and 18 (fp32), VAE decode 10 (bf16, fp16) and 34 (fp32); the float32 error is 2^16
times smaller than the half-precision one, so a bound for bf16/fp16 against float32 is
the half-precision term; 32 leaves a factor of 3 over the largest measured."""
MIXED = [
    ComponentDtypes(BF16, FP32, BF16),  # auto on a CPU with native bf16
    ComponentDtypes(FP32, FP32, BF16),
    ComponentDtypes(BF16, FP32, FP32),
    ComponentDtypes(FP16, FP16, FP32),  # auto on CUDA / MPS
    ComponentDtypes(BF16, BF16, BF16),
]


def states_as(module, dtype):
    return {k: v.to(dtype) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def half_file(tiny_components, tiny_checkpoint, tmp_path_factory):
    """The tiny model saved in fp16 (as most SD1.5 files are), with its config folder."""
    checkpoint = tmp_path_factory.mktemp("half") / "tiny-fp16.safetensors"
    save_single_file(tiny_components, checkpoint, dtype=FP16)
    return checkpoint, tiny_checkpoint[1]


@pytest.mark.parametrize("dtypes", MIXED[:3])
def test_each_network_loads_in_its_own_dtype(tiny_components, tiny_checkpoint, dtypes):
    checkpoint, config = tiny_checkpoint
    model = load_model(checkpoint, config_dir=config, dtype=dtypes)
    assert model.dtypes == dtypes
    for part in ("unet", "text_encoder", "vae"):
        want = states_as(getattr(tiny_components, part), getattr(dtypes, part))
        got = getattr(model, part).state_dict()
        assert {k: v.dtype for k, v in got.items() if v.is_floating_point()} == {
            k: getattr(dtypes, part) for k, v in want.items() if v.is_floating_point()
        }
        # A cast, not a computation: exactly the reference tensors rounded once.
        assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.mark.parametrize(
    ("native", "expected"),
    [(True, ComponentDtypes(BF16, FP32, BF16)), (False, ComponentDtypes.uniform(FP32))],
)
def test_auto_follows_the_cpu_probe(tiny_checkpoint, monkeypatch, native, expected):
    monkeypatch.delenv("SDSTACK_CPU_BF16")  # conftest pins it; the probe decides
    monkeypatch.setattr("sdstack.models.precision.cpu_has_native_bf16", lambda: native)
    checkpoint, config = tiny_checkpoint
    assert load_model(checkpoint, config_dir=config, dtype="auto").dtypes == expected


def test_dtype_names_and_text():
    mixed = ComponentDtypes(BF16, FP32, BF16)
    assert mixed.names() == {"unet": "bf16", "text_encoder": "fp32", "vae": "bf16"}
    assert str(mixed) == "UNet bf16, text encoder fp32, VAE bf16"
    assert str(ComponentDtypes.uniform(FP16)) == "fp16"
    assert resolve_dtypes("bf16") == ComponentDtypes.uniform(BF16)
    assert resolve_dtypes(torch.float16) == ComponentDtypes.uniform(FP16)
    assert resolve_dtypes(mixed) is mixed


@pytest.mark.parametrize("bad", ["half", "AUTO", torch.int8, 16, None])
def test_bad_dtype_is_named(bad):
    with pytest.raises(ValueError, match=r"^dtype: got .*, expected auto or one of fp32, fp16, "):
        resolve_dtypes(bad)


def test_non_floating_component_dtype_is_refused(tiny_checkpoint):
    checkpoint, config = tiny_checkpoint
    with pytest.raises(ValueError, match=r"expected a floating torch\.dtype for each network$"):
        load_model(checkpoint, config_dir=config, dtype=ComponentDtypes(BF16, torch.int8, FP32))


class FloatAllocations(TorchDispatchMode):
    """Records (op name, dtype, size) of every non-meta tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self.made.append((func.__name__, tensor.dtype, tensor.numel()))
        return out


def test_fp16_file_for_bf16_never_makes_float32(tiny_components, half_file):
    """Each fp16 tensor is converted straight to bf16 (one ``_to_copy`` per tensor): no
    float32 tensor of any size exists during the load, let alone a float32 model."""
    checkpoint, config = half_file
    with FloatAllocations() as spy:
        model = load_model(checkpoint, config_dir=config, dtype="bf16")
    assert [(op, size) for op, dtype, size in spy.made if dtype == FP32] == []
    copies = [size for op, dtype, size in spy.made if op.startswith("_to_copy")]
    bf16 = sum(size for op, dtype, size in spy.made if op.startswith("_to_copy") and dtype == BF16)
    assert bf16 == sum(copies)
    weights = sum(p.numel() for part in ("unet", "vae", "text_encoder")
                  for p in getattr(model, part).parameters())  # fmt: skip
    assert bf16 == weights  # each weight converted exactly once
    reference = states_as(tiny_components.unet, FP16)
    assert all(torch.equal(v, reference[k].to(BF16)) for k, v in model.unet.state_dict().items())


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps`` Rss)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and "-" in fields[0]:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="Linux /proc only")
def test_converted_tensors_leave_no_file_pages_resident(half_file):
    """Converting through the mapping keeps every page of the file resident (the file
    and the converted model at once); the reader's own reads leave none."""
    from sdstack.models.single_file import open_tensor_file
    from sdstack.models.streaming import ConvertingReader

    checkpoint, _ = half_file
    cpu = torch.device("cpu")
    with open_tensor_file(checkpoint) as source, ConvertingReader(source) as reader:
        converted = {key: reader.tensor(key, BF16, cpu) for key in source}
        assert mapped_kib(checkpoint) == 0
        assert all(converted[key].equal(source.tensor(key).to(BF16)) for key in source)
        # The same file read through the mapping: all of it (less the header) resident.
        assert mapped_kib(checkpoint) >= 0.9 * checkpoint.stat().st_size / 1024
        same = reader.tensor("model.diffusion_model.out.2.weight", FP16, cpu)
        assert same.dtype == FP16  # already fp16: the mapping itself, no copy


def run_job(components, **overrides):
    """One Euler job on the tiny model: (final latents in float32, pixels as int)."""
    params = GenerationParams(
        "a red cat", width=64, height=64, steps=1, sampler="Euler", cfg_scale=2.0, seed=3
    )
    latents = []
    results = generate(
        components, params, callback=lambda record: latents.append(record.latents.float())
    )
    return latents[-1], np.asarray(results[0].image).astype(int)


def cast(components, dtypes):
    model = copy.deepcopy(components)
    for part in ("unet", "text_encoder", "vae"):
        getattr(model, part).to(getattr(dtypes, part))
    return model


@pytest.fixture(scope="module")
def fp32_run(tiny_components):
    return run_job(cast(tiny_components, ComponentDtypes.uniform(FP32)))


@pytest.mark.parametrize("dtypes", MIXED, ids=str)
def test_mixed_dtypes_generate_close_to_fp32(tiny_components, fp32_run, dtypes):
    """Conditioning is cast to the UNet's dtype, latents to the VAE's.

    Bounds. Latents: one Euler step from sigma_max to 0 returns the guided prediction
    ``u + cfg (c - u)`` (coefficients at most ``1 + 2 cfg``), each UNet row within
    ``FORWARD_UNITS * UNIT[d] * max|x|`` of float32, ``d`` the coarser of the UNet's and the
    text encoder's dtypes (the conditioning's rounding enters the UNet as an input
    rounding of the same size). Pixels: with float32 latents, the decode is one VAE forward,
    ``FORWARD_UNITS * UNIT[vae] * max|sample|`` with ``|sample| <= ~1`` (clamped to [-1, 1]),
    times 127.5 levels, plus one level for the truncation to uint8.
    """
    want_latents, want_pixels = fp32_run
    model = cast(tiny_components, dtypes)
    latents, pixels = run_job(model)
    assert torch.isfinite(latents).all()
    coarse = max(UNIT[dtypes.unet], UNIT[dtypes.text_encoder])
    bound = (1 + 2 * 2.0) * FORWARD_UNITS * coarse * float(want_latents.abs().max())
    assert float((latents - want_latents).abs().max()) <= bound
    with torch.no_grad():
        sample = model.vae.decode(latents.to(dtypes.vae) / model.vae.config.scaling_factor).sample
    assert torch.isfinite(sample).all()
    if dtypes.unet == dtypes.text_encoder == FP32:  # same latents: the decode alone differs
        assert torch.equal(latents, want_latents)
        levels = 127.5 * FORWARD_UNITS * UNIT[dtypes.vae] * 1.0 + 1
        assert np.abs(pixels - want_pixels).max() <= levels


def test_channels_last_matches_contiguous(tiny_components, fp32_run):
    """Same sums in another order: the UNet output within two float32 forwards' rounding
    (``2 * FORWARD_UNITS * UNIT[fp32] * max|out|``), and the job's latents within
    ``(1 + 2 cfg)`` times that (one Euler step); pixels within one level."""
    model = use_channels_last(copy.deepcopy(tiny_components))
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        want = tiny_components.unet(x, 500, encoder_hidden_states=context).sample
        got = model.unet(x, 500, encoder_hidden_states=context).sample
    per_forward = 2 * FORWARD_UNITS * UNIT[FP32]
    assert float((got - want).abs().max()) <= per_forward * float(want.abs().max())
    latents, pixels = run_job(model)
    want_latents, want_pixels = fp32_run
    bound = (1 + 2 * 2.0) * per_forward * float(want_latents.abs().max())
    assert float((latents - want_latents).abs().max()) <= bound
    assert np.abs(pixels - want_pixels).max() <= 1
    back = use_channels_last(model, False)
    assert back.unet.conv_in.weight.is_contiguous()


def test_channels_last_option_of_load_model(tiny_checkpoint):
    checkpoint, config = tiny_checkpoint
    model = load_model(checkpoint, config_dir=config, channels_last=True)
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    default = load_model(checkpoint, config_dir=config)
    layout = torch.channels_last if channels_last_default("cpu") else torch.contiguous_format
    assert default.unet.conv_in.weight.is_contiguous(memory_format=layout)
