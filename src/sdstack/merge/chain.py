"""Merge recipes: several merge steps in one TOML file, chained without intermediate files.

``sdstack merge --recipe mix.toml``::

    output = "final.safetensors"       # the last step's result
    dtype = "fp16"

    [[step]]
    name = "mix"                       # later steps may use it as a, b or c
    a = "anime.safetensors"
    b = "photo.safetensors"
    method = "weighted-sum"
    alpha = 0.3

    [[step]]
    a = "mix"
    b = "detail.safetensors"
    c = "base.safetensors"
    method = "add-difference"
    alpha = 0.5
    alpha_blocks = "0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1"

A step whose input names an earlier step reads that step's output tensor by tensor as
it is needed (:class:`StepSource`), in float32: nothing is written but the last output,
and no intermediate is ever whole in memory (one tensor of it at a time).
Step keys: ``a``, ``b``, ``c``, ``method``, ``alpha``, ``beta``, ``alpha_blocks``,
``beta_blocks``, ``options`` (a table), ``name``; top level: ``output``, ``dtype``,
``vae``, ``discard``, ``text_encoder``, ``vae_from`` (they apply to the last step).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdstack.merge import MergeError
from sdstack.merge.plan import MergeInputs, plan_merge
from sdstack.merge.reader import ROWS_ALL, TensorSource, open_source
from sdstack.merge.settings import MergeSettings, check_settings
from sdstack.merge.stream import tensor_pieces

STEP_KEYS = frozenset(
    {"name", "a", "b", "c", "method", "alpha", "beta", "alpha_blocks", "beta_blocks", "options"}
)
TOP_KEYS = frozenset({"output", "dtype", "vae", "discard", "text_encoder", "vae_from", "step"})
MAX_STEPS = 64


class RecipeError(MergeError):
    """A recipe file that cannot be run: a bad key, an unknown step name, a cycle."""


class StepSource(TensorSource):
    """A merge step's output as the input of a later step: each tensor is merged when it
    is read (float32), the last one kept for the row ranges read after it."""

    def __init__(self, name: str, inputs: MergeInputs, settings: MergeSettings) -> None:
        self._checked = check_settings(settings, 3 if inputs.c is not None else 2)
        self._plan = plan_merge(inputs, self._checked)
        self._inputs = inputs
        self._plans = {plan.key: plan for plan in self._plan.keys}
        super().__init__(name, {plan.key: plan.shape for plan in self._plan.keys})
        self._last: tuple[str, torch.Tensor] | None = None

    def dtype(self, key: str) -> torch.dtype:
        return self._plans[key].dtype

    def read(self, key: str, rows: slice | None = ROWS_ALL) -> torch.Tensor:
        if self._last is None or self._last[0] != key:
            pieces = list(tensor_pieces(self._plans[key], self._inputs, self._checked))
            self._last = (key, pieces[0] if len(pieces) == 1 else torch.cat(pieces))
        tensor = self._last[1]
        return tensor if rows is None or tensor.ndim == 0 else tensor[rows]

    def close(self) -> None:
        self._inputs.close()
        self._last = None


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe table, checked: known keys, 1..64 steps, each with a and b.

    Raises:
        RecipeError: a bad file or key (the message names the step and the key).
    """
    from sdstack.commands.grid_spec import GridSpecError, read_spec

    try:
        recipe = read_spec(path)
    except GridSpecError as error:
        raise RecipeError(str(error).replace("--spec", "--recipe", 1)) from None
    where = f"--recipe {str(path)!r}"
    unknown = set(recipe) - TOP_KEYS
    if unknown:
        raise RecipeError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; expected {sorted(TOP_KEYS)}"
        )
    steps = recipe.get("step")
    if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
        raise RecipeError(f"{where}: expected 1 to {MAX_STEPS} [[step]] tables")
    for index, step in enumerate(steps, 1):
        if not isinstance(step, dict):
            raise RecipeError(f"{where}: step {index} is not a table")
        bad = set(step) - STEP_KEYS
        if bad:
            raise RecipeError(f"{where}: step {index}: unknown key {sorted(bad)[0]!r}")
        if not isinstance(step.get("a"), str) or not isinstance(step.get("b"), str):
            raise RecipeError(f"{where}: step {index}: a and b (file or step name) are needed")
    return recipe


def step_settings(step: Mapping[str, Any], top: Mapping[str, Any], last: bool) -> MergeSettings:
    """A step's :class:`MergeSettings`: intermediate steps in float32, the last in the
    recipe's dtype with its VAE, discard and side choices."""
    from sdstack.merge.blocks import parse_merge_blocks

    values: dict[str, Any] = {
        "method": step.get("method", "weighted-sum"),
        "alpha": step.get("alpha", 0.5),
        "beta": step.get("beta", 0.0),
        "options": dict(step.get("options", {})),
        "dtype": top.get("dtype", "fp16") if last else "fp32",
    }
    for key in ("alpha_blocks", "beta_blocks"):
        if key in step:
            values[key] = parse_merge_blocks(str(step[key]))
    if last:
        for key in ("discard", "text_encoder", "vae_from"):
            if key in top:
                values[key] = top[key]
        if "vae" in top:
            values["vae"] = Path(top["vae"])
    return MergeSettings(**values)


def open_step_inputs(steps: list[dict[str, Any]], index: int, base: Path) -> MergeInputs:
    """The inputs of step ``index``: files (relative to the recipe's folder), or earlier
    steps by name (each a :class:`StepSource` over its own inputs)."""
    names = {step.get("name"): i for i, step in enumerate(steps[:index]) if step.get("name")}
    step = steps[index]

    def source(role: str) -> TensorSource | None:
        value = step.get(role)
        if value is None:
            return None
        if value in names:
            earlier = names[value]
            inputs = open_step_inputs(steps, earlier, base)
            return StepSource(value, inputs, step_settings(steps[earlier], {}, last=False))
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            raise RecipeError(
                f"step {index + 1}: {role} = {value!r}: no such file, and no earlier step "
                f"has that name (steps named so far: {sorted(names) or 'none'})"
            )
        return open_source(path)

    return MergeInputs(source("a"), source("b"), source("c"))


def run_recipe(
    recipe_path: str | Path,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: Any = None,
) -> Path:
    """Run every step of a recipe; only the last step's output is written (to ``out`` or
    the recipe's ``output``), streamed like :func:`merge.stream.merge_checkpoints`.

    Raises:
        RecipeError, MergeError: a bad recipe or inputs that do not fit (before writing).
    """
    from sdstack.merge.stream import _checked_output
    from sdstack.merge.writer import write_pieces

    recipe_path = Path(recipe_path)
    recipe = read_recipe(recipe_path)
    steps = recipe["step"]
    target = out if out is not None else recipe.get("output")
    if target is None:
        raise RecipeError(f'--recipe {str(recipe_path)!r}: give output = "FILE" or -o OUT')
    base = recipe_path.parent
    files = [base / s[r] for s in steps for r in ("a", "b", "c") if isinstance(s.get(r), str)]
    output = _checked_output(target, [f for f in files if f.is_file()], overwrite)
    settings = step_settings(steps[-1], recipe, last=True)
    inputs = open_step_inputs(steps, len(steps) - 1, base)
    try:
        checked = check_settings(settings, 3 if inputs.c is not None else 2)
        if settings.vae is not None:
            from sdstack.merge.vae_bake import open_vae

            inputs = dataclasses.replace(inputs, vae=open_vae(settings.vae))
        plan = plan_merge(inputs, checked)
        pieces = (tensor_pieces(key_plan, inputs, checked) for key_plan in plan.keys)
        metadata = {"format": "pt", "sdstack_merge_recipe": json.dumps(_recipe_note(recipe))}
        on_tensor = None if progress is None else (lambda d, t: progress("merging", d, t))
        write_pieces(
            output, plan.entries(), pieces, metadata, overwrite=overwrite, progress=on_tensor
        )
    finally:
        inputs.close()
    return output


def _recipe_note(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe as run (for the output's metadata): the steps and the top-level keys."""
    note = {key: value for key, value in recipe.items() if key != "step"}
    note["steps"] = [{k: v for k, v in step.items()} for step in recipe["step"]]
    return json.loads(json.dumps(note, default=str))
