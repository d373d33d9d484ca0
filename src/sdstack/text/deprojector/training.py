"""Deprojector training: the reference's weighted loss, augmentation, early stopping, resume.

Loss (:mod:`~sdstack.text.deprojector.loss`, spec "Training", the reference's later
versions): per-position weighted MSE with weight 0 at position 0 (the fixed BOS state),
``REAL_TOKEN_WEIGHT`` (25) at the real tokens ``1..eos`` (EOS included) and 1 at the
padding after it::

    loss = sum_{b,k} w_bk * mean_d (pred_bkd - target_bkd)^2 / sum_{b,k} w_bk

Data: the captions are split into training and held-out captions (seeded,
``holdout`` fraction); the training captions are augmented once with a seeded plan (40%
normal, 30% split, 30% combine: :func:`~sdstack.text.deprojector.pairs.plan_augmentation`)
and the teacher's pairs come from the shard cache. Optimiser: Adam (``lr``), teacher
forcing (``Deprojector.teacher_forced``, which the parallel decoder answers with its
prediction). Step ``s`` trains on batch ``s mod steps_per_epoch`` of epoch
``s // steps_per_epoch``'s seeded permutation, so the batches are a function of the step.

Early stopping: the held-out weighted loss (teacher-forced) is measured at step 0,
every ``eval_every`` steps and at the last step; after ``patience`` measurements without
a new best, training stops. The result holds the best weights.

Resume (:mod:`~sdstack.text.deprojector.training_state`): every ``save_every`` steps the
whole state (weights, Adam state, best weights, counters, history) is saved atomically to
``<out>/training-state.pt``; a later call with the same settings and captions continues
from it, and because the batches depend only on the step, the final weights equal an
uninterrupted run's (bit for bit on the CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdstack.text.deprojector.loss import REAL_TOKEN_WEIGHT as REAL_TOKEN_WEIGHT
from sdstack.text.deprojector.loss import heldout_loss, weighted_mse
from sdstack.text.deprojector.loss import position_weights as position_weights
from sdstack.text.deprojector.loss import weighted_mse_terms as weighted_mse_terms
from sdstack.text.deprojector.pairs import TrainingData
from sdstack.text.deprojector.training_state import STATE_FILE as STATE_FILE
from sdstack.text.deprojector.training_state import TrainingError as TrainingError
from sdstack.text.deprojector.training_state import copy_state as _copy
from sdstack.text.deprojector.training_state import load_state as _load_state
from sdstack.text.deprojector.training_state import run_signature as run_signature
from sdstack.text.deprojector.training_state import save_state as _save_state
from sdstack.validate import check_int, check_number

RECORD_FILE = "training.json"


@dataclasses.dataclass
class TrainSettings:
    """Training options; ``steps`` (when set) overrides ``epochs``."""

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    holdout: float = 0.1
    eval_every: int | None = None
    patience: int = 5
    save_every: int = 100

    def check(self) -> TrainSettings:
        """``self`` if every option is in range.

        Raises:
            SettingError: naming the option, the value and the range.
        """
        check_int("epochs", self.epochs, 1, 1_000_000)
        if self.steps is not None:
            check_int("steps", self.steps, 1, 100_000_000)
        check_int("batch_size", self.batch_size, 1, 65536)
        check_number("lr", self.lr, 1e-12, 10.0)
        check_int("seed", self.seed, 0, 2**62)
        check_number("holdout", self.holdout, 0.0, 0.9)
        if self.eval_every is not None:
            check_int("eval_every", self.eval_every, 1, 100_000_000)
        check_int("patience", self.patience, 1, 1_000_000)
        check_int("save_every", self.save_every, 1, 100_000_000)
        return self


@dataclasses.dataclass
class TrainProgress:
    """What the progress callback receives after each step."""

    step: int
    total: int
    epoch: int
    loss: float
    heldout: float | None
    best: float


@dataclasses.dataclass
class TrainResult:
    """The trained model (best weights), where it stopped and why, and the history."""

    model: Any
    steps: int
    total: int
    best_step: int
    best_loss: float
    stopped_early: bool
    history: list[dict[str, float]]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch permutation."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def batch_indices(step: int, count: int, batch_size: int, seed: int) -> torch.Tensor:
    """Example indices of step ``step`` (the last batch of an epoch may be smaller)."""
    per_epoch = math.ceil(count / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    return order[index * batch_size : (index + 1) * batch_size]


def fit(
    model: Any,
    data: TrainingData,
    settings: TrainSettings,
    *,
    state_dir: str | Path | None = None,
    device: Any = "cpu",
    on_progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` (module docstring: loss, stopping, resume).

    Args:
        state_dir: folder of ``training-state.pt``; None: no saving, no resume.
        device: torch device to train on (the model is moved there).
        on_progress: called after every step with a :class:`TrainProgress`.

    Raises:
        TrainingError: the state file is unreadable or belongs to another run.
    """
    # 1. check inputs; the step plan
    settings.check()
    count = len(data.embeddings)
    per_epoch = math.ceil(count / settings.batch_size)
    total = settings.steps if settings.steps is not None else settings.epochs * per_epoch
    eval_every = settings.eval_every or per_epoch
    model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], settings.lr)
    signature = run_signature(settings, model, data)
    state_path = None if state_dir is None else Path(state_dir) / STATE_FILE
    # 2. start, or continue a saved run
    state = _load_state(state_path, signature, model, optimizer) if state_path else None
    if state is None:
        state = {"step": 0, "best_loss": heldout_loss(model, data, settings.batch_size, device)}
        state.update(best_step=0, bad_evals=0, stopped=False, best_model=_copy(model))
        state["history"] = [{"step": 0, "heldout": state["best_loss"]}]
    # 3. the steps
    model.train()
    while state["step"] < total and not state["stopped"]:
        step = state["step"]
        loss = _train_step(model, optimizer, data, settings, step, device)
        state["step"] = step + 1
        heldout = None
        if state["step"] % eval_every == 0 or state["step"] == total:
            heldout = heldout_loss(model, data, settings.batch_size, device)
            _early_stopping(state, heldout, model, settings.patience)
        if state_path and (state["step"] % settings.save_every == 0 or state["step"] == total):
            _save_state(state_path, signature, state, model, optimizer)
        if on_progress is not None:
            epoch = step // per_epoch
            on_progress(
                TrainProgress(state["step"], total, epoch, loss, heldout, state["best_loss"])
            )
    if state_path and state["stopped"]:
        _save_state(state_path, signature, state, model, optimizer)
    # 4. the best weights
    model.load_state_dict(state["best_model"])
    model.eval()
    return TrainResult(
        model=model,
        steps=state["step"],
        total=total,
        best_step=state["best_step"],
        best_loss=state["best_loss"],
        stopped_early=state["stopped"],
        history=state["history"],
    )


def _train_step(
    model: Any, optimizer: Any, data: TrainingData, settings: TrainSettings, step: int, device: Any
) -> float:
    """One Adam step on step ``step``'s batch; the batch's weighted loss."""
    index = batch_indices(step, len(data.embeddings), settings.batch_size, settings.seed)
    rows = data.target_index[index]
    target = data.targets.states[rows].to(device)
    prediction = model.teacher_forced(data.embeddings[index].to(device), target)
    loss = weighted_mse(prediction, target, data.targets.eos[rows])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _early_stopping(state: dict, heldout: float, model: Any, patience: int) -> None:
    """Record a held-out measurement; keep the best weights; stop after ``patience``
    measurements without a new best."""
    state["history"].append({"step": state["step"], "heldout": heldout})
    if heldout < state["best_loss"]:
        state.update(best_loss=heldout, best_step=state["step"], bad_evals=0)
        state["best_model"] = _copy(model)
        return
    state["bad_evals"] += 1
    if state["bad_evals"] >= patience:
        state["stopped"] = True


def train_deprojector(
    text_encoder: Any,
    tokenizer: Any,
    captions: list[str],
    out: str | Path,
    *,
    settings: TrainSettings | None = None,
    model_options: dict[str, Any] | None = None,
    device: Any = "cpu",
    cache_dir: str | Path | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a deprojector for ``text_encoder`` on ``captions`` into the folder ``out``.

    Builds ``Deprojector.from_clip(text_encoder, tokenizer, **model_options)`` (options:
    ``layers``, ``clip_skip``, ``decoder``, ``input_mlp``, ``ensemble``; the teacher's
    ``text_projection`` when it has one), prepares the data (pairs cached in
    ``cache_dir``, default ``out/pairs``), runs :func:`fit` with its state in ``out``
    (so the same call again continues an interrupted run), then writes the deprojector
    (``model.safetensors`` + ``config.json``) and ``training.json`` (settings, split,
    history, result) into ``out``.

    Raises:
        SettingError, TrainingError, DeprojectorError: bad settings or captions, a
            state file of another run.
    """
    from sdstack.text.deprojector.files import clip_fingerprint, save_deprojector
    from sdstack.text.deprojector.model import Deprojector
    from sdstack.text.deprojector.pairs import prepare_training_data

    # 1. check inputs; the model, initialised from the teacher
    settings = (settings or TrainSettings()).check()
    phase = on_phase or (lambda name: None)
    out = Path(out)
    projection = getattr(text_encoder, "text_projection", None)
    options = dict(model_options or {})
    if projection is not None:
        options.setdefault("projection", projection.weight)
    phase("initialising")
    model = Deprojector.from_clip(text_encoder, tokenizer, **options)
    # 2. the teacher's pairs (cached), the split and the augmentation
    phase("encoding captions")
    data, split = prepare_training_data(
        model,
        text_encoder,
        tokenizer,
        captions,
        holdout=settings.holdout,
        seed=settings.seed,
        cache_dir=out / "pairs" if cache_dir is None else cache_dir,
        fingerprint=model.config.clip_hash or clip_fingerprint(text_encoder),
    )
    # 3. train (resumes from out/training-state.pt)
    phase("training")
    result = fit(model, data, settings, state_dir=out, device=device, on_progress=on_progress)
    # 4. save the deprojector and the record
    phase("saving")
    model.to("cpu")
    save_deprojector(model, out)
    record = training_record(settings, model, captions, split, result)
    _write_json(out / RECORD_FILE, record)
    return result


def training_record(
    settings: TrainSettings, model: Any, captions: list[str], split: dict, result: TrainResult
) -> dict[str, Any]:
    """The ``training.json`` content: what ``sdstack deproject eval`` needs to re-split."""
    digest = hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()
    return {
        "format": "sdstack.deproject.training/1",
        "settings": dataclasses.asdict(settings),
        "decoder": model.config.decoder,
        "clip_skip": model.config.clip_skip,
        "captions": len(captions),
        "captions_sha256": digest,
        "train_captions": len(split["train"]),
        "heldout_captions": len(split["heldout"]),
        "steps": result.steps,
        "total_steps": result.total,
        "best_step": result.best_step,
        "best_heldout_loss": result.best_loss,
        "stopped_early": result.stopped_early,
        "history": result.history,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON at ``path``, atomically (replacing an older file)."""
    from sdstack.atomic_files import replace, temporary_file

    with temporary_file(path.parent, suffix=".json") as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        replace(temporary, path)
