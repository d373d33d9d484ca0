"""The generation job: what to make (settings) and with what (model, VAE, embeddings).

A :class:`GenerationJob` is the one description of a generation that the Python API
(``generate``), ``sdstack generate``, ``--from-infotext`` and the comparison grids share.
It converts to and from the reference UI's infotext: :meth:`GenerationJob.from_infotext`
reads every field sdstack can honour and lists the rest in ``unhonoured`` (hires fix,
face restoration, variation seeds, GPU RNG ...), never dropping them silently.
This module does not import torch: a job is checked before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sdstack.generate.encoding import infotext_prompt_text
from sdstack.generate.params import GenerationParams, check_inputs

HONOURED_FIELDS = frozenset(
    {
        "Prompt",
        "Negative prompt",
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Clip skip",
        "Emphasis",
        "Pad conds",
        "Model",
        "Model hash",
        "VAE",
        "VAE hash",
        "Lora hashes",
        "Encoding",
        "Deprojector",
        "Token merging ratio",
    }
)
"""Infotext fields that set part of a job."""
INFORMATIONAL_FIELDS = frozenset({"Version", "TI hashes"})
"""Fields that describe the image but set nothing (the embeddings are found by name)."""
FIELD_NOTES = {
    "RNG": "sdstack draws noise on the CPU (RNG: CPU), so the picture will differ",
    "Denoising strength": "used only with an init image (img2img); hires fix is not supported",
    "Hires": "hires fix is not supported",
}
"""Why a field is not applied, by field-name prefix ("Hires" covers every hires field)."""


@dataclass
class GenerationJob:
    """One generation: the settings and the files it uses.

    Attributes:
        params: the settings (:class:`GenerationParams`).
        model: the checkpoint: a path, or a name or hash to find under a web-UI root.
        vae: a separate VAE (path or name), or None for the checkpoint's own.
        embeddings: a folder of textual-inversion files, or None.
        networks: LoRAs applied after the prompt's ``<lora:...>`` tags (``--lora``):
            ``sdstack.lora.LoraSpec`` or ``(file_or_name, w[, unet_w])`` entries.
        lora_dirs: folders searched for LoRA names after the root's models/Lora and
            models/LyCORIS (``--lora-dir``).
        lora_hashes: LoRA name -> short hash, from an infotext's ``Lora hashes`` (a name
            that no file has is then looked up by its hash).
        model_hash: the ``Model hash`` an infotext named (to find or check the model).
        unhonoured: infotext fields this job cannot apply, field -> value; the CLI
            prints them, a caller can refuse to run.
        controls: ControlNet units (``sdstack.control.ControlUnit``), in order. Read
            back from an infotext's ``ControlNet 0``, ``ControlNet 1``, ... without their
            images (the infotext does not carry them).
        deprojector: the deprojector folder of the deprojected encoding
            (``params.encoding == "deprojected"``), or None; ``generate`` loads it.
        infotext_deprojector: the ``Deprojector`` an infotext named (``name [hash]``);
            the folder itself is not in the infotext.
        dtype: the precision :meth:`load` loads the model in: ``"auto"`` (default: a
            dtype per network for ``device``, ``sdstack.models.precision.auto_dtypes``),
            ``"fp32"`` (the setting that is deterministic across machines), ``"fp16"``,
            ``"bf16"``.
        device: where :meth:`load` puts the model: ``"cpu"`` (default), ``"cuda"``,
            ``"cuda:N"``, ``"mps"``.
    """

    params: GenerationParams
    model: str | None = None
    vae: str | None = None
    embeddings: str | None = None
    networks: tuple[Any, ...] = ()
    lora_dirs: tuple[str, ...] = ()
    lora_hashes: dict[str, str] = field(default_factory=dict)
    model_hash: str | None = None
    unhonoured: dict[str, str] = field(default_factory=dict)
    controls: tuple[Any, ...] = ()
    deprojector: str | None = None
    infotext_deprojector: str | None = None
    dtype: str = "auto"
    device: str = "cpu"

    def check(self, names: Mapping[str, str] | None = None) -> None:
        """Every setting checked (see :func:`check_inputs`), the LoRA stack read.

        Raises:
            SettingError, UnknownSamplerError: a bad setting.
            PromptSyntaxError, PromptLimitError, PromptNotSupportedError: a bad prompt.
            LoraSpecError, BlockWeightError: a LoRA multiplier or ``lbw=`` out of range.
        """
        check_inputs(self.params, dict(names or {}))
        check_dtype_name(self.dtype, (names or {}).get("dtype", "dtype"))
        self.lora_specs()
        check_prompt_texts(self.params)
        for index, unit in enumerate(self.controls):
            unit.checked(f"ControlNet unit {index}")

    def load(self, **options: Any) -> Any:
        """``self.model`` with ``self.vae``, loaded in ``self.dtype`` on ``self.device``.

        ``model`` and ``vae`` are file paths (or diffusers folders); ``model`` may be a
        ``merge:A,B,...`` spec (model A loaded, the merge applied as patches:
        ``sdstack.merge.patch.load_merged``). ``options`` go to
        ``sdstack.models.load_model`` (``config_dir``, ``progress``, ``channels_last``).

        Raises:
            SettingError: the job names no model.
            CheckpointError, FileNotFoundError: as ``load_model``.
        """
        from sdstack.merge.patch import MergeSpec, is_merge_spec, load_merged
        from sdstack.models import load_model
        from sdstack.validate import SettingError

        if self.model is None:
            raise SettingError("the job names no model: set GenerationJob.model to a file")
        settings = {"vae": self.vae, "dtype": self.dtype, "device": self.device, **options}
        if isinstance(self.model, MergeSpec) or is_merge_spec(self.model):
            return load_merged(self.model, **settings)
        return load_model(self.model, **settings)

    def lora_specs(self) -> list[Any]:
        """The job's LoRA stack: the prompt's tags, then ``networks`` (``LoraSpec`` list)."""
        from sdstack.lora.job_stack import job_lora_specs

        return job_lora_specs(self.params.prompt, self.networks)

    def replace(self, **settings: Any) -> GenerationJob:
        """A copy with some :class:`GenerationParams` fields changed (grids use this)."""
        return dataclasses.replace(self, params=dataclasses.replace(self.params, **settings))

    @classmethod
    def from_infotext(cls, text: str, **settings: Any) -> GenerationJob:
        """A job from an infotext; ``settings`` (GenerationParams fields) override it.

        Raises:
            SdstackError: a field that does not parse, naming field and value.
        """
        from sdstack.control.unit import units_from_infotext
        from sdstack.generate.infotext import params_from_infotext, parse_infotext

        info = parse_infotext(text)
        values = {**params_from_infotext(info), **settings}
        return cls(
            params=GenerationParams(**values),
            model=info.get("Model"),
            vae=info.get("VAE"),
            model_hash=info.get("Model hash"),
            lora_hashes=parse_lora_hashes(info.get("Lora hashes", "")),
            unhonoured=unhonoured_fields(info, img2img=values.get("init_image") is not None),
            controls=tuple(units_from_infotext(info)),
            infotext_deprojector=info.get("Deprojector"),
        )

    def infotext(
        self,
        components: Any = None,
        *,
        seed: int | None = None,
        embeddings: Any = None,
        used_embeddings: tuple[str, ...] = (),
    ) -> str:
        """The reference infotext of this job (of its image with ``seed``, if given).

        ``components`` (a loaded model) gives ``Model``/``Model hash``; without it they
        come from ``self.model`` when that is a file.
        """
        from sdstack.generate.infotext import build_infotext, generation_fields

        if components is None:
            components = _file_refs(self.model, self.vae)
        fields = generation_fields(
            self.params,
            components=components,
            embeddings=embeddings,
            used_embeddings=used_embeddings,
        )
        if seed is not None:
            fields["Seed"] = seed
        if self.deprojector is not None:
            from sdstack.generate.deprojected import read_deprojector_folder

            fields["Deprojector"] = read_deprojector_folder(self.deprojector).title()
        return build_infotext(infotext_prompt_text(self.params), self.params.negative, fields)


def check_dtype_name(dtype: str, option: str = "dtype") -> None:
    """``dtype`` is one of ``auto``, ``fp32``, ``fp16``, ``bf16`` (torch-free check).

    Raises:
        SettingError: another value, naming ``option`` and the choices.
    """
    from sdstack.models.precision import DTYPE_CHOICES
    from sdstack.validate import SettingError

    if dtype not in DTYPE_CHOICES:
        raise SettingError(f"{option} {dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")


def check_prompt_texts(params: GenerationParams) -> None:
    """Read the prompt and the negative as generation will, without a model: every
    scheduled text of every AND part is parsed for emphasis, so a bad weight or a prompt
    past the limits fails before anything loads (linear in the prompt's length). A
    deprojected prompt is read as an embedding expression instead.

    Raises:
        PromptSyntaxError, PromptLimitError: as ``plan_prompt`` and ``parse_attention``.
        EmbeddingExpressionError: a deprojected prompt that does not parse.
    """
    from sdstack.generate.encoding import is_deprojected, read_deprojected_prompt
    from sdstack.generate.samplers import resolve_sampler
    from sdstack.prompt import parse_attention
    from sdstack.prompt.plan import plan_prompt

    steps = resolve_sampler(params.sampler, params.schedule_type)[0].schedule_steps(params.steps)
    texts = [(params.prompt, False), (params.negative, True)]
    if is_deprojected(params):  # an embedding expression, not the prompt language
        read_deprojected_prompt(params.prompt)
        texts = texts[1:]
    for text, negative in texts:
        for scheduled in plan_prompt(text, steps, negative=negative).texts():
            parse_attention(scheduled)


def parse_lora_hashes(value: str) -> dict[str, str]:
    """``"name1: abcdef123456, name2: 0123456789ab"`` -> ``{"name1": "abcdef123456", ...}``.

    Entries that are not ``name: hex`` are left out (the field is informational).
    """
    found = {}
    for entry in value.split(","):
        name, _, digest = entry.rpartition(":")
        digest = digest.strip().lower()
        if name.strip() and digest and all(c in "0123456789abcdef" for c in digest):
            found[name.strip()] = digest
    return found


def _file_refs(model: str | None, vae: str | None) -> SimpleNamespace:
    path = Path(model) if model is not None and Path(model).is_file() else None
    name = Path(model).stem if model is not None else None
    vae_path = Path(vae) if vae is not None and Path(vae).is_file() else None
    return SimpleNamespace(path=path, name=name, vae_path=vae_path)


def unhonoured_fields(info: Mapping[str, str], *, img2img: bool) -> dict[str, str]:
    """The fields of a parsed infotext that a job cannot apply, field -> value.

    Everything outside :data:`HONOURED_FIELDS` and :data:`INFORMATIONAL_FIELDS`, plus
    ``RNG`` other than CPU and ``Denoising strength`` without an init image.
    """
    result: dict[str, str] = {}
    for key, value in info.items():
        if key in HONOURED_FIELDS or key in INFORMATIONAL_FIELDS or is_control_field(key):
            continue
        if key.endswith(("-1", "-2")) and key[:-2] in info:
            continue  # the W and H halves of a WxH field
        if key == "RNG" and value == "CPU":
            continue
        if key == "Denoising strength" and img2img:
            continue
        result[key] = value
    return result


def is_control_field(key: str) -> bool:
    """``ControlNet 0``, ``ControlNet 1``, ...: a ControlNet unit's infotext field."""
    name, _, index = key.partition(" ")
    return name == "ControlNet" and index.isdigit()


def describe_unhonoured(unhonoured: Mapping[str, str]) -> str:
    """``Hires upscale: 2 (hires fix is not supported), RNG: GPU (...)`` for a note."""
    parts = []
    for key, value in unhonoured.items():
        note = next((n for prefix, n in FIELD_NOTES.items() if key.startswith(prefix)), None)
        parts.append(f"{key}: {value}" + (f" ({note})" if note else ""))
    return ", ".join(parts)
