"""What a LoRA file's metadata says about scaling: PEFT adapter configs, LyCORIS args.

diffusers stores the PEFT ``LoraConfig`` of each adapter as JSON under the safetensors
metadata key ``lora_adapter_metadata``: for a pipeline save every field is prefixed with
the component (``"unet.lora_alpha"``, ``"text_encoder.alpha_pattern"``...), for a single
model's ``save_lora_adapter`` the fields are bare (``"lora_alpha"``, ``"r"``...). The
fields read: ``lora_alpha``, ``alpha_pattern`` (module -> alpha; PEFT matches a pattern
key against the end of the module path, ``(.*\\.)?key$``; every key diffusers writes is a
literal path, and they are matched here as literal suffixes, never as regular
expressions), ``use_rslora`` (scale ``alpha / sqrt(r)``). Without an alpha anywhere a
PEFT module has alpha = rank (diffusers' convention: scale 1).

kohya/LyCORIS training writes its network arguments as JSON in ``ss_network_args``;
LyCORIS's ``rs_lora`` (alpha/sqrt(r)) and ``wd_on_output`` (DoRA per output row) are
read from it (``"True"``/``"true"``/``true`` as LyCORIS's ``str_bool`` reads them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sdstack.lora.network import LoraFileError

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
NETWORK_ARGS_KEY = "ss_network_args"
MAX_PATTERNS = 100_000


@dataclass(frozen=True)
class AdapterConfig:
    """The scaling fields of one PEFT ``LoraConfig``."""

    lora_alpha: float | None = None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def alpha_of(self, module_names: tuple[str, ...]) -> float | None:
        """The alpha of a module (any of its spellings): the first pattern key that is
        the module path or ends it after a dot, else ``lora_alpha``."""
        for key, alpha in self.alpha_pattern.items():
            for name in module_names:
                if name == key or name.endswith("." + key):
                    return alpha
        return self.lora_alpha


def _number(path: Path, where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraFileError(
            f"{path}: metadata {ADAPTER_METADATA_KEY}: {where} is {value!r:.60}; expected a number"
        )
    number = float(value)
    if not math.isfinite(number):
        raise LoraFileError(
            f"{path}: metadata {ADAPTER_METADATA_KEY}: {where} is {value!r}; expected a "
            "finite number"
        )
    return number


def _config(path: Path, fields: Mapping[str, object], prefix: str) -> AdapterConfig:
    where = f"{prefix}." if prefix else ""
    alpha = fields.get("lora_alpha")
    patterns = fields.get("alpha_pattern") or {}
    if not isinstance(patterns, dict) or len(patterns) > MAX_PATTERNS:
        raise LoraFileError(
            f"{path}: metadata {ADAPTER_METADATA_KEY}: {where}alpha_pattern is "
            f"{type(patterns).__name__} of {len(patterns)} entries; expected an object "
            f"module -> alpha of at most {MAX_PATTERNS}"
        )
    rslora = fields.get("use_rslora", False)
    return AdapterConfig(
        lora_alpha=None if alpha is None else _number(path, f"{where}lora_alpha", alpha),
        alpha_pattern={
            str(k): _number(path, f"{where}alpha_pattern[{k!r:.60}]", v)
            for k, v in patterns.items()
        },
        use_rslora=rslora is True,
    )


def adapter_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, AdapterConfig]:
    """The PEFT configs of the file by component ("unet", "text_encoder"; "" for bare
    fields that apply to whatever the file holds); ``{}`` without adapter metadata.

    Raises:
        LoraFileError: the metadata is not a JSON object, or an alpha is not a finite
            number.
    """
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw is None:
        return {}
    try:
        fields = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as error:
        raise LoraFileError(
            f"{path}: metadata {ADAPTER_METADATA_KEY} is not JSON ({error}); expected the "
            "JSON object diffusers writes (lora_alpha, r, alpha_pattern...)"
        ) from error
    if not isinstance(fields, dict):
        raise LoraFileError(
            f"{path}: metadata {ADAPTER_METADATA_KEY} is a JSON {type(fields).__name__}; "
            "expected an object (lora_alpha, r, alpha_pattern...)"
        )
    grouped: dict[str, dict[str, object]] = {}
    for key, value in fields.items():
        component, dot, name = str(key).partition(".")
        if not dot:
            component, name = "", component
        grouped.setdefault(component, {})[name] = value
    return {component: _config(path, group, component) for component, group in grouped.items()}


def _flag(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def network_args(path: Path, metadata: Mapping[str, str]) -> dict[str, object]:
    """The ``ss_network_args`` JSON object (``{}`` when absent or not an object: kohya
    writes it only when network arguments were given)."""
    raw = metadata.get(NETWORK_ARGS_KEY)
    if not raw:
        return {}
    try:
        args = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return {}
    return args if isinstance(args, dict) else {}


@dataclass(frozen=True)
class ScaleRules:
    """How the metadata asks modules to be scaled."""

    peft: dict[str, AdapterConfig]
    rs_lora: bool = False
    wd_on_output: bool = False

    def peft_config(self, component: str) -> AdapterConfig | None:
        """The PEFT config of a component (the bare one when there is no prefixed one)."""
        return self.peft.get(component, self.peft.get(""))


def scale_rules(path: Path, metadata: Mapping[str, str]) -> ScaleRules:
    """PEFT configs plus LyCORIS ``rs_lora`` / ``wd_on_output`` from the metadata."""
    args = network_args(path, metadata)
    return ScaleRules(
        peft=adapter_configs(path, metadata),
        rs_lora=_flag(args.get("rs_lora")),
        wd_on_output=_flag(args.get("wd_on_output", args.get("wd_on_out"))),
    )
