"""Closed-form tests for the Bradley-Terry reward loss."""

from __future__ import annotations

import math

import torch

from ltpost.losses.reward import bradley_terry_loss


def test_bradley_terry_closed_form():
    """Rewards chosen [2, 0], rejected [1, 1]: differences d = [1, -1].

    loss = mean(-log sigmoid(d)) = (log(1 + e^-1) + log(1 + e^1)) / 2 = (0.313262 + 1.313262) / 2 = 0.813262.
    accuracy = mean(d > 0) = 0.5; margin = mean(d) = 0; rewards {2, 0, 1, 1}: min 0, mean 1, max 2.
    """
    loss, metrics = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    assert metrics["accuracy"].item() == 0.5
    assert metrics["margin"].item() == 0.0
    assert (metrics["min_reward"].item(), metrics["mean_reward"].item(), metrics["max_reward"].item()) == (
        0.0,
        1.0,
        2.0,
    )


def test_margin_shifts_the_difference():
    """Chosen 3, rejected 1, margin 2: -log sigmoid(3 - 1 - 2) = -log(1/2) = log 2. Accuracy ignores the margin (1.0)."""
    loss, metrics = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=torch.tensor([2.0]))
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    assert metrics["accuracy"].item() == 1.0


def test_centering_term():
    """Chosen [1], rejected [1]: BT part -log sigmoid(0) = log 2; centering 0.01 * (1 + 1)^2 = 0.04; total log 2 + 0.04."""
    loss, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_rewards_coefficient=0.01)
    torch.testing.assert_close(loss, torch.tensor(math.log(2) + 0.04))


def test_gradient_raises_chosen_and_lowers_rejected():
    """d/dr_c of -log sigmoid(r_c - r_r) = -(1 - sigmoid(d)) < 0 and d/dr_r = +(1 - sigmoid(d)) > 0; at d = 0 both are
    -/+ 1/2 divided by the batch size 1."""
    chosen = torch.tensor([0.5], requires_grad=True)
    rejected = torch.tensor([0.5], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.5]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.5]))
