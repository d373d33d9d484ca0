"""``sdstack merge``: checkpoints merged tensor by tensor, straight into the output file.

Steps of :func:`merge_checkpoints`:

1. Check the settings (method, multipliers, blocks, dtype, options, regex) and the output
   path (a new ``.safetensors`` file that is none of the inputs), before opening anything.
2. Read the inputs' headers only and check them (``merge.checks``: SD1.x, A's UNet names
   and shapes, the conv_in rule), then plan every output tensor (``merge.plan``). A pair
   that does not fit is refused here, before any tensor is read or any file written.
3. Start hashing the inputs (sha256, cached) for the ``sd_merge_recipe`` /
   ``sd_merge_models`` metadata (``merge.recipe``) in a background thread.
4. Stream: for each output tensor, read its tensors from A, B (and C) with plain file reads
   (``merge.reader``), merge in float32 (``merge.methods.merge_tensor``), cast to the
   output dtype and append to a temporary file beside the output (``merge.writer``).
   The header, written first with placeholder hashes, is rewritten with the real ones,
   and the file renamed into place at the end. An error or an interruption leaves no
   file (and stops the hashing).

Memory: one tensor at a time. The element-wise methods (weighted sum, add difference, sum
twice, triple sum, train difference) and the copied tensors go further and work in row
ranges of at most :data:`CHUNK_ELEMENTS` elements, so even the 49408 x 768 token embedding
is never whole in memory; TIES, DARE and slerp need whole tensors (a top-k, a seeded mask
and a norm over the tensor), so they hold three or four copies of the largest one.

:func:`merge_state_dicts` applies the same plan and the same per-key computation
(:func:`merged_tensors`) to state dicts in memory; its result equals the streamed file
bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdstack.merge import MergeError
from sdstack.merge.checks import position_ids
from sdstack.merge.plan import (
    FROM_A,
    FROM_B,
    FROM_VAE,
    MERGE,
    MERGE_4CH,
    POSITION_IDS,
    KeyPlan,
    MergeInputs,
    MergePlan,
    plan_merge,
)
from sdstack.merge.reader import (
    DictSource,
    SafetensorsReader,
    TensorSource,
    open_source,
    row_slices,
)
from sdstack.merge.settings import CheckedSettings, MergeSettings, check_settings

__all__ = [
    "CHUNK_ELEMENTS",
    "MergeError",
    "MergeInputs",
    "MergeResult",
    "MergeSettings",
    "merge_checkpoints",
    "merge_state_dicts",
    "merged_tensors",
]

CHUNK_ELEMENTS = 1 << 20
"""Elements per row range of an element-wise merge or a copy (4 MiB in float32: buffers
this size are reused by the allocator, while 16 MiB ones cost page faults each time)."""
ELEMENTWISE_METHODS = frozenset(
    {"weighted-sum", "add-difference", "sum-twice", "triple-sum", "train-difference"}
)
"""Methods whose result at an element depends on that element only (merged in row ranges)."""
ProgressCallback = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: "merging" (tensors), then "hashing" (bytes) if the
inputs' hashes are still being computed."""


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_checkpoints` wrote."""

    path: Path
    tensors: int
    merged: int
    copied: int
    discarded: tuple[str, ...]
    kept_from_a: tuple[str, ...]
    dropped: tuple[str, ...]
    recipe: dict[str, Any]


def _row_ranges(plan: KeyPlan, checked: CheckedSettings) -> list[slice | None]:
    elementwise = plan.action == MERGE and checked.method.name in ELEMENTWISE_METHODS
    if elementwise or plan.action in (FROM_A, FROM_B):
        return row_slices(plan.shape, CHUNK_ELEMENTS)
    return [None]


def _copied(source: TensorSource, key: str, rows: slice | None, dtype: torch.dtype):
    """A tensor of ``source`` in ``dtype``, never sharing memory with a state dict."""
    tensor = source.read(key, rows)
    return tensor.to(dtype, copy=not isinstance(source, SafetensorsReader))


def _merged(plan: KeyPlan, inputs: MergeInputs, checked: CheckedSettings, rows: slice | None):
    from sdstack.merge.methods import merge_tensor

    a = inputs.a.read(plan.key, rows)
    b = inputs.b.read(plan.b_key, rows)
    c = inputs.c.read(plan.c_key, rows) if plan.c_key is not None else None
    common = {"alpha": plan.alpha, "beta": plan.beta, "key": plan.key, "options": checked.options}
    if plan.action == MERGE_4CH:
        merged = a.to(torch.float32, copy=True)
        merged[:, 0:4] = merge_tensor(checked.method, a[:, 0:4], b, c, **common)
    else:
        merged = merge_tensor(checked.method, a, b, c, **common)
    return merged.to(plan.dtype)


def tensor_pieces(
    plan: KeyPlan, inputs: MergeInputs, checked: CheckedSettings
) -> Iterator[torch.Tensor]:
    """The tensor written under ``plan.key``, as row ranges in order (one for most)."""
    if plan.action == POSITION_IDS:
        yield position_ids(plan.shape)
        return
    if plan.action == FROM_VAE:
        yield _copied(inputs.vae, plan.key, None, plan.dtype).reshape(plan.shape)
        return
    for rows in _row_ranges(plan, checked):
        if plan.action == FROM_A:
            yield _copied(inputs.a, plan.key, rows, plan.dtype)
        elif plan.action == FROM_B:
            yield _copied(inputs.b, plan.b_key, rows, plan.dtype)
        else:
            yield _merged(plan, inputs, checked, rows)


def _models(inputs: MergeInputs) -> int:
    return 3 if inputs.c is not None else 2


def merged_tensors(
    inputs: MergeInputs, settings: MergeSettings | CheckedSettings
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each output ``(key, tensor)`` of merging ``inputs`` with ``settings``, in file order.

    The plan (checks included) is made before the first tensor is yielded. ``inputs.vae``
    is used as the baked VAE (``settings.vae`` is not opened here).

    Raises:
        MergeError, UnknownMergeMethodError: as :func:`merge_checkpoints`.
    """
    checked = settings if isinstance(settings, CheckedSettings) else None
    checked = checked or check_settings(settings, _models(inputs))
    plan = plan_merge(inputs, checked)
    return _tensors(plan, inputs, checked)


def _tensors(plan: MergePlan, inputs: MergeInputs, checked: CheckedSettings):
    for key_plan in plan.keys:
        pieces = list(tensor_pieces(key_plan, inputs, checked))
        yield key_plan.key, pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def merge_state_dicts(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    c: Mapping[str, torch.Tensor] | None,
    settings: MergeSettings,
) -> dict[str, torch.Tensor]:
    """The merge of state dicts (LDM single-file keys) in memory, by the rules of
    :func:`merge_checkpoints` (a ``settings.vae`` file is read and baked in).

    Raises:
        MergeError, UnknownMergeMethodError: as :func:`merge_checkpoints`.
        CheckpointError: an unreadable VAE file.
    """
    from sdstack.merge.vae_bake import open_vae

    checked = check_settings(settings, 2 if c is None else 3)
    vae = open_vae(settings.vae) if settings.vae is not None else None
    sources = [DictSource(a, "A"), DictSource(b, "B"), None if c is None else DictSource(c, "C")]
    inputs = MergeInputs(*sources, vae=vae)
    try:
        return dict(merged_tensors(inputs, checked))
    finally:
        inputs.close()


def _open_inputs(paths: list[Path | None], vae: Path | None) -> MergeInputs:
    from sdstack.merge.vae_bake import open_vae

    opened: list[TensorSource | None] = []
    try:
        for path in paths:
            opened.append(None if path is None else open_source(path))
        opened.append(None if vae is None else open_vae(vae))
    except BaseException:
        for source in opened:
            if source is not None:
                source.close()
        raise
    return MergeInputs(*opened)


def _checked_output(out: str | Path, inputs: list[Path], overwrite: bool) -> Path:
    from sdstack.lora.bake import BakeError, check_output

    try:
        return check_output(out, inputs, overwrite, "output")
    except BakeError as error:
        raise MergeError(str(error)) from error


def merge_checkpoints(
    a: str | Path,
    b: str | Path,
    c: str | Path | None,
    out: str | Path,
    settings: MergeSettings,
    *,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Merge the SD1.x single-file checkpoints ``a``, ``b`` (and ``c``) into ``out``.

    Args:
        a, b, c: ``.safetensors`` or weights-only pickle checkpoints (``c`` for the
            three-model methods, else None).
        out: the new ``.safetensors`` file (written beside, then renamed into place).
        settings: the method and its parameters (:class:`MergeSettings`).
        progress: ``progress(phase, done, total)``: "merging" tensors, then "hashing"
            bytes while the hashes of uncached inputs are still being computed.
        overwrite: replace an existing ``out`` (never one of the inputs).

    Raises:
        MergeError: settings, inputs that do not fit (before anything is written), a bad
            output path; UnknownMergeMethodError: an unknown method; CheckpointError: an
            unreadable input; FileNotFoundError: a missing input.
    """
    from sdstack.merge.writer import write_pieces

    # 1. Check the settings and the output path.
    paths = [Path(a), Path(b), None if c is None else Path(c)]
    checked = check_settings(settings, 2 if c is None else 3)
    vae = None if settings.vae is None else Path(settings.vae)
    given = [path for path in (*paths, vae) if path is not None]
    output = _checked_output(out, given, overwrite)
    # 2. Read the headers, check the inputs, plan every tensor.
    inputs = _open_inputs(paths, vae)
    provenance = None
    try:
        plan = plan_merge(inputs, checked)
        # 3. Hash the inputs for the recipe, in the background while the tensors stream.
        provenance = _Provenance(inputs, checked, plan, output, progress)
        # 4. Stream the merge into the output; the header gets the hashes at the end.
        pieces = (tensor_pieces(key_plan, inputs, checked) for key_plan in plan.keys)
        on_tensor = None if progress is None else (lambda d, t: progress("merging", d, t))
        write_pieces(
            output,
            plan.entries(),
            pieces,
            provenance.provisional(),
            overwrite=overwrite,
            progress=on_tensor,
            final_metadata=provenance.final,
        )
    finally:
        if provenance is not None:
            provenance.job.cancel()
        inputs.close()
    merged = plan.count(MERGE, MERGE_4CH)
    return MergeResult(
        output,
        len(plan.keys),
        merged,
        len(plan.keys) - merged,
        plan.discarded,
        plan.kept_from_a,
        plan.dropped,
        provenance.recipe,
    )


class _Provenance:
    """The ``sd_merge_recipe`` / ``sd_merge_models`` metadata of a merge: provisional
    (placeholder hashes of the same length) until the inputs are hashed."""

    def __init__(
        self,
        inputs: MergeInputs,
        checked: CheckedSettings,
        plan: MergePlan,
        output: Path,
        progress: ProgressCallback | None,
    ) -> None:
        from sdstack.merge.recipe import HashJob

        sources = [s for s in (inputs.a, inputs.b, inputs.c) if s is not None]
        self.paths = [source.path for source in sources]
        self.metadata = [source.metadata for source in sources]
        self.checked, self.plan, self.output, self.progress = checked, plan, output, progress
        self.job = HashJob(self.paths)
        self.recipe: dict[str, Any] = {}

    def _metadata(self, digests: list[str]) -> dict[str, str]:
        from sdstack.merge.recipe import merge_models, merge_recipe, parent_models, recipe_metadata

        parents = parent_models(self.paths, self.metadata, digests)
        self.recipe = merge_recipe(
            self.checked.settings,
            self.checked.method,
            parents,
            custom_name=self.output.stem,
            options=self.checked.options,
            conv_in_channels=self.plan.conv_in_channels,
        )
        return recipe_metadata(self.recipe, merge_models(parents))

    def provisional(self) -> dict[str, str]:
        """The metadata with distinct placeholder hashes (64 hex digits each)."""
        return self._metadata([f"{index:064x}" for index in range(len(self.paths))])

    def final(self) -> dict[str, str]:
        """The metadata with the inputs' sha256, once hashed ("hashing" progress meanwhile)."""
        progress = self.progress
        on_bytes = None if progress is None else (lambda d, t: progress("hashing", d, t))
        return self._metadata(self.job.result(on_bytes))
