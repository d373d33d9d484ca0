"""A generation job's LoRA stack: its prompt tags plus ``--lora`` entries, found and applied.

The stack of a job is, in order, the ``<lora:...>`` tags of its prompt and then
``job.networks`` (``--lora`` / Python). Names are found by name first (file stem,
``ss_output_name``), then, for a job read from an infotext, by the hash its
``Lora hashes`` field gives that name; every name that cannot be found is listed in one
error. Applying goes through :func:`sdstack.lora.stack.set_loras`, so consecutive jobs
switch stacks exactly; a job without LoRAs takes off the stack an earlier job applied
(one applied by the caller with ``set_loras`` is left as it is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from sdstack.lora.library import LoraLibrary, LoraNotFoundError
from sdstack.lora.spec import LoraSpec, spec_from_tag
from sdstack.prompt.plan import check_network_tags

JOB_OWNER = "job"


def prompt_lora_specs(prompt: str) -> list[LoraSpec]:
    """The prompt's ``<lora:...>`` tags as specs (torch-free: checked before loading).

    Raises:
        PromptSyntaxError, PromptNotSupportedError: as ``check_network_tags``.
        LoraSpecError, BlockWeightError: a multiplier or ``lbw=`` that cannot be used.
    """
    return [spec_from_tag(tag) for tag in check_network_tags(prompt)]


def job_lora_specs(prompt: str, networks: Sequence[Any] = ()) -> list[LoraSpec]:
    """The whole stack of a job: the prompt's tags, then ``networks``."""
    from sdstack.lora.spec import specs_from_entries

    return prompt_lora_specs(prompt) + specs_from_entries(networks)


def resolve_specs(
    specs: Sequence[LoraSpec],
    library: LoraLibrary,
    hashes: Mapping[str, str] | None = None,
) -> list[LoraSpec]:
    """Each spec with ``name`` replaced by its file's path (by name, then by hash).

    A file found by name whose hash is not the one ``hashes`` gives is used, with a
    warning naming both hashes.

    Raises:
        LoraNotFoundError: one or more names found neither way; the message lists all
            of them (with the hash tried) and the folders searched.
    """
    hashes = hashes or {}
    resolved, missing = [], []
    for spec in specs:
        short = hashes.get(spec.name)
        try:
            path = library.find(spec.name)
        except LoraNotFoundError as error:
            path = library.find_by_hash(short) if short else None
            if path is None:
                missing.append((spec.name, short, str(error)))
                continue
        else:
            if short:
                _check_hash(spec.name, path, short)
        resolved.append(dataclasses.replace(spec, name=str(path)))
    if missing:
        if len(missing) == 1 and missing[0][1] is None:
            raise LoraNotFoundError(missing[0][2])
        names = ", ".join(f"{name} (hash {short})" if short else name for name, short, _ in missing)
        raise LoraNotFoundError(
            f"could not find {len(missing)} LoRA(s) by name or hash: {names}; searched "
            f"{library.where()} (hashes are matched against files already hashed: run "
            "`sdstack models list --hashes` once)"
        )
    return resolved


def _check_hash(name: str, path: Any, short: str) -> None:
    """Warn when the file found by ``name`` is not the one the infotext's hash names."""
    import warnings

    from sdstack.errors import SdstackWarning
    from sdstack.models.library import lora_sha256

    actual = lora_sha256(path)
    if not actual.startswith(short.lower()):
        warnings.warn(
            f"LoRA {name}: the infotext's hash is {short}, but {path} has {actual[:12]}; "
            "using that file (the image may differ)",
            SdstackWarning,
            stacklevel=4,
        )


def apply_job_loras(
    components: Any,
    specs: Sequence[LoraSpec],
    library: LoraLibrary,
    hashes: Mapping[str, str] | None = None,
) -> Any:
    """Apply a job's stack (see the module docstring); returns the active ``LoraStack``
    or None when the model carries no LoRA."""
    from sdstack.lora.stack import active_loras, set_loras

    patcher = getattr(components, "patcher", None)
    if not specs:
        if patcher is not None and getattr(patcher, "lora_owner", None) == JOB_OWNER:
            set_loras(components, [])
        return active_loras(components)
    stack = set_loras(components, resolve_specs(specs, library, hashes), library=library)
    components.patcher.lora_owner = JOB_OWNER
    return stack if stack.loras else None


def prepare_job_loras(
    components: Any,
    params: Any,
    *,
    networks: Sequence[Any] = (),
    hashes: Mapping[str, str] | None = None,
    library: LoraLibrary | None = None,
    lora_dirs: Sequence[str] = (),
) -> tuple[Any, Any]:
    """Apply the stack of a job (prompt tags, then ``networks``) and settle its clip skip.

    ``clip_skip="auto"`` becomes the value the active LoRAs were trained with when they
    agree, else 1; a clip skip that differs from what an active LoRA was trained with is
    warned about once per (LoRAs, clip skip).

    Returns:
        ``(params with a numeric clip_skip, the active LoraStack or None)``.
    """
    from sdstack.generate.params import AUTO_CLIP_SKIP
    from sdstack.lora.trained_clip_skip import agreed_clip_skip

    specs = job_lora_specs(params.prompt, networks)
    if specs and library is None:
        from sdstack.models.root import open_library

        library = LoraLibrary(open_library(None), lora_dirs)
    stack = apply_job_loras(components, specs, library or LoraLibrary(), hashes)
    loras = stack.loras if stack is not None else ()
    if params.clip_skip == AUTO_CLIP_SKIP:
        params = dataclasses.replace(params, clip_skip=agreed_clip_skip(loras))
    else:
        _advise_clip_skip(components, loras, params.clip_skip)
    return params, stack


def _advise_clip_skip(components: Any, loras: Sequence[Any], clip_skip: float) -> None:
    """Warn when ``clip_skip`` differs from what the LoRAs were trained with: once per
    (stack, clip skip) in a row on this model, not for every job of a grid or batch."""
    import warnings

    from sdstack.errors import SdstackWarning
    from sdstack.lora.trained_clip_skip import clip_skip_advice

    patcher = getattr(components, "patcher", None)
    key = (tuple(str(lora.path) for lora in loras), float(clip_skip))
    if patcher is None or getattr(patcher, "lora_advised", None) == key:
        return
    patcher.lora_advised = key
    message = clip_skip_advice(loras, clip_skip)
    if message is not None:
        warnings.warn(message, SdstackWarning, stacklevel=4)


def infotext_prompt(prompt: str, stack: Any) -> str:
    """The prompt as the infotext writes it: LoRAs that are not tags of the prompt
    (``--lora``, ``set_loras``) get their reference tag appended after a space, so the
    infotext reproduces the image here and in the reference UI (the tags come out
    again, and CLIP's tokenizer drops the spaces left behind: the same tokens)."""
    if stack is None:
        return prompt
    extra = [lora.spec.tag(lora.name) for lora in stack.loras if not lora.spec.in_prompt]
    return " ".join([prompt, *extra]) if prompt else " ".join(extra)


def with_bundled_embeddings(embeddings: Any, stack: Any) -> Any:
    """``embeddings`` plus the textual-inversion vectors bundled in the active LoRA files
    (``bundle_emb``); a name the embeddings folder already has keeps the folder's."""
    bundled = stack.embeddings() if stack is not None else {}
    if not bundled:
        return embeddings
    from sdstack.text.embeddings import Embedding, EmbeddingLibrary

    have = dict(embeddings.items()) if embeddings is not None else {}
    extra = [
        Embedding(name, vectors.float()) for name, vectors in bundled.items() if name not in have
    ]
    return EmbeddingLibrary([*have.values(), *extra])
