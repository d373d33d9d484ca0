"""``--dtype auto``: the per-component policy and the CPU bf16 probe, with injected probes
(nothing here depends on the machine the tests run on)."""

from __future__ import annotations

import pytest
import torch

from sdstack.models.precision import (
    ComponentDtypes,
    auto_dtypes,
    cpu_has_native_bf16,
    cpuinfo_has_bf16,
)
from sdstack.validate import SettingError

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Abridged /proc/cpuinfo texts: a Sapphire Rapids core (AMX + AVX512-BF16), a Skylake-X
# core (AVX-512 without bf16), a Neoverse V1 core (Arm bf16) and a Neoverse N1 (none).
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
COOPER = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
NEOVERSE_N1 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [(SAPPHIRE, True), (COOPER, True), (SKYLAKE, False), (NEOVERSE_V1, True),
     (NEOVERSE_N1, False), ("", False), ("model name\t: bf16 lookalike avx512_bf16\n", False)],
)  # fmt: skip
def test_cpuinfo_flags(text, expected):
    assert cpuinfo_has_bf16(text) is expected


def test_linux_reads_cpuinfo_only():
    def no_sysctl():
        raise AssertionError("sysctl must not run on Linux")

    probe = {"read_cpuinfo": lambda: SAPPHIRE, "read_sysctl": no_sysctl}
    assert cpu_has_native_bf16(platform="linux", **probe) is True
    assert cpu_has_native_bf16(platform="linux", read_cpuinfo=lambda: SKYLAKE) is False


@pytest.mark.parametrize(("answer", "expected"), [("1\n", True), ("0\n", False), ("", False)])
def test_macos_reads_sysctl(answer, expected):
    assert cpu_has_native_bf16(platform="darwin", read_sysctl=lambda: answer) is expected


def test_other_platforms_answer_false():
    assert cpu_has_native_bf16(platform="win32", read_cpuinfo=lambda: SAPPHIRE) is False


@pytest.mark.parametrize(
    ("device", "options", "expected"),
    [
        ("cpu", {"cpu_bf16": False}, ComponentDtypes(FP32, FP32, FP32)),
        ("cpu", {"cpu_bf16": True}, ComponentDtypes(BF16, FP32, BF16)),
        ("cuda", {}, ComponentDtypes(FP16, FP16, FP32)),
        ("cuda:1", {"prefer_bf16": True, "cuda_bf16": True}, ComponentDtypes(BF16, BF16, BF16)),
        ("cuda", {"prefer_bf16": True, "cuda_bf16": False}, ComponentDtypes(FP16, FP16, FP32)),
        ("cuda", {"cuda_bf16": True}, ComponentDtypes(FP16, FP16, FP32)),
        ("mps", {}, ComponentDtypes(FP16, FP16, FP32)),
        (torch.device("cpu"), {"cpu_bf16": False}, ComponentDtypes(FP32, FP32, FP32)),
    ],
)
def test_auto_policy(device, options, expected):
    assert auto_dtypes(device, **options) == expected


def test_vae_is_never_fp16():
    """The SD1 VAE overflows fp16 (the reference's ``--no-half-vae``)."""
    for device in ("cpu", "cuda", "mps"):
        for flag in (False, True):
            dtypes = auto_dtypes(device, prefer_bf16=flag, cpu_bf16=flag, cuda_bf16=flag)
            assert dtypes.vae != torch.float16


def test_cpu_probe_used_when_not_given(monkeypatch):
    monkeypatch.delenv("SDSTACK_CPU_BF16")  # conftest pins it; the probe decides
    monkeypatch.setattr("sdstack.models.precision.cpu_has_native_bf16", lambda: True)
    assert auto_dtypes("cpu").unet == torch.bfloat16


@pytest.mark.parametrize("device", ["tpu", "xla", 3.5])
def test_bad_device(device):
    with pytest.raises(SettingError, match=r"^device: got .*, expected one of cpu, cuda, mps$"):
        auto_dtypes(device)


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("0", False), (" 1 ", True)])
def test_the_environment_overrides_the_cpu_probe(monkeypatch, value, expected):
    from sdstack.models import precision

    monkeypatch.setenv("SDSTACK_CPU_BF16", value)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: not expected)
    assert precision.cpu_bf16_for_auto() is expected
    assert (precision.auto_dtypes("cpu").unet == torch.bfloat16) is expected


def test_a_bad_cpu_bf16_value_is_named(monkeypatch):
    from sdstack.models import precision
    from sdstack.validate import SettingError

    monkeypatch.setenv("SDSTACK_CPU_BF16", "yes")
    with pytest.raises(SettingError, match=r"SDSTACK_CPU_BF16='yes': expected 1 .* or 0"):
        precision.cpu_bf16_for_auto()
    monkeypatch.delenv("SDSTACK_CPU_BF16")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.cpu_bf16_for_auto() is True
