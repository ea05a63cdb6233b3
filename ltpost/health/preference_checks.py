"""Training-health checks of preference learning (DPO and its variants, reward models).

Pure functions over a ``History``; see ``ltpost.health.checks`` for the conventions and the registry.
"""

from __future__ import annotations

import math

from ltpost.health.base import Finding, History, RunInfo, _mean, _window


def likelihood_displacement(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 10,
    chosen_drop: float = 5.0,
    clear_chosen_drop: float = 3.0,
) -> Finding | None:
    """Chosen log-probs falling while margins grow: the loss pushes both responses down, the rejected faster."""
    chosen = history.values("train/logps/chosen")
    margins = history.values("train/rewards/margins")
    if len(chosen) < 2 * window or len(margins) < 2 * window:
        return None
    chosen_start, chosen_now = _mean(chosen[:window]), _mean(chosen[-window:])
    margin_start, margin_now = _mean(margins[:window]), _mean(margins[-window:])
    drop = chosen_start - chosen_now
    if drop < (clear_chosen_drop if active else chosen_drop) or (margin_now <= margin_start and not active):
        return None
    return Finding(
        "likelihood-displacement",
        "warning",
        "preference",
        f"logps/chosen fell from {chosen_start:.3g} to {chosen_now:.3g} (by {drop:.3g} nats per sequence) while "
        f"rewards/margins grew from {margin_start:.3g} to {margin_now:.3g}; the model is learning to lower the "
        "rejected response faster than the chosen one, not to write the chosen one",
        "Add an SFT term (loss_type: [sigmoid, sft], loss_weights: [1.0, 1.0]), raise beta, or lower the learning "
        "rate.",
        {
            "logps/chosen_start": chosen_start,
            "logps/chosen": chosen_now,
            "margins_start": margin_start,
            "margins": margin_now,
        },
    )


def accuracy_saturated_early(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 10,
    accuracy: float = 0.999,
    before_progress: float = 0.2,
    clear_accuracy: float = 0.95,
) -> Finding | None:
    """Every training pair already ranked right early in the run: pairs too easy, or the model memorizes them."""
    values = _window(history, "train/rewards/accuracies", window)
    if values is None:
        return None
    progress = info.progress
    if progress is None or (progress > before_progress and not active):
        return None
    now = _mean(values)
    if now < (clear_accuracy if active else accuracy):
        return None
    held_out = history.values("eval/rewards/accuracies")
    held_text = f"; held-out accuracy is {held_out[-1]:.3g}" if held_out else ""
    return Finding(
        "accuracy-saturated-early",
        "warning",
        "preference",
        f"rewards/accuracies is {now:.3g} over the last {len(values)} logged steps at {progress:.0%} of the run"
        f"{held_text}; once every pair is ranked right the loss only sharpens margins (overfitting)",
        "Watch eval/rewards/accuracies; lower the learning rate or the number of steps, raise beta, or use harder "
        "pairs.",
        {
            "rewards/accuracies": now,
            "progress": progress,
            "eval/rewards/accuracies": held_out[-1] if held_out else math.nan,
        },
    )


def margin_explosion(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    margin: float = 10.0,
    clear_margin: float = 7.0,
) -> Finding | None:
    """Implicit-reward margins growing without bound: the policy runs away from the reference."""
    values = _window(history, "train/rewards/margins", window)
    if values is None:
        return None
    now = _mean(values)
    if now < (clear_margin if active else margin):
        return None
    beta = info.settings.get("beta")
    return Finding(
        "margin-explosion",
        "warning",
        "preference",
        f"rewards/margins is {now:.3g} over the last {len(values)} logged steps (beta={beta}): the sigmoid loss is "
        "saturated and the policy keeps drifting from the reference",
        "Lower the learning rate, raise beta, or bound the margins (loss_type: ipo, or label_smoothing: 0.1).",
        {"rewards/margins": now, "beta": float(beta) if beta is not None else math.nan},
    )
