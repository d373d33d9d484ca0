"""A LoRA's weight written into a generation job (the grid's ``lora:NAME`` axes).

The weight goes where the job keeps it: every ``<lora:name...>`` tag of the prompt is
rewritten in place (``lbw=``, ``dyn`` and the rest of the prompt kept), else the
``job.networks`` entry of that name is changed or a :class:`LoraSpec` appended. Pure text:
no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sdstack.lora.spec import LoraSpec, specs_from_entries
from sdstack.prompt.networks import NetworkTag, extract_networks


def set_lora_weight(job: Any, name: str, value: float, parts: str) -> Any:
    """``job`` with LoRA ``name`` at ``value``: ``parts`` "both" sets the text-encoder and
    UNet multipliers, "te" or "unet" only that one (the other keeps its value).

    Every ``<lora:name...>`` tag of the prompt is rewritten in place (``lbw=``, ``dyn``
    and the rest of the prompt kept); without such a tag, the ``job.networks`` entry of
    that name is changed, or a :class:`LoraSpec` appended.
    """
    prompt = job.params.prompt
    tags = [t for t in extract_networks(prompt)[1] if t.kind == "lora" and t.name == name]
    if not tags:
        return dataclasses.replace(job, networks=_set_network(job.networks, name, value, parts))
    pieces, end = [], 0
    for tag in tags:
        start, stop = tag.span
        pieces += [prompt[end:start], _rewrite_tag(tag, value, parts)]
        end = stop
    return job.replace(prompt="".join([*pieces, prompt[end:]]))


def _weights(te: float, unet: float, value: float, parts: str) -> tuple[float, float]:
    return (value if parts != "unet" else te), (value if parts != "te" else unet)


def _rewrite_tag(tag: NetworkTag, value: float, parts: str) -> str:
    """The tag with its multipliers as positional items: ``<lora:name:te[:unet]...>``."""
    te, unet = _weights(tag.te, tag.unet, value, parts)
    positional = [item for item in tag.items if item.count("=") != 1]
    named = [item for item in tag.items if item.count("=") == 1]
    named = [item for item in named if item.split("=")[0] not in ("te", "unet")]
    numbers = [_number(te)] + ([_number(unet)] if unet != te or len(positional) > 3 else [])
    return f"<{tag.written_kind}:{':'.join([positional[0], *numbers, *positional[3:], *named])}>"


def _set_network(networks: Sequence[Any], name: str, value: float, parts: str) -> tuple:
    out, found = [], False
    for entry, spec in zip(networks, specs_from_entries(networks), strict=True):
        if spec.name == name:
            te, unet = _weights(spec.te, spec.unet_multiplier, value, parts)
            entry = dataclasses.replace(spec, te=te, unet=None if unet == te else unet)
            found = True
        out.append(entry)
    if not found:
        te, unet = _weights(1.0, 1.0, value, parts)
        out.append(LoraSpec(name, te, None if unet == te else unet))
    return tuple(out)


def _number(value: float) -> str:
    """A multiplier as tag text: ``1``, ``0.5``, ``0.123456789`` (``float`` reads it back)."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
