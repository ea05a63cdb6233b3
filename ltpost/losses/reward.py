"""Reward-model losses: pure functions of per-sequence scalar rewards."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry pairwise loss, ``-log sigmoid(r_c - r_r - m)``, averaged over pairs.

    With ``margin`` (Llama 2's margin loss) the chosen reward must beat the rejected one by ``m``. With
    ``center_rewards_coefficient`` (Eisenstein et al., 2023) ``c * mean((r_c + r_r)^2)`` is added, which pulls
    rewards toward zero mean without changing their differences.

    Args:
        chosen_rewards: ``[B]`` scalar rewards of the chosen sequences.
        rejected_rewards: ``[B]`` of the rejected sequences.
        margin: ``[B]`` optional per-pair margins.
        center_rewards_coefficient: optional weight of the centering term.

    Returns:
        ``(loss, metrics)`` with ``loss``, ``accuracy``, ``margin``, ``min_reward``, ``mean_reward``, ``max_reward``.
    """
    differences = chosen_rewards - rejected_rewards  # [B]
    shifted = differences - margin if margin is not None else differences  # [B]
    loss = -F.logsigmoid(shifted).mean()  # []
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()  # []
    with torch.no_grad():
        rewards = torch.cat([chosen_rewards, rejected_rewards])  # [2B]
        metrics = {
            "loss": loss.detach(),
            "accuracy": (differences > 0).float().mean(),
            "margin": differences.mean(),
            "min_reward": rewards.min(),
            "mean_reward": rewards.mean(),
            "max_reward": rewards.max(),
        }
    return loss, metrics
