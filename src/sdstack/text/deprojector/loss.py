"""The deprojector's training criterion: the reference's per-position weighted MSE.

Spec "Training" (the reference's later versions): weight 0 at position 0 (the fixed BOS
state), ``REAL_TOKEN_WEIGHT`` (25) at the real tokens ``1..eos`` (EOS included) and 1 at
the padding after it::

    loss = sum_{b,k} w_bk * mean_d (pred_bkd - target_bkd)^2 / sum_{b,k} w_bk

:func:`heldout_loss` is this loss of the teacher-forced prediction over the held-out
pairs (the early-stopping criterion of ``training.fit``).
"""

from __future__ import annotations

from typing import Any

import torch

from sdstack.text.deprojector.pairs import TrainingData

REAL_TOKEN_WEIGHT = 25.0


def position_weights(eos: torch.Tensor, positions: int = 77) -> torch.Tensor:
    """(B, positions) weights: 0 at position 0, 25 at ``1..eos``, 1 after."""
    k = torch.arange(positions, device=eos.device)
    weights = torch.where(k[None, :] <= eos[:, None], REAL_TOKEN_WEIGHT, 1.0)
    weights[:, 0] = 0.0
    return weights


def weighted_mse_terms(
    prediction: torch.Tensor, target: torch.Tensor, eos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_{b,k} w_bk mean_d (p - t)^2, sum_{b,k} w_bk)`` (summable over batches)."""
    weights = position_weights(eos.to(prediction.device), prediction.shape[1])
    per_position = (prediction - target).square().mean(dim=-1)
    return (weights.to(per_position.dtype) * per_position).sum(), weights.sum()


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """The spec's per-position weighted MSE (module docstring formula), a scalar."""
    total, weight = weighted_mse_terms(prediction, target, eos)
    return total / weight


def heldout_loss(model: Any, data: TrainingData, batch_size: int, device: Any) -> float:
    """The weighted loss of the teacher-forced prediction over the held-out pairs."""
    was_training = model.training
    model.eval()
    total = weight = 0.0
    with torch.no_grad():
        for start in range(0, len(data.heldout), batch_size):
            part = slice(start, start + batch_size)
            target = data.heldout.states[part].to(device)
            prediction = model.teacher_forced(data.heldout_embeddings[part].to(device), target)
            t, w = weighted_mse_terms(prediction, target, data.heldout.eos[part])
            total, weight = total + float(t), weight + float(w)
    model.train(was_training)
    return total / weight
