"""Training-health heuristics: pure decision functions over a window of recent metrics.

Each check reads a ``History`` (the values the run logged, newest last) and a ``RunInfo`` (where the run is) and
returns a ``Finding`` while its condition holds, else None. It never touches a trainer, a model or a device, so
the same functions run inside the ``TrainingHealth`` callback during training and in ``python -m ltpost.doctor``
over a finished run's TensorBoard events, and tests can drive them with scripted sequences.

Hysteresis lives in the thresholds: a check is called with ``active=True`` while its condition is already raised,
and then uses its (looser) ``clear_*`` threshold, so a value hovering at the trigger level does not flap between
raised and recovered. Every threshold is a keyword argument with a default; ``TrainingHealth(thresholds=...)``
overrides them by check code.

Metric names are those the modules log (TRL's, under ``train/`` and ``eval/``), plus ``train/grad_norm`` and
``train/padding_fraction`` (logged by every module on logging steps) and ``timing/*`` (measured by the callback).
"""

from __future__ import annotations

from collections.abc import Callable

from ltpost.health.base import Finding, History, RunInfo, Severity  # noqa: F401 (the public names live here too)
from ltpost.health.general_checks import (
    dataloader_starvation,
    generation_bound,
    grad_norm_spike,
    low_gpu_memory,
    nonfinite_loss,
    overfitting,
    padding_waste,
    plateau,
)
from ltpost.health.preference_checks import (
    accuracy_saturated_early,
    likelihood_displacement,
    margin_explosion,
)
from ltpost.health.rl_checks import (
    clip_ratio_high,
    completions_truncated,
    engine_logprob_mismatch,
    entropy_collapse,
    entropy_explosion,
    kl_blowup,
    length_hacking,
    reward_std_collapse,
)

# -- the registry ----------------------------------------------------------------------------------------------------

Check = Callable[..., Finding | None]

CHECKS: dict[str, Check] = {
    "reward-std-collapse": reward_std_collapse,
    "clip-ratio-high": clip_ratio_high,
    "kl-blowup": kl_blowup,
    "entropy-collapse": entropy_collapse,
    "entropy-explosion": entropy_explosion,
    "completions-truncated": completions_truncated,
    "length-hacking": length_hacking,
    "engine-logprob-mismatch": engine_logprob_mismatch,
    "likelihood-displacement": likelihood_displacement,
    "accuracy-saturated-early": accuracy_saturated_early,
    "margin-explosion": margin_explosion,
    "nonfinite-loss": nonfinite_loss,
    "grad-norm-spike": grad_norm_spike,
    "plateau": plateau,
    "overfitting": overfitting,
    "padding-waste": padding_waste,
    "generation-bound": generation_bound,
    "low-gpu-memory": low_gpu_memory,
    "dataloader-starvation": dataloader_starvation,
}

AREAS = {
    "rl-signal": "RL signal",
    "exploration": "exploration",
    "generation": "generation",
    "reward-hacking": "reward hacking",
    "preference": "preference learning",
    "optimization": "optimization",
    "stability": "stability",
    "progress": "progress",
    "generalization": "generalization",
    "throughput": "throughput",
}
