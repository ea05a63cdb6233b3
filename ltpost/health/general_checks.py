"""Training-health checks of every method: stability, optimization, progress, generalization, throughput.

Pure functions over a ``History``; see ``ltpost.health.checks`` for the conventions and the registry.
"""

from __future__ import annotations

import math
import statistics

from ltpost.health.base import Finding, History, RunInfo, _mean, _window


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
