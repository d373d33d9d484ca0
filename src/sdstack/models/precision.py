"""``--dtype auto``: the precision of each network for a device, and the CPU bf16 probe.

Policy (:func:`auto_dtypes`), one dtype per component:

============================  ========  ============  ========
device                        UNet      text encoder  VAE
============================  ========  ============  ========
CUDA                          fp16      fp16          fp32
CUDA, ``prefer_bf16`` and the
GPU has bf16 (compute 8.0+)   bf16      bf16          bf16
MPS                           fp16      fp16          fp32
CPU with native bf16          bf16      fp32          bf16
CPU without                   fp32      fp32          fp32
============================  ========  ============  ========

Why: the SD1 VAE decoder's activations pass fp16's largest value (65504) on many
latents, which gives NaN/black images; the reference answers with ``--no-half-vae``
(VAE in fp32) and, since 1.6, by reverting the VAE to fp32 when it sees NaNs. Here the
VAE is never fp16: fp32 beside an fp16 UNet (the reference's ``--no-half-vae``), bf16
where bf16 is in use anyway (bf16 has fp32's exponent range, so it cannot overflow where
fp32 does not). The text encoder runs once per prompt, so on the CPU it stays in fp32 at
no measurable cost, and the conditioning keeps fp32's 24 mantissa bits; on GPUs it runs
in the UNet's half type as the reference's half mode does.

Measured difference to fp32 (``bench/precision.py``: 20 steps of DPM++ 2M, CFG 7, seed 1;
the final latents' relative L2 distance and the 8-bit pixels' mean / largest difference;
an Intel Xeon with AMX, 2 threads, torch 2.13):

=======================  ====================  =====================  ===============
``--dtype``              real-shape, 512x512   tiny model, 64x64      job s at 512
=======================  ====================  =====================  ===============
fp32                     0                     0                      323.7
auto (bf16, TE fp32)     1.58e-4; 0.01 / 1     8.5e-5; 0.01 / 1       117.4
bf16                     1.59e-4; 0.01 / 1     8.8e-5; 0.01 / 1       112.5
fp16 (CPU)               2.0e-5; 0.00 / 1      9.2e-6; 0.00 / 1       335.7
=======================  ====================  =====================  ===============

No run gave a NaN. The models have seeded random weights, whose small outputs move the
latents less than a trained model's do, so these figures are a floor for what a trained
checkpoint shows, not a bound: bf16 keeps 8 significant bits, fp16 11, fp32 24. fp16 on
this CPU is as slow as fp32, which is why ``auto`` never picks it on a CPU.

CPU bf16 detection (:func:`cpu_has_native_bf16`): "native" means instructions that
compute on bf16 (x86 ``avx512_bf16`` or ``amx_bf16``; Arm ``bf16`` / ``FEAT_BF16``).
Without them torch emulates bf16 through fp32 and is slower than fp32. Linux: the
``flags`` (x86) or ``Features`` (Arm) lines of ``/proc/cpuinfo``; macOS: ``sysctl -n
hw.optional.arm.FEAT_BF16`` (Apple M2 and later answer 1); elsewhere False. Every probe
can be injected, so the policy is a pure function in tests.

Explicit ``fp32`` / ``fp16`` / ``bf16`` put every network in that one dtype
(:func:`resolve_dtypes`); ``fp32`` is the setting for comparisons across machines: auto
picks by hardware, and half types differ between machines by much more than float32's
rounding. This module imports torch only inside
its functions, so ``--help`` can describe ``auto`` without loading it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdstack.validate import SettingError

if TYPE_CHECKING:
    import torch

X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ARM_BF16_FEATURES = frozenset({"bf16"})
CUDA_BF16_CAPABILITY = (8, 0)
"""Ampere and later compute in bf16 natively."""
CPUINFO = Path("/proc/cpuinfo")
SYSCTL_BF16 = ("sysctl", "-n", "hw.optional.arm.FEAT_BF16")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
"""What ``--dtype`` accepts: ``auto`` (per network, :func:`auto_dtypes`) or one dtype."""
_TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"fp32"`` (``fp16``, ``bf16``); other dtypes as torch names them."""
    text = str(dtype).removeprefix("torch.")
    return next((short for short, long in _TORCH_NAMES.items() if long == text), text)


@dataclass(frozen=True)
class ComponentDtypes:
    """The dtype each network runs in."""

    unet: torch.dtype
    text_encoder: torch.dtype
    vae: torch.dtype

    @classmethod
    def uniform(cls, dtype: torch.dtype) -> ComponentDtypes:
        """Every network in ``dtype``."""
        return cls(dtype, dtype, dtype)

    def names(self) -> dict[str, str]:
        """``{"unet": "bf16", "text_encoder": "fp32", "vae": "bf16"}``."""
        return {
            "unet": dtype_name(self.unet),
            "text_encoder": dtype_name(self.text_encoder),
            "vae": dtype_name(self.vae),
        }

    def __str__(self) -> str:
        """``"fp32"`` when uniform, else ``"UNet bf16, text encoder fp32, VAE bf16"``."""
        names = self.names()
        if len(set(names.values())) == 1:
            return names["unet"]
        return f"UNet {names['unet']}, text encoder {names['text_encoder']}, VAE {names['vae']}"


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """True when a ``/proc/cpuinfo`` text lists native bf16 in a ``flags`` line (x86:
    ``avx512_bf16``, ``amx_bf16``) or a ``Features`` line (Arm: ``bf16``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        words = set(value.split())
        if key == "flags" and words & X86_BF16_FLAGS:
            return True
        if key == "features" and words & ARM_BF16_FEATURES:
            return True
    return False


def _read_cpuinfo() -> str:
    try:
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _sysctl_bf16() -> str:
    try:
        done = subprocess.run(SYSCTL_BF16, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def cpu_has_native_bf16(
    *,
    platform: str | None = None,
    read_cpuinfo: Callable[[], str] | None = None,
    read_sysctl: Callable[[], str] | None = None,
) -> bool:
    """Whether this processor computes bf16 natively (see the module docstring).

    Args:
        platform: ``sys.platform`` by default (``"linux"``, ``"darwin"``, ...).
        read_cpuinfo: returns the ``/proc/cpuinfo`` text (Linux); "" when unreadable.
        read_sysctl: returns the output of ``sysctl -n hw.optional.arm.FEAT_BF16``
            (macOS); "" when it fails.

    Returns:
        True only on positive evidence; any failed probe answers False (fp32 is always
        correct, only slower).
    """
    platform = sys.platform if platform is None else platform
    if platform.startswith("linux"):
        return cpuinfo_has_bf16((read_cpuinfo or _read_cpuinfo)())
    if platform == "darwin":
        return (read_sysctl or _sysctl_bf16)().strip() == "1"
    return False


CPU_BF16_ENVIRONMENT_VARIABLE = "SDSTACK_CPU_BF16"
"""``1`` / ``0`` overrides the CPU probe for ``--dtype auto`` (e.g. ``0`` keeps fp32 on a
bf16 processor so that results compare with other machines)."""


def cpu_bf16_for_auto() -> bool:
    """``$SDSTACK_CPU_BF16`` when it is ``1`` or ``0``, else :func:`cpu_has_native_bf16`.

    Raises:
        SettingError: the variable is set to something else.
    """
    value = os.environ.get(CPU_BF16_ENVIRONMENT_VARIABLE, "").strip()
    if value in ("1", "0"):
        return value == "1"
    if value:
        raise SettingError(
            f"{CPU_BF16_ENVIRONMENT_VARIABLE}={value!r}: expected 1 (use bf16 on this CPU) "
            "or 0 (fp32), or unset (detect)"
        )
    return cpu_has_native_bf16()


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` has compute capability 8.0 or later (native bf16)."""
    import torch

    return torch.cuda.get_device_capability(device) >= CUDA_BF16_CAPABILITY


def auto_dtypes(
    device: str | torch.device,
    *,
    prefer_bf16: bool = False,
    cpu_bf16: bool | None = None,
    cuda_bf16: bool | None = None,
) -> ComponentDtypes:
    """The ``--dtype auto`` precision of the UNet, text encoder and VAE on ``device``.

    See the table in the module docstring.

    Args:
        device: ``"cpu"``, ``"cuda[:N]"``, ``"mps"`` or a ``torch.device`` (not checked
            for availability here; ``resolve_device`` does that).
        prefer_bf16: on CUDA, use bf16 instead of fp16 where the GPU has it.
        cpu_bf16: whether the CPU has native bf16; probed with
            :func:`cpu_bf16_for_auto` (``$SDSTACK_CPU_BF16``, else the probe) when None.
        cuda_bf16: whether the GPU has native bf16; probed with :func:`cuda_has_bf16`
            when None (only when ``prefer_bf16``).

    Raises:
        SettingError: ``device`` is not a cpu, cuda or mps device.
    """
    import torch

    kind = _device_type(device)
    fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16
    if kind == "cuda":
        if cuda_bf16 is None and prefer_bf16:
            cuda_bf16 = cuda_has_bf16(torch.device(device))
        if prefer_bf16 and cuda_bf16:
            return ComponentDtypes(bf16, bf16, bf16)
        return ComponentDtypes(fp16, fp16, fp32)
    if kind == "mps":
        return ComponentDtypes(fp16, fp16, fp32)
    if cpu_bf16_for_auto() if cpu_bf16 is None else cpu_bf16:
        return ComponentDtypes(bf16, fp32, bf16)
    return ComponentDtypes(fp32, fp32, fp32)


def _device_type(device: Any) -> str:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise SettingError(f"device: got {device!r}, expected one of cpu, cuda, mps") from error
    if kind not in ("cpu", "cuda", "mps"):
        raise SettingError(f"device: got {device!r}, expected one of cpu, cuda, mps")
    return kind


def resolve_dtypes(
    dtype: str | torch.dtype | ComponentDtypes,
    device: str | torch.device = "cpu",
    *,
    prefer_bf16: bool = False,
) -> ComponentDtypes:
    """``--dtype`` -> the dtype of each network on ``device``.

    ``"auto"`` is :func:`auto_dtypes` (``prefer_bf16`` passed on); ``"fp32"`` / ``"fp16"`` /
    ``"bf16"`` or a floating ``torch.dtype`` put every network in that dtype; a
    ``ComponentDtypes`` is taken as it is (each dtype checked to be floating).

    Raises:
        SettingError: any other value, or a non-floating dtype in a ``ComponentDtypes``.
    """
    import torch

    if isinstance(dtype, ComponentDtypes):
        parts = (dtype.unet, dtype.text_encoder, dtype.vae)
        if all(isinstance(d, torch.dtype) and d.is_floating_point for d in parts):
            return dtype
        raise SettingError(
            f"dtype: got {dtype!r}, expected a floating torch.dtype for each network"
        )
    if isinstance(dtype, str) and dtype == "auto":
        return auto_dtypes(device, prefer_bf16=prefer_bf16)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return ComponentDtypes.uniform(dtype)
    if isinstance(dtype, str) and dtype in _TORCH_NAMES:
        return ComponentDtypes.uniform(getattr(torch, _TORCH_NAMES[dtype]))
    raise SettingError(
        f"dtype: got {dtype!r}, expected auto or one of {', '.join(DTYPE_NAMES)} (or a "
        "floating torch.dtype, or a ComponentDtypes)"
    )


def auto_help(*, cpu_bf16: bool | None = None) -> str:
    """What ``--dtype auto`` picks, for ``--help``: this machine's CPU answer first (probed
    with :func:`cpu_has_native_bf16` when ``cpu_bf16`` is None; no torch import)."""
    native = cpu_bf16_for_auto() if cpu_bf16 is None else cpu_bf16
    if native:
        here = "this CPU has native bf16, so on --device cpu: UNet and VAE bf16, text encoder fp32"
    else:
        here = "this CPU has no native bf16, so on --device cpu: fp32"
    return (
        f"auto (default) picks a dtype per network: {here}; CUDA and MPS: UNet and text "
        "encoder fp16, VAE fp32 (the VAE overflows fp16). Native bf16 is read from the "
        "avx512_bf16/amx_bf16 flags (x86) or bf16 feature (Arm) of /proc/cpuinfo, or "
        "hw.optional.arm.FEAT_BF16 on macOS. fp32/fp16/bf16: every network in that dtype; "
        "use fp32 to compare runs across machines (auto's choice varies with the hardware)"
    )
