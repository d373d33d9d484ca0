"""One LoRA of a stack, as asked for: which file or name, how strong, which blocks.

A :class:`LoraSpec` comes from a prompt tag (``<lora:name:te:unet:lbw=MIDD>``), from
``sdstack generate --lora NAME:w[:unet_w]`` or from Python (``(name, w)`` /
``(name, te_w, unet_w)`` tuples). It is plain data (no torch): a job carries its stack
and checks it before anything loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sdstack.errors import SdstackError
from sdstack.lora.block_weights import parse_block_weights
from sdstack.prompt.networks import NetworkTag

MAX_MULTIPLIER = 1000.0
"""Multipliers beyond +-1000 are refused (they only make noise, or inf in fp16)."""


class LoraSpecError(SdstackError):
    """A LoRA stack entry that cannot be read: no name, a multiplier that is not a number."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a stack.

    Attributes:
        name: a file path, or a name to find in the LoRA folders (file stem, then
            ``ss_output_name``, then alias).
        te: text-encoder multiplier.
        unet: UNet multiplier (None: the same as ``te``).
        lbw: block weights (17 or 26 values, see ``block_weights``), None for all 1.
        lbw_text: ``lbw=`` as written (for the prompt tag), None without.
        in_prompt: True when it came from a tag of the prompt.
    """

    name: str
    te: float = 1.0
    unet: float | None = None
    lbw: tuple[float, ...] | None = None
    lbw_text: str | None = None
    in_prompt: bool = False

    @property
    def unet_multiplier(self) -> float:
        """``unet`` when given, else ``te`` (the reference's default)."""
        return self.te if self.unet is None else self.unet

    def tag(self, name: str | None = None) -> str:
        """The reference prompt tag: ``<lora:name:te>``, ``<lora:name:te:unet>`` (+ lbw)."""
        items = [name or self.name, _number(self.te)]
        if self.unet is not None and self.unet != self.te:
            items.append(_number(self.unet))
        if self.lbw_text is not None:
            items.append(f"lbw={self.lbw_text}")
        return f"<lora:{':'.join(items)}>"


def _number(value: float) -> str:
    return f"{value:g}" if value != int(value) or abs(value) >= 1e16 else str(int(value))


def check_multiplier(value: Any, what: str) -> float:
    """A finite multiplier within +-:data:`MAX_MULTIPLIER`.

    Raises:
        LoraSpecError: anything else, naming ``what``.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or abs(number) > MAX_MULTIPLIER:
        raise LoraSpecError(
            f"{what}: {value!r} is not a multiplier; expected a number within "
            f"+-{MAX_MULTIPLIER:g} (e.g. 0.8)"
        )
    return number


def spec_from_tag(tag: NetworkTag) -> LoraSpec:
    """A prompt's ``<lora:...>`` tag -> LoraSpec (te, unet, ``lbw=`` read as the reference
    and the LoRA Block Weight extension do; ``dyn`` is not supported and refused).

    Raises:
        LoraSpecError, BlockWeightError: a multiplier out of range, a bad ``lbw=``.
    """
    where = f"<{tag.written_kind}:{':'.join(tag.items)}>"
    if tag.dyn is not None:
        raise LoraSpecError(f"{where}: dyn= (DyLoRA dimension) is not supported; remove it")
    te = check_multiplier(tag.te, f"{where} text-encoder multiplier")
    unet = check_multiplier(tag.unet, f"{where} UNet multiplier")
    lbw_text = tag.named.get("lbw")
    lbw = None
    if lbw_text is not None:
        try:
            lbw = parse_block_weights(lbw_text)
        except SdstackError as error:
            raise type(error)(f"{where}: {error}") from None
    return LoraSpec(tag.name, te, unet, lbw, lbw_text, in_prompt=True)


def parse_lora_option(text: str) -> LoraSpec:
    """``--lora FILE_OR_NAME[:w[:unet_w]]`` -> LoraSpec (w default 1, unet_w default w).

    Trailing ``:number`` items are the multipliers, so a path may hold ``:`` itself.

    Raises:
        LoraSpecError: empty name, or a multiplier that is not a number.
    """
    name, numbers = text, []
    while len(numbers) < 2 and ":" in name:
        head, tail = name.rsplit(":", 1)
        if not _is_number(tail):
            break
        name, numbers = head, [tail, *numbers]
    if not name.strip():
        raise LoraSpecError(
            f"--lora {text!r}: no file or name; expected FILE_OR_NAME[:w[:unet_w]], "
            "e.g. --lora detail:0.6"
        )
    if ":" in name and not _looks_like_path(name):
        raise LoraSpecError(
            f"--lora {text!r}: {name.rsplit(':', 1)[1]!r} is not a multiplier; expected "
            "FILE_OR_NAME[:w[:unet_w]], e.g. --lora detail:0.6:0.8"
        )
    te = check_multiplier(numbers[0], f"--lora {text}: multiplier") if numbers else 1.0
    unet = (
        check_multiplier(numbers[1], f"--lora {text}: UNet multiplier")
        if len(numbers) > 1
        else None
    )
    return LoraSpec(name, te, unet)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name


def specs_from_entries(entries: Iterable[Any]) -> list[LoraSpec]:
    """Python stack entries -> specs: a LoraSpec, ``name``, ``(name, w)`` or
    ``(name, te_w, unet_w)``; ``name`` may be a path (``str`` or ``os.PathLike``).

    Raises:
        LoraSpecError: an entry of another shape, or a bad multiplier.
    """
    specs = []
    for index, entry in enumerate(entries):
        if isinstance(entry, LoraSpec):
            specs.append(entry)
            continue
        items: Sequence[Any] = (entry,) if not isinstance(entry, (tuple, list)) else entry
        if not 1 <= len(items) <= 3 or not isinstance(items[0], (str, _path_type())):
            raise LoraSpecError(
                f"LoRA stack entry {index}: {entry!r}; expected (file_or_name, w) or "
                "(file_or_name, te_w, unet_w)"
            )
        what = f"LoRA stack entry {index} ({items[0]})"
        te = check_multiplier(items[1], f"{what} multiplier") if len(items) > 1 else 1.0
        unet = check_multiplier(items[2], f"{what} UNet multiplier") if len(items) > 2 else None
        specs.append(LoraSpec(str(items[0]), te, unet))
    return specs


def _path_type() -> type:
    import os

    return os.PathLike
