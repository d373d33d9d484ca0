"""Resumable deprojector training: the state file ``<out>/training-state.pt``.

``save_state`` writes the whole training state (weights, Adam state, best weights,
counters, history) atomically with ``torch.save``; ``load_state`` reads it back with
``torch.load(weights_only=True)`` (tensors and plain containers only) and refuses a state
whose :func:`run_signature` (sha256 over the settings, the model config and the data)
differs from the current run's, so a state file continues exactly the run that wrote it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from sdstack.text.deprojector import DeprojectorError
from sdstack.text.deprojector.pairs import TrainingData

STATE_FILE = "training-state.pt"


class TrainingError(DeprojectorError):
    """Training cannot start or continue as asked (bad settings, a mismatched state)."""


def run_signature(settings: Any, model: Any, data: TrainingData) -> str:
    """sha256 over the settings, the model config and the data: a state file belongs to
    exactly one run."""
    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for tensor in (data.embeddings, data.target_index, data.heldout.eos, data.targets.eos):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def copy_state(model: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_state(path: Path, signature: str, state: dict, model: Any, optimizer: Any) -> None:
    """The whole training state, written atomically (torch.save, read back weights-only)."""
    from sdstack.atomic_files import replace, temporary_file

    payload = {
        "format": "sdstack.deproject.training-state/1",
        "signature": signature,
        "state": {**state, "best_model": state["best_model"]},
        "model": copy_state(model),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }
    with temporary_file(path.parent, suffix=".pt") as temporary:
        torch.save(payload, temporary)
        replace(temporary, path)


def load_state(path: Path, signature: str, model: Any, optimizer: Any) -> dict | None:
    """The saved state of this run (weights and Adam state loaded), or None if none.

    Raises:
        TrainingError: unreadable, or saved by a run with other settings or data.
    """
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or "signature" not in payload:
            raise ValueError("not an sdstack training state")
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        if isinstance(error, pickle.UnpicklingError):
            reason = "not a torch file of tensors, or corrupt"
        raise TrainingError(
            f"training state {str(path)!r} cannot be read ({reason}); delete it to start over"
        ) from None
    if payload["signature"] != signature:
        raise TrainingError(
            f"{str(path.parent)!r} holds a training run with other settings, model or "
            "captions; run the same command as before to continue it, or choose a new --out"
        )
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        state = dict(payload["state"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise TrainingError(
            f"training state {str(path)!r} does not fit this model ({error}); delete it to "
            "start over"
        ) from None
    return state
