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

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "critical"]


# -- what a check sees ---------------------------------------------------------------------------------------------


class History:
    """The last ``maxlen`` logged values of each metric, as ``(step, value)`` pairs, newest last."""

    def __init__(self, maxlen: int = 500) -> None:
        self.maxlen = maxlen
        self.series: dict[str, deque[tuple[int, float]]] = {}

    def add(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            series = self.series.setdefault(name, deque(maxlen=self.maxlen))
            if series and series[-1][0] == step:
                series[-1] = (step, float(value))  # logged twice in one step: keep the latest
            else:
                series.append((step, float(value)))

    def values(self, name: str, last: int | None = None) -> list[float]:
        series = self.series.get(name, ())
        values = [value for _, value in series]
        return values if last is None else values[-last:]

    def steps(self, name: str, last: int | None = None) -> list[int]:
        series = self.series.get(name, ())
        steps = [step for step, _ in series]
        return steps if last is None else steps[-last:]

    def has(self, name: str, count: int = 1) -> bool:
        return len(self.series.get(name, ())) >= count

    def state_dict(self) -> dict[str, Any]:
        return {"maxlen": self.maxlen, "series": {name: list(values) for name, values in self.series.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.maxlen = state["maxlen"]
        self.series = {name: deque(map(tuple, values), maxlen=self.maxlen) for name, values in state["series"].items()}


@dataclass
class RunInfo:
    """Where the run is, for checks that depend on it.

    Attributes:
        step: the current optimizer step.
        max_steps: the run's planned optimizer steps (None: unknown).
        lr_ratio: the learning rate now over the highest seen so far (1.0 when unknown); below ~0.1 the schedule is
            annealing and a flat loss is expected.
        gradient_clip_val: the trainer's gradient clipping (None: off).
        accelerator: ``"cuda"``, ``"cpu"`` ...
        settings: the module's hyperparameters that actions refer to (``max_completion_length``, ``beta``,
            ``use_vllm`` ...), when known.
    """

    step: int
    max_steps: int | None = None
    lr_ratio: float = 1.0
    gradient_clip_val: float | None = None
    accelerator: str = "cpu"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float | None:
        return self.step / self.max_steps if self.max_steps else None


@dataclass
class Finding:
    """One condition a check found: a stable ``code``, the numbers behind it and what to do.

    Attributes:
        code: stable identifier (``reward-std-collapse``), what programs match on.
        severity: ``warning`` for most, ``critical`` when the run cannot go on (NaN loss).
        area: the part of the run it concerns (``rl-signal``, ``optimization``, ``preference``, ...).
        message: the evidence in words, with the numbers.
        action: what to change, naming the setting.
        evidence: the numbers, by name.
    """

    code: str
    severity: Severity
    area: str
    message: str
    action: str
    evidence: dict[str, float]

    def line(self, status: Literal["raised", "recovered"] = "raised") -> str:
        """The one human-readable line: ``[ltpost] WARNING code: message. action``."""
        if status == "recovered":
            return f"[ltpost] RECOVERED {self.code}: {self.message}."
        return f"[ltpost] {self.severity.upper()} {self.code}: {self.message}. {self.action}"


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _window(history: History, name: str, window: int) -> list[float] | None:
    """The last ``window`` values of ``name``, or None when fewer have been logged (the check then waits)."""
    values = history.values(name, window)
    return values if len(values) >= window else None


def _span(history: History, name: str, window: int) -> str:
    steps = history.steps(name, window)
    return f"steps {steps[0]}-{steps[-1]}" if steps else "no steps"


# -- online RL -------------------------------------------------------------------------------------------------------


def reward_std_collapse(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 10,
    frac_zero_std: float = 0.9,
    clear_frac_zero_std: float = 0.7,
) -> Finding | None:
    """Most prompt groups get the same reward for every completion, so group-relative advantages are ~0."""
    fracs = _window(history, "train/frac_reward_zero_std", window)
    if fracs is None:
        return None
    frac = _mean(fracs)
    if frac < (clear_frac_zero_std if active else frac_zero_std):
        return None
    std = _mean(history.values("train/reward_std", window))
    reward = _mean(history.values("train/reward", window))
    return Finding(
        "reward-std-collapse",
        "warning",
        "rl-signal",
        f"group reward std is {std:.3g} over the last {len(fracs)} logged steps "
        f"({_span(history, 'train/frac_reward_zero_std', window)}; frac_reward_zero_std={frac:.2f}, mean reward "
        f"{reward:.3g}); advantages are ~0 and the policy is not learning",
        "Make the reward denser (partial credit) or raise temperature/num_generations so completions of a prompt "
        "differ.",
        {"reward_std": std, "frac_reward_zero_std": frac, "reward": reward, "window": len(fracs)},
    )


def clip_ratio_high(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    region_mean: float = 0.2,
    clear_region_mean: float = 0.1,
) -> Finding | None:
    """Many tokens' importance ratios fall outside the clip range: the policy moves too far per round."""
    ratios = _window(history, "train/clip_ratio/region_mean", window)
    if ratios is None:
        return None
    ratio = _mean(ratios)
    if ratio < (clear_region_mean if active else region_mean):
        return None
    lr = _mean(history.values("lr", window))
    lr_text = f", learning rate {lr:.3g}" if not math.isnan(lr) else ""
    return Finding(
        "clip-ratio-high",
        "warning",
        "optimization",
        f"{ratio:.0%} of completion tokens are clipped (clip_ratio/region_mean over the last {len(ratios)} logged "
        f"steps{lr_text}); updates overshoot the trust region and the clipped tokens give no gradient",
        "Lower the learning rate, or train fewer times on each rollout (num_iterations, steps_per_generation).",
        {"clip_ratio/region_mean": ratio, "learning_rate": lr, "window": len(ratios)},
    )


def kl_blowup(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    kl: float = 0.5,
    clear_kl: float = 0.25,
) -> Finding | None:
    """The policy's per-token KL to the reference is large: it has moved far from where it started."""
    values = _window(history, "train/kl", window)
    if values is None:
        return None
    now = _mean(values)
    if now < (clear_kl if active else kl):
        return None
    first = history.values("train/kl")[0]  # the first logged KL (step 0: policy == reference, ~0)
    beta = info.settings.get("beta")
    return Finding(
        "kl-blowup",
        "warning",
        "stability",
        f"KL to the reference is {now:.3g} nats per token over the last {len(values)} logged steps (it started at "
        f"{first:.3g}; beta={beta})",
        "Lower the learning rate or raise beta; with a drifting but healthy policy, sync the reference "
        "(ReferenceModel mode: sync).",
        {"kl": now, "kl_first": first, "beta": float(beta) if beta is not None else math.nan, "window": len(values)},
    )


def entropy_collapse(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    entropy: float = 0.05,
    fraction_of_start: float = 0.1,
    clear_factor: float = 2.0,
) -> Finding | None:
    """Sampled completions have almost no entropy left: the policy stopped exploring (online methods only)."""
    if not history.has("train/frac_reward_zero_std"):
        return None  # SFT and preference losses lower the entropy on purpose
    values = _window(history, "train/entropy", window)
    if values is None or len(history.values("train/entropy")) < 2 * window:
        return None
    now, start = _mean(values), _mean(history.values("train/entropy")[:window])
    limit = max(entropy, fraction_of_start * start) * (clear_factor if active else 1.0)
    if now >= limit:
        return None
    return Finding(
        "entropy-collapse",
        "warning",
        "exploration",
        f"completion entropy fell to {now:.3g} nats per token over the last {len(values)} logged steps (it started "
        f"at {start:.3g}); completions of a prompt become identical and the reward std goes with them",
        "Raise temperature, lower the learning rate, or use clip-higher (epsilon_high: 0.28) to keep exploring.",
        {"entropy": now, "entropy_start": start, "window": len(values)},
    )


def entropy_explosion(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    factor_of_start: float = 2.0,
    entropy: float = 1.0,
    clear_factor_of_start: float = 1.5,
) -> Finding | None:
    """Completion entropy far above where it started: the policy is drifting towards noise (online methods)."""
    if not history.has("train/frac_reward_zero_std"):
        return None
    values = _window(history, "train/entropy", window)
    if values is None or len(history.values("train/entropy")) < 2 * window:
        return None
    now, start = _mean(values), _mean(history.values("train/entropy")[:window])
    factor = clear_factor_of_start if active else factor_of_start
    if now < max(factor * start, entropy if not active else 0.0):
        return None
    return Finding(
        "entropy-explosion",
        "warning",
        "exploration",
        f"completion entropy rose to {now:.3g} nats per token over the last {len(values)} logged steps, "
        f"{now / max(start, 1e-12):.1f}x where it started ({start:.3g}); sampled text is degrading towards noise",
        "Lower the learning rate or temperature; check the loss for a sign error in a custom reward.",
        {"entropy": now, "entropy_start": start, "window": len(values)},
    )


def completions_truncated(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    clipped_ratio: float = 0.5,
    clear_clipped_ratio: float = 0.3,
) -> Finding | None:
    """Most completions hit ``max_completion_length`` without ending: their rewards judge unfinished answers."""
    ratios = _window(history, "train/completions/clipped_ratio", window)
    if ratios is None:
        return None
    ratio = _mean(ratios)
    if ratio < (clear_clipped_ratio if active else clipped_ratio):
        return None
    limit = info.settings.get("max_completion_length")
    length = _mean(history.values("train/completions/mean_length", window))
    return Finding(
        "completions-truncated",
        "warning",
        "generation",
        f"{ratio:.0%} of completions hit max_completion_length={limit} without ending (mean length {length:.3g} "
        f"tokens, last {len(ratios)} logged steps)",
        "Raise max_completion_length, add ltpost.rewards.soft_overlong_penalty, or set "
        "mask_truncated_completions: true.",
        {"completions/clipped_ratio": ratio, "completions/mean_length": length, "window": len(ratios)},
    )


def length_hacking(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 10,
    length_growth: float = 1.5,
    min_length_increase: float = 8.0,
    clear_length_growth: float = 1.3,
) -> Finding | None:
    """Reward rising while completion length balloons: a reward that pays for length is being gamed."""
    lengths = history.values("train/completions/mean_length")
    rewards = history.values("train/reward")
    if len(lengths) < 2 * window or len(rewards) < 2 * window:
        return None
    length_start, length_now = _mean(lengths[:window]), _mean(lengths[-window:])
    reward_start, reward_now = _mean(rewards[:window]), _mean(rewards[-window:])
    growth = length_now / max(length_start, 1e-12)
    if growth < (clear_length_growth if active else length_growth) or length_now - length_start < min_length_increase:
        return None
    if reward_now <= reward_start and not active:
        return None
    return Finding(
        "length-hacking",
        "warning",
        "reward-hacking",
        f"reward rose from {reward_start:.3g} to {reward_now:.3g} while completions/mean_length grew {growth:.1f}x "
        f"({length_start:.3g} -> {length_now:.3g} tokens); the reward may be paying for length",
        "Read some completions; add a length penalty (ltpost.rewards.soft_overlong_penalty) or use a loss without "
        "length bias (dr_grpo, dapo).",
        {
            "reward_start": reward_start,
            "reward": reward_now,
            "mean_length_start": length_start,
            "mean_length": length_now,
        },
    )


def engine_logprob_mismatch(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    mean_difference: float = 0.05,
    clear_mean_difference: float = 0.03,
) -> Finding | None:
    """The rollout engine's sampling log-probs differ from the trainer's: the samples are off-policy."""
    values = _window(history, "train/sampling/sampling_logp_difference/mean", window)
    if values is None:
        return None
    difference = _mean(values)
    if difference < (clear_mean_difference if active else mean_difference):
        return None
    largest = max(history.values("train/sampling/sampling_logp_difference/max", window) or [math.nan])
    corrected = info.settings.get("vllm_importance_sampling_correction")
    action = (
        "Push the weights every step (VLLMSync every_n_steps: 1) and run the engine in the trainer's dtype; the "
        "correction is on: lower vllm_importance_sampling_cap or use a masking mode (token_mask, sequence_mask)."
        if corrected
        else "Set vllm_importance_sampling_correction: true, push the weights every step (VLLMSync every_n_steps: 1) "
        "and run the engine in the trainer's dtype."
    )
    return Finding(
        "engine-logprob-mismatch",
        "warning",
        "generation",
        f"the rollout engine's sampling log-probs differ from the trainer's by {difference:.3g} per token on average "
        f"(max {largest:.3g}, last {len(values)} logged steps); the policy gradient is biased by the mismatch",
        action,
        {"sampling_logp_difference/mean": difference, "sampling_logp_difference/max": largest},
    )


# -- preference learning -------------------------------------------------------------------------------------------


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


# -- every method ----------------------------------------------------------------------------------------------------


def nonfinite_loss(history: History, info: RunInfo, active: bool = False) -> Finding | None:
    """The last logged loss is NaN or infinite (the callback also guards every step, see ``TrainingHealth``)."""
    losses = history.values("train/loss", 1)
    if not losses or math.isfinite(losses[-1]):
        return None
    return Finding(
        "nonfinite-loss",
        "critical",
        "stability",
        f"train/loss is {losses[-1]} at step {history.steps('train/loss', 1)[-1]}",
        "Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val: 1.0), check the batch at this "
        "step; then resume from the last checkpoint.",
        {"loss": losses[-1]},
    )


def grad_norm_spike(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 20,
    factor: float = 10.0,
    clear_factor: float = 3.0,
    calm_steps: int = 5,
    min_samples: int = 5,
    min_grad_norm: float = 10.0,
    repeats_when_clipped: int = 3,
) -> Finding | None:
    """The latest gradient norm is many times the median of the logged steps before it.

    Without gradient clipping one spike is enough: its whole size reaches the weights. With clipping, the update of
    an isolated spike is bounded, so the check waits for ``repeats_when_clipped`` spikes among the last ``window``
    logged steps (a run that keeps producing them is unstable even when each is clipped). A spike is one step, so
    once raised the condition clears only after ``calm_steps`` logged norms in a row stay under ``clear_factor``
    times the median: one warning per unstable stretch, not two lines per spike. Norms under ``min_grad_norm`` are
    never spikes: in RL many steps have near-zero gradients (groups whose completions all score the same), and a
    step of ordinary size after them (norms of 1-5 are common in fine-tuning) is thousands of times their median
    without being a danger. Lower it for models whose ordinary norms are far below 1.
    """
    values = history.values("train/grad_norm", window + calm_steps)
    if len(values) < min_samples + 1:
        return None
    median = statistics.median(values[:-1][-window:])  # the logged steps before the latest (robust to the spikes)
    if median <= 0:
        return None
    limit = max(factor * median, min_grad_norm)
    clip = info.gradient_clip_val
    recent = values[-window:]
    spikes = [value for value in recent if value >= limit]
    if active:
        if all(value < clear_factor * median for value in values[-calm_steps:]):
            return None
    elif values[-1] < limit or len(spikes) < (repeats_when_clipped if clip else 1):
        return None
    spike = max(recent)
    spike_step = history.steps("train/grad_norm", len(recent))[recent.index(spike)]
    action = (
        "Spikes keep coming although gradients are clipped: lower the learning rate or add warmup, and look at the "
        "batches of these steps."
        if clip
        else "Enable gradient clipping (trainer.gradient_clip_val: 1.0), lower the learning rate or add warmup."
    )
    return Finding(
        "grad-norm-spike",
        "warning",
        "stability",
        f"grad_norm {spike:.3g} at step {spike_step} is {spike / median:.0f}x the median of the logged steps before "
        f"it ({median:.3g}); {len(spikes)} such spike(s) in the last {len(recent)} logged steps",
        action,
        {
            "grad_norm": spike,
            "median_grad_norm": median,
            "spikes": len(spikes),
            "gradient_clip_val": float(clip) if clip else math.nan,
        },
    )


def plateau(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 30,
    min_relative_change: float = 0.01,
    clear_relative_change: float = 0.03,
    annealed_lr_ratio: float = 0.1,
) -> Finding | None:
    """The objective (reward for online methods, else the loss) stopped moving at full learning rate."""
    name = "train/reward" if history.has("train/frac_reward_zero_std") else "train/loss"
    values = history.values(name)
    if len(values) < 2 * window or info.lr_ratio < annealed_lr_ratio:
        return None  # too early, or the schedule is annealing: a flat curve is expected then
    before, now = _mean(values[-2 * window : -window]), _mean(values[-window:])
    scale = max(abs(before), abs(now), 1e-8)
    change = abs(now - before) / scale
    if change >= (clear_relative_change if active else min_relative_change):
        return None
    if name == "train/reward" and history.has("train/frac_reward_zero_std") and now >= 0.999:
        return None  # solved: a flat maximal reward is not a plateau to fix
    steps = history.steps(name, 2 * window)
    return Finding(
        "plateau",
        "warning",
        "progress",
        f"{name} moved {change:.2%} between the last two windows of {window} logged steps (steps {steps[0]}-"
        f"{steps[-1]}: {before:.4g} -> {now:.4g}) at {info.lr_ratio:.0%} of the peak learning rate",
        "Raise the learning rate or check that gradients reach the weights (frozen layers, a zero loss mask); for "
        "RL, make the reward reachable.",
        {"before": before, "now": now, "relative_change": change, "lr_ratio": info.lr_ratio},
    )


def overfitting(
    history: History,
    info: RunInfo,
    active: bool = False,
    evals: int = 3,
    min_rise: float = 0.02,
) -> Finding | None:
    """Held-out loss rising at consecutive validations while the training loss falls."""
    held_out = history.values("eval/loss", evals)
    if len(held_out) < evals:
        return None
    rising = all(b > a for a, b in zip(held_out, held_out[1:]))
    rise = (held_out[-1] - held_out[0]) / max(abs(held_out[0]), 1e-8)
    if not rising and not active:
        return None
    if rise < (min_rise / 2 if active else min_rise):
        return None
    eval_steps = history.steps("eval/loss", evals)
    # The training losses logged between the first and the last of these validations (not after: the verdict then
    # changes only when a validation does). Falling means the last third of them below the first third; when both
    # losses rise together the run is unstable, not overfitting.
    train = [value for step, value in history.series.get("train/loss", ()) if eval_steps[0] <= step <= eval_steps[-1]]
    third = max(len(train) // 3, 1)
    if len(train) < 2 or _mean(train[-third:]) >= _mean(train[:third]):
        return None
    return Finding(
        "overfitting",
        "warning",
        "generalization",
        f"eval/loss rose at {evals - 1} consecutive validations ({' -> '.join(f'{v:.4g}' for v in held_out)}, steps "
        f"{eval_steps[0]}-{eval_steps[-1]}) while train/loss kept falling",
        "Stop earlier (lightning.pytorch.callbacks.EarlyStopping on eval/loss), lower the learning rate or the "
        "number of epochs, or add data or regularization (weight_decay, lora_dropout).",
        {"eval_loss_first": held_out[0], "eval_loss": held_out[-1], "relative_rise": rise},
    )


def padding_waste(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    fraction: float = 0.3,
    clear_fraction: float = 0.2,
) -> Finding | None:
    """Much of each batch is padding: compute spent on nothing."""
    values = _window(history, "train/padding_fraction", window)
    if values is None:
        return None
    now = _mean(values)
    if now < (clear_fraction if active else fraction):
        return None
    return Finding(
        "padding-waste",
        "warning",
        "throughput",
        f"{now:.0%} of the tokens in each batch are padding (last {len(values)} logged steps)",
        "Set padding_free: true on the datamodule (sequences concatenated, no padding), or packing: true.",
        {"padding_fraction": now},
    )


def generation_bound(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    share: float = 0.7,
    clear_share: float = 0.5,
) -> Finding | None:
    """Generation takes most of each step (online methods)."""
    generation = _window(history, "train/timing/generation_s", window)
    steps = history.values("timing/step_s", window)
    if generation is None or len(steps) < window:
        return None
    now = sum(generation) / max(sum(steps), 1e-12)
    if now < (clear_share if active else share):
        return None
    uses_vllm = bool(info.settings.get("use_vllm"))
    action = (
        "Give the vLLM engine more room (vllm_gpu_memory_utilization, a server on its own device) or lower "
        "max_completion_length."
        if uses_vllm
        else "Generate with vLLM (use_vllm: true), or lower max_completion_length / num_generations."
    )
    return Finding(
        "generation-bound",
        "warning",
        "throughput",
        f"generation takes {now:.0%} of each step ({_mean(generation):.3g} s of {_mean(steps):.3g} s, last "
        f"{len(generation)} logged steps)",
        action,
        {"generation_share": now, "generation_s": _mean(generation), "step_s": _mean(steps)},
    )


def low_gpu_memory(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    fraction: float = 0.25,
    clear_fraction: float = 0.35,
) -> Finding | None:
    """On a GPU, the peak memory stays a small fraction of the device: a larger batch would be faster."""
    if info.accelerator != "cuda":
        return None
    values = _window(history, "system/gpu_memory_fraction", window)
    if values is None:
        return None
    peak = max(values)
    if peak >= (clear_fraction if active else fraction):
        return None
    return Finding(
        "low-gpu-memory",
        "warning",
        "throughput",
        f"peak GPU memory is {peak:.0%} of the device over the last {len(values)} logged steps",
        "Raise the batch size (batch_size, prompts_per_step) or the sequence length to use the device; or "
        "turn off gradient checkpointing.",
        {"gpu_memory_fraction": peak},
    )


def dataloader_starvation(
    history: History,
    info: RunInfo,
    active: bool = False,
    window: int = 5,
    share: float = 0.3,
    clear_share: float = 0.15,
) -> Finding | None:
    """The training loop waits for the next batch for much of each iteration."""
    waits = _window(history, "timing/data_wait_s", window)
    steps = history.values("timing/step_s", window)
    if waits is None or len(steps) < window:
        return None
    now = sum(waits) / max(sum(waits) + sum(steps), 1e-12)
    if now < (clear_share if active else share):
        return None
    return Finding(
        "dataloader-starvation",
        "warning",
        "throughput",
        f"the loop waits {_mean(waits):.3g} s for each batch, {now:.0%} of each iteration (last {len(waits)} logged "
        "steps)",
        "Raise the dataloader's num_workers (with persistent_workers), pin_memory on GPU, and tokenize once in "
        "setup() rather than in collate.",
        {"data_wait_share": now, "data_wait_s": _mean(waits), "step_s": _mean(steps)},
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
