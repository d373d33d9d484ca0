"""Deprojector evaluation plot: cosine similarity and MSE per position, one line per method.

Two panels sharing the position axis (0..76): the cosine similarity between predicted
and teacher states (higher is better) and the MSE on a log scale from position 1
(position 0 is the exact BOS state).
Deprojector methods are solid lines, baselines dashed; a dotted vertical line marks the
held-out captions' mean EOS position (real tokens to its left, padding to its right).
Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend change,
no display needed) and saved atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_evaluation(evaluation: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``evaluation`` (an :class:`~sdstack.text.deprojector.evaluation.Evaluation`)
    as a PNG at ``path`` (replacing an older file); returns the path.

    Raises:
        OSError: the folder cannot be written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sdstack.atomic_files import replace, temporary_file

    figure = Figure(figsize=(10, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    cosine_axes, mse_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for method in evaluation.methods:
        style = {"linestyle": "--", "linewidth": 1.4} if method.baseline else {"linewidth": 2.0}
        positions = range(len(method.cosine))
        label = f"{method.name} (loss {method.loss:.3g}, cos tokens {method.cos_tokens:.3f})"
        (line,) = cosine_axes.plot(positions, method.cosine, label=label, **style)
        mse = [max(value, 1e-30) for value in method.mse[1:]]  # 0: the exact BOS state
        mse_axes.plot(positions[1:], mse, color=line.get_color(), **style)
    for axes in (cosine_axes, mse_axes):
        axes.axvline(evaluation.mean_eos, color="0.5", linestyle=":", linewidth=1)
        axes.grid(True, alpha=0.3)
    cosine_axes.set_ylabel("cosine similarity (higher is better)")
    cosine_axes.set_title(
        f"Deprojector vs teacher CLIP, per position: {evaluation.heldout} held-out "
        f"captions, clip skip {evaluation.clip_skip} (dotted: mean EOS position)"
    )
    cosine_axes.legend(loc="best", fontsize="small", framealpha=0.85)
    mse_axes.set_yscale("log")
    mse_axes.set_ylabel("MSE, positions 1+ (lower is better)")
    mse_axes.set_xlabel("token position (0 = BOS)")
    mse_axes.set_xlim(0, len(evaluation.methods[0].cosine) - 1)
    target = Path(path)
    with temporary_file(target.parent if str(target.parent) else ".", suffix=".png") as temp:
        figure.savefig(temp, format="png")
        replace(temp, target)
    return target
