"""The deprojected encoding at generation: a job's deprojector and its conditioning.

Spec ``shared/spec/deprojector.md``, "Use in generation": the positive prompt's
conditioning is ``deproject(e)``, ``e`` the sentence embedding its expression denotes
(``sdstack.text.deprojector.arithmetic``: ``null + sum_i w_i (e_i - null)``, slerp about
``null``, pooled sums); the negative prompt is encoded normally. The positive schedule
is then one entry, one AND part of weight 1::

    [(steps, [(Conditioning(deprojector.decode(e), W^-1 e), 1.0)])]

so CFG, batches, seeds, samplers, img2img and ControlNet work as with a standard prompt.
Each text of the expression is one 77-token CLIP pass (longer texts are truncated, as in
training; ``pooled("a, b, ...")`` splits a long prompt into pieces).

Choices:

- The texts are embedded by the model's text encoder as the job runs it: with the job's
  LoRAs applied (so a LoRA's trigger words reach the embedding, as they reach the
  negative prompt). The deprojector was trained on the unpatched CLIP, so a LoRA that
  moves the text encoder far moves the embeddings off what it was trained on. The CLIP
  fingerprint check of ``load_deprojector`` (a warning) runs only while no LoRA is
  applied: a LoRA changes the fingerprint by design.
- Clip skip: the deprojector rebuilds the states of one CLIP layer, the clip skip N it
  was trained for (``config.clip_skip``). ``clip_skip="auto"`` takes N (for the negative
  prompt too, so both sides of CFG come from the same layer); any other value is used for
  the negative prompt, with the ``load_deprojector`` warning when it is not N.

This module imports torch only inside its functions, so the command line can check a
deprojector folder (:func:`read_deprojector_folder`) before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdstack.errors import SdstackWarning
from sdstack.generate.encoding import (
    DEPROJECTED,
    DEPROJECTOR_FIELD,
    ENCODING_FIELD,
    check_encoding,
    deprojector_title,
    read_deprojected_prompt,
)
from sdstack.validate import SettingError

DeprojectorSource = Any
"""What a job's deprojector may be given as: a folder (``str`` / ``PathLike``), a loaded
``Deprojector`` module, or a :class:`JobDeprojector`."""


@dataclass(frozen=True)
class DeprojectorFolder:
    """A deprojector folder checked without loading its weights.

    Attributes:
        path: the folder.
        config: its ``DeprojectorConfig`` (v1 layout: the one its CLIP config implies).
        weights: the weights file (``model.safetensors`` or v1's ``pytorch_model.bin``).
    """

    path: Path
    config: Any
    weights: Path

    @property
    def name(self) -> str:
        """The folder's name, as the infotext records it."""
        return self.path.resolve().name

    def title(self) -> str:
        """The ``Deprojector`` infotext value: ``name [10-hex sha256 of the weights]``."""
        from sdstack.models.hashes import short_hash

        return deprojector_title(self.name, short_hash(self.weights))


@dataclass(frozen=True)
class JobDeprojector:
    """A loaded deprojector and where it came from.

    Attributes:
        model: the ``Deprojector`` (eval mode).
        name: the folder's name, None for a module given directly.
        short_hash: first 10 hex of the sha256 of its weights file, or None.
    """

    model: Any
    name: str | None = None
    short_hash: str | None = None

    @property
    def clip_skip(self) -> int:
        """The clip skip N the deprojector was trained for."""
        return int(self.model.config.clip_skip)

    def fields(self) -> dict[str, str]:
        """Infotext fields: ``Encoding: deprojected`` and, when named, ``Deprojector``."""
        fields = {ENCODING_FIELD: DEPROJECTED}
        if self.name is not None:
            fields[DEPROJECTOR_FIELD] = deprojector_title(self.name, self.short_hash)
        return fields


def read_deprojector_folder(
    folder: str | os.PathLike[str], what: str = "deprojector"
) -> DeprojectorFolder:
    """Check a deprojector folder without torch: a folder, a valid ``config.json``, a
    weights file (``model.safetensors``, or the v1 layout's ``pytorch_model.bin``).

    Raises:
        DeprojectorFileError: missing folder, config or weights; an invalid config. The
            message starts with ``what`` and the folder.
    """
    from sdstack.text.deprojector import DeprojectorError
    from sdstack.text.deprojector.config import DeprojectorConfig
    from sdstack.text.deprojector.files import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        DeprojectorFileError,
        read_json_file,
    )
    from sdstack.text.deprojector.v1_layout import WEIGHTS_NAME as V1_WEIGHTS
    from sdstack.text.deprojector.v1_layout import is_v1_layout, v1_config

    path = Path(folder).expanduser()
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise DeprojectorFileError(
            f"{what} {str(folder)!r} {problem}; expected a deprojector folder holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (made by `sdstack deproject train`)"
        )
    config_path = path / CONFIG_NAME
    try:
        data = read_json_file(config_path, "deprojector config")
        if is_v1_layout(path):
            return DeprojectorFolder(path, v1_config(config_path, data), path / V1_WEIGHTS)
        config = DeprojectorConfig.from_dict(data)
    except DeprojectorError as error:
        raise DeprojectorFileError(f"{what} {str(folder)!r}: {error}") from None
    if not (path / WEIGHTS_NAME).is_file():
        raise DeprojectorFileError(
            f"{what} {str(folder)!r}: no {WEIGHTS_NAME} (expected the deprojector weights "
            f"beside {CONFIG_NAME})"
        )
    return DeprojectorFolder(path, config, path / WEIGHTS_NAME)


def open_deprojector(
    source: DeprojectorSource, components: Any, *, clip_skip: float | None = None
) -> JobDeprojector:
    """The job deprojector of ``source`` (see :data:`DeprojectorSource`), on the text
    encoder's device.

    A folder is read with ``load_deprojector``, which warns (SdstackWarning) when the
    deprojector was trained on another CLIP (checked only while no LoRA is applied to the
    model) or for another clip skip than ``clip_skip`` (None: no check). A module is
    moved to that device (in place, as ``Module.to`` does); a :class:`JobDeprojector` is
    used as it is; both get the clip-skip warning.

    Raises:
        DeprojectorFileError: a folder that cannot be read.
        SettingError: ``source`` of another type.
    """
    from sdstack.lora.stack import active_loras
    from sdstack.text.deprojector.files import load_deprojector
    from sdstack.text.deprojector.model import Deprojector

    text_encoder = components.text_encoder
    device = next(text_encoder.parameters()).device
    if isinstance(source, JobDeprojector):
        _warn_clip_skip(source, clip_skip)
        return source
    if isinstance(source, Deprojector):
        job_deprojector = JobDeprojector(source.to(device).eval())
        _warn_clip_skip(job_deprojector, clip_skip)
        return job_deprojector
    if not isinstance(source, (str, os.PathLike)):
        raise SettingError(
            f"deprojector must be a folder, a Deprojector or a JobDeprojector, got "
            f"{type(source).__name__}"
        )
    folder = read_deprojector_folder(source)
    # A LoRA changes the fingerprint by design; without a recorded hash (v1) nothing is
    # compared and the loader may need the CLIP for the null embedding.
    unpatched = active_loras(components) is None or folder.config.clip_hash is None
    model = load_deprojector(
        folder.path,
        text_encoder=text_encoder if unpatched else None,
        clip_skip=clip_skip,
        device=device,
        tokenizer=components.tokenizer,
    )
    from sdstack.models.hashes import short_hash

    return JobDeprojector(model, folder.name, short_hash(folder.weights))


def _warn_clip_skip(deprojector: JobDeprojector, clip_skip: float | None) -> None:
    if clip_skip is not None and clip_skip != deprojector.clip_skip:
        warnings.warn(
            f"deprojector {deprojector.name or '(in memory)'} was trained for clip skip "
            f"{deprojector.clip_skip}, used at clip skip {clip_skip:g}; train one with "
            f"--clip-skip {clip_skip:g} for this",
            SdstackWarning,
            stacklevel=4,
        )


def prepare_deprojected(
    components: Any, params: Any, deprojector: DeprojectorSource | None
) -> tuple[Any, JobDeprojector | None]:
    """``prepare``'s deprojector step: the encoding and the deprojector checked together,
    ``clip_skip="auto"`` settled to the deprojector's N, the deprojector opened.

    Returns:
        ``(params, JobDeprojector)`` for the deprojected encoding, ``(params, None)``
        for the standard one.

    Raises:
        SettingError: the deprojected encoding without a deprojector, or a deprojector
            with the standard encoding.
        DeprojectorFileError: a folder that cannot be read.
    """
    from sdstack.generate.params import AUTO_CLIP_SKIP

    params = dataclasses.replace(params, encoding=check_encoding(params.encoding))
    deprojected = params.encoding == DEPROJECTED
    if deprojector is None and deprojected:
        raise SettingError(
            "encoding 'deprojected' needs a deprojector: pass deprojector=FOLDER "
            "(GenerationJob.deprojector; --deprojector DIR on the command line)"
        )
    if deprojector is None:
        return params, None
    if not deprojected:
        raise SettingError(
            f"a deprojector was given, but the encoding is {params.encoding!r}: set "
            "encoding='deprojected' to use it (or leave the deprojector out)"
        )
    explicit = None if params.clip_skip == AUTO_CLIP_SKIP else params.clip_skip
    job_deprojector = open_deprojector(deprojector, components, clip_skip=explicit)
    if explicit is None:
        params = dataclasses.replace(params, clip_skip=job_deprojector.clip_skip)
    return params, job_deprojector


def deprojected_schedule(
    prompt: str, deprojector: JobDeprojector, components: Any, steps: int
) -> list[tuple[int, list[tuple[Any, float]]]]:
    """The positive schedule of a deprojected prompt: one entry, one part of weight 1
    (the formula of the module docstring; the tensor equals ``deprojected_states``).

    Raises:
        EmbeddingExpressionError, PromptNotSupportedError: a prompt that cannot be read.
    """
    import torch

    from sdstack.text.conditioning import Conditioning
    from sdstack.text.deprojector.arithmetic import evaluate_expression

    expression, _tags = read_deprojected_prompt(prompt)
    model = deprojector.model
    text_encoder, tokenizer = components.text_encoder, components.tokenizer
    with torch.no_grad():
        embedding = evaluate_expression(
            expression, lambda texts: model.embed(text_encoder, tokenizer, texts), model.null
        )[None].to(model.null.dtype)
        states = model.decode(embedding)
        pooled = model.pooled_from_embedding(embedding)
    return [(steps, [(Conditioning(states, pooled), 1.0)])]
