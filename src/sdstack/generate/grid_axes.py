"""Grid axes: what each X/Y/Z axis sets, its values and labels, and the grid-wide rules.

The reference is the X/Y/Z plot script of AUTOMATIC1111 (``scripts/xyz_grid.py``). An
axis is ``AXIS=VALUES`` (``clip-skip=1-4``, ``Prompt S/R=dog,cat``, ``lora:film=0,0.5,1``):
the name, ours or the reference's label, is looked up in :data:`GRID_AXES`; the values
follow the reference syntax and are checked for their setting before any work
(:mod:`sdstack.generate.grid_values`). Labels are the reference's; costly axes loop
outermost, seeds of -1 are drawn once per grid and the grid's size is guarded
(:mod:`sdstack.generate.grid_rules`).

Ours, beyond the reference: fractional clip skip (whole numbers stay ints and print as
the reference's), ``size``, ``emphasis`` and LoRA-weight axes; the VAE label shows the
file's basename. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdstack.errors import SdstackError, UnknownNameError
from sdstack.generate import grid_values as gv
from sdstack.generate.grid_values import GridAxisError, parse_values
from sdstack.generate.job import GenerationJob
from sdstack.lora.job_weights import set_lora_weight
from sdstack.merge.blocks import check_merge_block_text
from sdstack.merge.patch import set_merge_alpha, set_merge_blocks
from sdstack.prompt.errors import shorten
from sdstack.registry import Registry, normalise_name

Setter = Callable[[GenerationJob, Any, "Axis"], GenerationJob]


class UnknownGridAxisError(UnknownNameError, GridAxisError):
    """An axis name that is not registered (the message lists the nearest)."""


@dataclass(frozen=True)
class AxisKind:
    """One kind of axis: the setting it varies.

    Attributes:
        name: our name (``clip-skip``).
        label: the reference UI's label ("Clip skip"): labels and infotext ``X Type``.
        value_type: ``int``, ``float`` or ``str`` (size is ``"WxH"`` text).
        cost: the reference's cost (checkpoint 1.0, VAE 0.7, else 0).
        label_style: ``"label"`` (``f"{label}: {v}"``), ``"value"`` (the value alone),
            ``"basename"`` (``os.path.basename(v)``) or ``"label-basename"``.
        conditioning_only: cells differing only in this axis differ only in their
            conditioning (they may share a UNet batch; ``cell_batch.batch_key`` decides).
        takes_target: the axis names a LoRA (``lora:NAME``).
        whole_as_int: values are read as the reference's int forms first and whole
            numbers stay ints (clip skip: the reference's type is int).
        check: value -> the value to use (canonical spelling); raises SdstackError.
        setter: ``(job, value, axis) -> new job``.
    """

    name: str
    label: str
    value_type: type
    cost: float = 0.0
    label_style: str = "label"
    conditioning_only: bool = False
    takes_target: bool = False
    whole_as_int: bool = False
    check: Callable[[Any], Any] = field(default=lambda v: v, repr=False, compare=False)
    setter: Setter | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Axis:
    """One axis of a grid.

    Attributes:
        kind: the :class:`AxisKind`.
        values: the parsed, typed, checked values.
        text: the values as written (infotext ``X Values``).
        target: the LoRA name of ``lora:``/``lora-te:``/``lora-unet:`` axes, else None.
        fixed_seeds: a seed axis whose -1 values were drawn for this grid
            (:func:`fix_seeds`); the infotext lists them as ``Fixed X Values``.
    """

    kind: AxisKind
    values: tuple[Any, ...]
    text: str
    target: str | None = None
    fixed_seeds: bool = False

    @property
    def title(self) -> str:
        """The name in the labels: the reference label, ``LoRA TE film`` for LoRA axes."""
        return f"{self.kind.label} {self.target}" if self.target else self.kind.label

    @property
    def type_label(self) -> str:
        """Infotext ``X Type``: the reference label; ``LoRA:film`` for LoRA axes, so that
        ``parse_axis(f"{type_label}={text}")`` gives this axis again."""
        return f"{self.kind.label}:{self.target}" if self.target else self.kind.label

    def labels(self) -> list[str]:
        """One label per value, as the reference's ``format_value_add_label`` (floats
        ``round(v, 8)``: "CFG Scale: 7.0"), ``format_value`` (the value alone) and
        ``format_remove_path`` (the basename) write them."""
        return [self.label(value) for value in self.values]

    def label(self, value: Any) -> str:
        """The label of one value (see :meth:`labels`)."""
        if type(value) is float:
            value = round(value, 8)
        style = self.kind.label_style
        if style in ("basename", "label-basename"):
            value = os.path.basename(str(value))
        return f"{value}" if style in ("value", "basename") else f"{self.title}: {value}"

    def check(self, job: GenerationJob) -> None:
        """Raise if this axis cannot apply to ``job``: a Prompt S/R search text that is in
        neither the prompt nor the negative prompt (check every cell before any work)."""
        if self.kind.name == "prompt-sr":
            _check_search(self.values[0], job)

    def apply(self, job: GenerationJob, value: Any) -> GenerationJob:
        """A new job with this axis set to ``value`` (``job`` itself is unchanged).

        Raises:
            GridAxisError: the Prompt S/R search text is in neither prompt.
        """
        if self.kind.setter is None:
            raise GridAxisError(f"grid axis {self.kind.name!r} cannot be applied")
        return self.kind.setter(job, value, self)


def _set(field_name: str) -> Setter:
    return lambda job, value, _axis: job.replace(**{field_name: value})


def _set_size(job: GenerationJob, value: Any, _axis: Axis) -> GenerationJob:
    width, height = (int(n) for n in str(value).split("x"))
    return job.replace(width=width, height=height)


def _set_checkpoint(job: GenerationJob, value: Any, _axis: Axis) -> GenerationJob:
    return dataclasses.replace(job, model=value, model_hash=None)


def _set_vae(job: GenerationJob, value: Any, _axis: Axis) -> GenerationJob:
    """``None`` -> the checkpoint's own VAE; ``Automatic`` -> the job's own (``--vae``)."""
    if value.strip().lower() in ("automatic", "auto"):
        return job
    return dataclasses.replace(job, vae=None if value.strip().lower() == "none" else value)


def _check_search(search: str, job: GenerationJob) -> None:
    if search not in job.params.prompt and search not in job.params.negative:
        raise GridAxisError(
            f"Prompt S/R did not find {shorten(search)!r} in the prompt or the negative "
            "prompt; the first value is the text to replace (prompt-sr=dog,cat for 'a dog')"
        )


def _set_prompt_sr(job: GenerationJob, value: Any, axis: Axis) -> GenerationJob:
    """Reference ``apply_prompt``: ``str.replace(values[0], value)`` on both prompts."""
    search = axis.values[0]
    _check_search(search, job)
    params = job.params
    return job.replace(
        prompt=params.prompt.replace(search, value),
        negative=params.negative.replace(search, value),
    )


def _set_lora(parts: str) -> Setter:
    return lambda job, value, axis: set_lora_weight(job, str(axis.target), value, parts)


GRID_AXES: Registry[AxisKind] = Registry("grid axis", UnknownGridAxisError)
"""Axis names (the reference's labels and other spellings by lookup) -> :class:`AxisKind`."""
for _kind, _aliases in (
    (AxisKind("seed", "Seed", int, check=gv.check_seed, setter=_set("seed")), ()),
    (AxisKind("steps", "Steps", int, check=gv.check_steps, setter=_set("steps")), ()),
    (AxisKind("cfg", "CFG Scale", float, check=gv.check_cfg, setter=_set("cfg_scale")),
     ("guidance scale",)),
    (AxisKind("sampler", "Sampler", str, label_style="value", check=gv.check_sampler,
              setter=_set("sampler")), ()),
    (AxisKind("schedule-type", "Schedule type", str, check=gv.check_schedule,
              setter=_set("schedule_type")), ("schedule",)),
    (AxisKind("clip-skip", "Clip skip", float, conditioning_only=True, whole_as_int=True,
              check=gv.check_clip_skip_value, setter=_set("clip_skip")), ()),
    (AxisKind("emphasis", "Emphasis", str, conditioning_only=True,
              check=gv.check_emphasis_value, setter=_set("emphasis")), ()),
    (AxisKind("size", "Size", str, check=gv.check_size, setter=_set_size), ()),
    (AxisKind("denoising", "Denoising", float, check=gv.check_denoising,
              setter=_set("denoising_strength")), ("denoising strength",)),
    (AxisKind("token-merging", "Token merging ratio", float, check=gv.check_token_merging,
              setter=_set("token_merging")), ("tome",)),
    (AxisKind("checkpoint", "Checkpoint name", str, cost=1.0, label_style="basename",
              check=gv.check_file_name("Checkpoint name"), setter=_set_checkpoint),
     ("model",)),
    (AxisKind("vae", "VAE", str, cost=0.7, label_style="label-basename",
              check=gv.check_file_name("VAE"), setter=_set_vae), ()),
    (AxisKind("prompt-sr", "Prompt S/R", str, label_style="value", conditioning_only=True,
              setter=_set_prompt_sr), ("prompt search replace", "search replace")),
    (AxisKind("lora", "LoRA", float, takes_target=True, check=gv.check_weight,
              setter=_set_lora("both")), ("lora weight",)),
    (AxisKind("lora-te", "LoRA TE", float, takes_target=True, check=gv.check_weight,
              setter=_set_lora("te")), ("lora text encoder",)),
    (AxisKind("lora-unet", "LoRA UNet", float, takes_target=True, check=gv.check_weight,
              setter=_set_lora("unet")), ()),
    (AxisKind("merge-alpha", "Merge alpha", float, check=gv.check_weight,
              setter=lambda job, value, _axis: set_merge_alpha(job, value)), ()),
    (AxisKind("merge-blocks", "Merge blocks", str, label_style="value",
              check=check_merge_block_text,
              setter=lambda job, value, _axis: set_merge_blocks(job, value)), ()),
):  # fmt: skip
    GRID_AXES.register(_kind.name, _kind, aliases=(_kind.label, *_aliases))

UNSUPPORTED_AXES = (
    "Nothing", "Var. seed", "Var. strength", "Hires steps", "Image CFG Scale", "Prompt order",
    "Hires sampler", "Negative Guidance minimum sigma", "Sigma Churn", "Sigma min",
    "Sigma max", "Sigma noise", "Schedule min sigma", "Schedule max sigma", "Schedule rho",
    "Eta", "Initial noise multiplier", "Extra noise", "Hires upscaler",
    "Cond. Image Mask Weight", "Styles", "UniPC Order", "Face restore",
    "Token merging ratio high-res", "Always discard next-to-last sigma",
    "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at", "RNG source",
)  # fmt: skip
"""Reference axes whose settings sdstack does not have."""
_UNSUPPORTED = {normalise_name(label): label for label in UNSUPPORTED_AXES}


def axis_kind(name: str) -> AxisKind:
    """The kind called ``name`` (ours or the reference's label, any case/spacing).

    Raises:
        UnknownGridAxisError: an unknown name (with the nearest), or a reference axis
            sdstack does not have.
    """
    label = _UNSUPPORTED.get(normalise_name(name))
    if label is not None and name not in GRID_AXES:
        what = "leave the axis out" if label == "Nothing" else "sdstack has no such setting"
        raise UnknownGridAxisError(
            f"grid axis {label!r} of the reference is not supported ({what}); expected one "
            f"of: {', '.join(GRID_AXES.names())}"
        )
    return GRID_AXES.get(name)


def parse_axis(text: str) -> Axis:
    """``AXIS=VALUES`` -> a checked :class:`Axis`: ``"clip-skip=1,2,3"``,
    ``"Clip skip=1-4"``, ``"lora:film=0,0.5,1"``, ``'Prompt S/R=dog,cat,"a, b"'``.

    The text is split at its first ``=``; a ``:`` before it gives the target (LoRA axes).

    Raises:
        GridAxisError: no ``=``, an unknown axis, a missing or extra target, bad values.
    """
    if not isinstance(text, str) or "=" not in text:
        shown = shorten(text) if isinstance(text, str) else type(text).__name__
        raise GridAxisError(
            f"grid axis {shown!r}: expected AXIS=VALUES, e.g. clip-skip=1,2,3 or lora:NAME=0,0.5,1"
        )
    head, values = text.split("=", 1)
    name, colon, target = head.partition(":")
    return make_axis(name.strip(), values.strip(), target.strip() if colon else None)


def make_axis(kind: str | AxisKind, values: str | Sequence[Any], target: str | None = None) -> Axis:
    """An :class:`Axis` from its kind (a name or label), its values (text in the
    reference syntax, or a list of values) and, for LoRA axes, the LoRA's name.

    Raises:
        GridAxisError: unknown kind, a target missing or not allowed, a bad value.
    """
    kind = kind if isinstance(kind, AxisKind) else axis_kind(kind)
    where = f"{kind.name}:{target}" if target else kind.name
    if kind.takes_target and not target:
        raise GridAxisError(
            f"grid axis {where!r} needs the LoRA's name: {kind.name}:NAME=VALUES, "
            f"e.g. {kind.name}:film=0,0.5,1"
        )
    if target and not kind.takes_target:
        raise GridAxisError(
            f"grid axis {shorten(where)!r}: {kind.name} takes no ':NAME' part; expected "
            f"{kind.name}=VALUES"
        )
    text = values if isinstance(values, str) else None
    try:
        if text is not None:
            raw = parse_values(text, kind.value_type, whole_as_int=kind.whole_as_int)
        else:
            raw = [gv.typed_value(v, kind.value_type, kind.whole_as_int) for v in values]
            text = gv.values_text(raw)
        checked = tuple(kind.check(v) for v in raw)
        if not checked:
            raise GridAxisError("no values; expected at least one")
        if kind.name == "prompt-sr" and checked[0] == "":
            raise GridAxisError("the first value is the text to replace: it cannot be empty")
    except SdstackError as error:
        shown = f"{where}={shorten(text if text is not None else repr(values))}"
        raise GridAxisError(f"grid axis {shown!r}: {error}") from None
    return Axis(kind, checked, text, target or None)
