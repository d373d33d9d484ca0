"""Grid-wide rules of the reference X/Y/Z plot: loop order, the size guard, seeds, infotext.

- :func:`loop_order`: costly axes (checkpoint, VAE) loop outermost;
- :func:`check_grid_pixels`: the reference's "Maximum grid size" guard;
- :func:`fix_seeds`: seeds of -1 drawn once per grid (the reference's ``fix_axis_seeds``);
- :func:`grid_infotext_fields`: the fields the reference appends to a grid's infotext.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

from sdstack.errors import SdstackError
from sdstack.generate.grid_axes import Axis
from sdstack.generate.job import GenerationJob
from sdstack.validate import SettingError

SEED_DRAW = 4294967294
"""Seeds of -1 become ``random.randrange(4294967294)``, as the reference draws them."""
DEFAULT_MAX_MEGAPIXELS = 200.0
"""The reference option ``img_max_size_mp`` ("Maximum grid size"), default 200."""


class GridSizeError(SdstackError):
    """A grid whose image would pass the megapixel guard."""


def loop_order(axes: Mapping[str, Axis | None]) -> tuple[str, str, str]:
    """The reference's loop order by axis cost, outermost first.

    By default z, then y, with x innermost. The axis whose cost is strictly greater than
    both others goes outermost; of the other two, the one with the strictly greater cost
    comes second, on a tie the later-named one (x < y < z). A missing axis costs 0.
    """
    cost = {a: (axes.get(a).kind.cost if axes.get(a) is not None else 0.0) for a in "xyz"}
    first, second = "z", "y"
    for top in "xyz":
        rest = [a for a in "xyz" if a != top]
        if all(cost[top] > cost[a] for a in rest):
            first = top
            second = rest[0] if cost[rest[0]] > cost[rest[1]] else rest[1]
            break
    third = next(a for a in "xyz" if a not in (first, second))
    return first, second, third


def check_grid_pixels(
    n_x: int,
    n_y: int,
    n_z: int,
    width: int,
    height: int,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> None:
    """The reference's guard: ``round(n_x * n_y * n_z * width * height / 1e6)`` megapixels
    (Python's ``round``, halves to even) must be below ``max_megapixels``.

    Raises:
        GridSizeError: the grid is too large (the message says how to raise the limit).
        SettingError: ``max_megapixels`` not a positive number.
    """
    if (
        isinstance(max_megapixels, bool)
        or not isinstance(max_megapixels, (int, float))
        or not (0 < max_megapixels < float("inf"))
    ):
        raise SettingError(
            f"max_megapixels must be a positive number of megapixels, got {max_megapixels!r}"
        )
    megapixels = round(n_x * n_y * n_z * width * height / 1_000_000)
    if not megapixels < max_megapixels:
        raise GridSizeError(
            f"resulting grid would be too large ({megapixels} MPixels: {n_x}x{n_y}x{n_z} "
            f"cells of {width}x{height}); the maximum is {max_megapixels:g} MPixels: raise it "
            "with --max-megapixels (max_megapixels= in Python), or use fewer values or a "
            "smaller size"
        )


def fix_seeds(
    job: GenerationJob,
    axes: Mapping[str, Axis | None],
    *,
    vary_seeds: bool = False,
    rng: random.Random | None = None,
) -> tuple[GenerationJob, dict[str, Axis | None]]:
    """Seeds of -1 drawn once per grid, as the reference does unless "Keep -1 for seeds"
    (``vary_seeds``) is checked.

    First the job's seed (reference ``fix_seed``), then every -1 of each seed axis, in
    the order of ``axes``, becomes ``rng.randrange(4294967294)``; seed axes are marked
    ``fixed_seeds`` (infotext ``Fixed X Values``). With ``vary_seeds`` nothing changes:
    every cell with seed -1 draws its own when it is made.

    Returns:
        ``(job, axes)``, new objects; the arguments are unchanged.
    """
    axes = dict(axes)
    if vary_seeds:
        return job, axes
    rng = rng if rng is not None else random.Random()
    if job.params.seed == -1:
        job = job.replace(seed=rng.randrange(SEED_DRAW))
    for name, axis in axes.items():
        if axis is not None and axis.kind.name == "seed":
            values = tuple(rng.randrange(SEED_DRAW) if v == -1 else v for v in axis.values)
            axes[name] = dataclasses.replace(axis, values=values, fixed_seeds=True)
    return job, axes


def grid_infotext_fields(
    x: Axis | None, y: Axis | None = None, z: Axis | None = None
) -> dict[str, str]:
    """The fields the reference adds to a grid's infotext: ``Script: X/Y/Z plot``, then for
    each axis given ``X Type`` (its label), ``X Values`` (the text as written) and, for a
    seed axis with fixed seeds, ``Fixed X Values`` (``", "``-joined). Missing axes (the
    reference's "Nothing") add nothing; leave ``z`` out for a per-Z sub-grid."""
    fields = {"Script": "X/Y/Z plot"}
    for letter, axis in (("X", x), ("Y", y), ("Z", z)):
        if axis is None:
            continue
        fields[f"{letter} Type"] = axis.type_label
        fields[f"{letter} Values"] = axis.text
        if axis.fixed_seeds:
            fields[f"Fixed {letter} Values"] = ", ".join(str(v) for v in axis.values)
    return fields
