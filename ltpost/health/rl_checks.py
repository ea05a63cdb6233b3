"""Training-health checks of online RL (GRPO, RLOO): the reward signal, exploration, generation and reward hacking.

Pure functions over a ``History``; see ``ltpost.health.checks`` for the conventions and the registry.
"""

from __future__ import annotations

import math

from ltpost.health.base import Finding, History, RunInfo, _mean, _span, _window


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
