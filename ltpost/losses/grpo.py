"""Group-relative policy-gradient losses (GRPO and its variants, RLOO): pure functions of rewards and log-probs.

An online step samples ``G = num_generations`` completions for each of ``P`` prompts, ``N = P * G`` rows laid out
group by group (rows ``g*G .. g*G+G-1`` share a prompt). The functions here cover what happens after the rewards:

- advantages: ``group_advantages`` (GRPO: reward minus group mean, scaled by a std) and ``rloo_advantages``
  (reward minus the mean of the other ``G - 1`` rewards), both NaN-aware: a NaN reward marks an unscorable
  completion (every reward function returned ``None``); it is left out of the baselines and gets advantage 0;
- token masks: ``truncation_mask`` (``mask_truncated_completions``) and ``high_entropy_mask``
  (``top_entropy_quantile``);
- losses: ``grpo_loss`` picks one of ``GRPO_LOSSES`` by ``loss_type``; ``rloo_loss`` is PPO-clip on the
  sequence-level ratio. ``k3_kl`` and ``rloo_kl`` are the two KL estimators.

Notation: ``w = pi / pi_old`` is the importance ratio (per token, or per sequence with
``importance_sampling_level="sequence"``, GSPO), ``A`` the advantage, ``m`` the completion mask,
``eps_low = epsilon``, ``eps_high = epsilon_high`` (default ``epsilon``). Formulas, defaults and metric names follow
TRL's ``GRPOTrainer._compute_loss`` / ``_generate_and_score_completions`` and ``RLOOTrainer``. Metrics are detached
local (this rank's) values; nothing here calls ``.item()``, syncs host and device or talks to other ranks.
Gradient accumulation is not divided out here: Lightning divides the loss by ``accumulate_grad_batches`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

# -- small NaN-aware reductions (TRL's nanstd) ---------------------------------------------------------------------


def _nanstd(values: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased (Bessel) std ignoring NaNs, as TRL's ``nanstd``: NaN where fewer than two values are present."""
    dims = tuple(range(values.dim())) if dim is None else (dim,)
    mean = torch.nanmean(values, dim=dims, keepdim=True)  # [..1..]
    squared = torch.nanmean((values - mean) ** 2, dim=dims)  # [...] biased variance
    count = (~torch.isnan(values)).sum(dim=dims).to(values.dtype)  # [...]
    correction = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.nan)  # [...]
    return torch.sqrt(squared * correction)  # [...]


def _masked_mean(values: Tensor, mask: Tensor, per_sequence: bool = False) -> Tensor:
    """``sum(values * mask) / max(sum(mask), 1)`` over ``[N, T]`` values; with ``per_sequence`` the values are
    ``[N, 1]``, one per sequence, and the mean is over all ``N`` rows (TRL's convention at sequence level)."""
    if per_sequence:
        return values.sum() / max(values.size(0), 1)  # []
    return (values * mask).sum() / mask.sum().clamp(min=1)  # []


def _row_extreme(values: Tensor, mask: Tensor, largest: bool, per_sequence: bool = False) -> Tensor:
    """Min (or max) over rows of each row's masked mean, skipping rows without tokens; 0 if none has any (TRL's
    ``nanmin`` gives NaN there; 0 keeps an all-masked batch NaN-free: no token was clipped).
    With ``per_sequence`` the values are ``[N, 1]`` and every row counts."""
    if per_sequence:
        per_row = values.squeeze(-1)  # [N] already one value per sequence
        present = torch.ones_like(per_row, dtype=torch.bool)  # [N]
    else:
        counts = mask.sum(-1)  # [N]
        per_row = (values * mask).sum(-1) / counts.clamp(min=1)  # [N]
        present = counts > 0  # [N]
    fill = -torch.inf if largest else torch.inf
    filled = torch.where(present, per_row, fill)  # [N]
    extreme = filled.max() if largest else filled.min()  # []
    return torch.where(present.any(), extreme, 0.0)  # []


# -- advantages ----------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO advantages: ``A_i = (r_i - mean_group(r)) / (s + eps)``.

    ``s`` is the unbiased std of the rewards of ``i``'s group (``scale_rewards="group"``), of the whole batch
    (``"batch"``, the group mean is still subtracted), or ``s + eps`` is replaced by 1 (``"none"``, Dr. GRPO).
    Note ``eps`` is added to the std, not a floor: a zero-std group gets ``0 / eps = 0``. NaN rewards (unscorable)
    are left out of means and stds and get ``A = 0``. With ``G = 1`` every advantage is 0.

    Args:
        rewards: ``[N]`` one reward per completion, ``N = P * G``, grouped by prompt; NaN = unscorable.
        num_generations: ``G``, completions per prompt (a Python int, so shapes are static).
        scale_rewards: ``"group"`` (TRL's default), ``"batch"`` or ``"none"``.
        eps: added to the std before dividing.

    Returns:
        ``(advantages, metrics)``: ``[N]`` detached advantages and detached ``reward`` (mean of the non-NaN
        rewards), ``reward_std`` (unbiased std of the non-NaN rewards over the whole batch, as TRL logs it) and
        ``frac_reward_zero_std`` (fraction of groups whose reward std is 0).
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"`rewards` must be 1-D with a multiple of num_generations={num_generations} entries; got shape "
            f"{tuple(rewards.shape)}."
        )
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"Unknown scale_rewards {scale_rewards!r}; valid: 'group', 'batch', 'none'.")
    rewards = rewards.detach()  # [N]
    grouped = rewards.view(-1, num_generations)  # [P, G]
    group_mean = torch.nanmean(grouped, dim=1, keepdim=True)  # [P, 1]
    if num_generations > 1:
        group_std = _nanstd(grouped, dim=1).unsqueeze(1)  # [P, 1] NaN where < 2 scorable rewards
    else:
        group_std = torch.zeros_like(group_mean)  # [P, 1]
    centered = grouped - group_mean  # [P, G]
    if scale_rewards == "group":
        advantages = centered / (group_std + eps)  # [P, G]
    elif scale_rewards == "batch":
        batch_std = _nanstd(rewards) if rewards.numel() > 1 else rewards.new_zeros(())  # []
        advantages = centered / (batch_std + eps)  # [P, G]
    else:
        advantages = centered  # [P, G]
    advantages = torch.nan_to_num(advantages.reshape(-1), nan=0.0)  # [N] unscorable rows get no signal
    is_std_zero = torch.isclose(group_std, torch.zeros_like(group_std))  # [P, 1]
    metrics = {
        "reward": torch.nanmean(rewards),
        "reward_std": _nanstd(rewards),
        "frac_reward_zero_std": is_std_zero.to(rewards.dtype).mean(),
    }
    return advantages, metrics


def rloo_kl(old_logps: Tensor, ref_logps: Tensor, completion_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO's KL estimate, folded into the reward: ``kl_i = sum_t m_it * (log pi_old(y_it) - log ref(y_it))``.

    The first-order (k1) estimator summed over the completion, as in Ahmadian et al. (2024) and TRL's RLOO; it
    can be negative per token. The caller passes ``beta * kl`` as ``rloo_advantages(..., kl_penalty=...)``.

    Args:
        old_logps: ``[N, T]`` per-token log-probs of the sampling policy.
        ref_logps: ``[N, T]`` per-token log-probs of the reference.
        completion_mask: ``[N, T]`` 1 on completion tokens.

    Returns:
        ``(kl, metrics)``: ``[N]`` detached per-sequence sums and ``kl``, the per-token mean over the batch.
    """
    mask = completion_mask.to(old_logps.dtype)  # [N, T]
    per_token = (old_logps - ref_logps).detach()  # [N, T]
    return (per_token * mask).sum(-1), {"kl": _masked_mean(per_token, mask)}  # [N], {[]}


def rloo_advantages(
    rewards: Tensor,
    num_generations: int,
    normalize_advantages: bool = False,
    eps: float = 1e-4,
    kl_penalty: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO advantages: ``A_i = r'_i - (sum_{j in group, j != i} r'_j) / (G - 1)`` with ``r' = r - kl_penalty``.

    The leave-one-out baseline is the mean of the other scorable rewards of the group (NaN rewards are dropped and
    the divisor is the scorable count minus one; a group with a single scorable reward gives 0). Advantages sum to
    zero over each fully scorable group; for ``G = 2`` they are ``+-(r_1 - r_2)``. With ``normalize_advantages``
    they are then standardized over the batch: ``(A - mean(A)) / (std(A) + eps)`` (unbiased std).

    Args:
        rewards: ``[N]`` raw rewards grouped by prompt; NaN = unscorable.
        num_generations: ``G`` (a Python int).
        normalize_advantages: standardize the advantages over the batch.
        eps: added to the batch std when normalizing.
        kl_penalty: ``[N]`` ``beta * kl`` from ``rloo_kl``, subtracted from the rewards before the baseline.

    Returns:
        ``(advantages, metrics)``: ``[N]`` detached advantages; ``reward`` and ``reward_std`` of the raw rewards
        (NaN-aware, batch std) and ``frac_reward_zero_std`` (fraction of groups whose penalized-reward std is 0).
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"`rewards` must be 1-D with a multiple of num_generations={num_generations} entries; got shape "
            f"{tuple(rewards.shape)}."
        )
    raw = rewards.detach()  # [N]
    penalized = raw if kl_penalty is None else raw - kl_penalty.detach()  # [N]
    grouped = penalized.view(-1, num_generations)  # [P, G]
    if num_generations > 1:
        group_std = _nanstd(grouped, dim=1)  # [P]
        scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True).to(grouped.dtype)  # [P, 1]
        total = torch.nansum(grouped, dim=1, keepdim=True)  # [P, 1]
        baselines = (total - grouped) / (scorable - 1)  # [P, G] 0/0 = NaN for a lone scorable reward
        advantages = (grouped - baselines).reshape(-1)  # [N]
    else:
        group_std = torch.zeros_like(grouped[:, 0])  # [P]
        advantages = torch.zeros_like(penalized)  # [N]
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + eps)  # [N]
    advantages = torch.nan_to_num(advantages, nan=0.0)  # [N]
    is_std_zero = torch.isclose(group_std, torch.zeros_like(group_std))  # [P]
    metrics = {
        "reward": torch.nanmean(raw),
        "reward_std": _nanstd(raw),
        "frac_reward_zero_std": is_std_zero.to(raw.dtype).mean(),
    }
    return advantages, metrics


# -- token masks ---------------------------------------------------------------------------------------------------


def truncation_mask(is_truncated: Tensor, completion_mask: Tensor) -> Tensor:
    """``mask_truncated_completions``: zero the mask rows of completions that hit the length limit (no EOS).

    Args:
        is_truncated: ``[N]`` bool, True where the completion ended without an EOS token.
        completion_mask: ``[N, T]`` completion mask (bool or numeric).

    Returns:
        ``[N, T]`` the mask with truncated rows zeroed, in ``completion_mask``'s dtype.
    """
    keep = (~is_truncated.bool()).unsqueeze(1)  # [N, 1]
    if completion_mask.dtype == torch.bool:
        return completion_mask & keep  # [N, T]
    return completion_mask * keep.to(completion_mask.dtype)  # [N, T]


def entropy_threshold(entropies: Tensor, completion_mask: Tensor, quantile: float) -> Tensor:
    """``torch.quantile(entropies[mask], quantile)`` (linear interpolation) without a data-dependent shape.

    The ``k`` unmasked values are found by sorting the flattened tensor with masked entries set to ``+inf`` (they
    sort last), so the valid values are ``sorted[0 .. k-1]`` and ``k = sum(mask)`` stays a device tensor. The
    quantile is ``lerp(sorted[floor(q (k-1))], sorted[ceil(q (k-1))], frac(q (k-1)))``, as ``torch.quantile``.
    Costs one sort of ``N * T`` values. NaN when the mask is empty.

    Args:
        entropies: ``[N, T]`` per-token entropies.
        completion_mask: ``[N, T]`` 1 on completion tokens.
        quantile: ``q`` in ``[0, 1]``.

    Returns:
        ``[]`` the threshold, float32 (or float64 for float64 input).
    """
    dtype = torch.promote_types(entropies.dtype, torch.float32)
    valid = completion_mask.bool().reshape(-1)  # [N*T]
    flat = torch.where(valid, entropies.reshape(-1).to(dtype), torch.inf)  # [N*T]
    ordered = torch.sort(flat).values  # [N*T] valid values first
    count = valid.sum()  # [] k, on device
    position = quantile * (count - 1).clamp(min=0).to(dtype)  # [] q (k - 1)
    lower = position.floor().long().clamp(max=flat.numel() - 1)  # []
    upper = position.ceil().long().clamp(max=flat.numel() - 1)  # []
    below, above = ordered[lower], ordered[upper]  # [], []
    value = torch.lerp(below, torch.where(upper == lower, below, above), position - lower.to(dtype))  # []
    return torch.where(count > 0, value, torch.nan)  # []


def high_entropy_mask(entropies: Tensor, completion_mask: Tensor, quantile: float) -> Tensor:
    """TRL's ``get_high_entropy_mask``: completion tokens whose entropy is ``>=`` the ``quantile``-quantile of the
    completion tokens' entropies.

    ``quantile`` is the quantile *level* ``q`` (TRL's ``threshold`` argument): for ``top_entropy_quantile = rho``
    (keep the top ``rho`` of tokens; TRL's config name) pass ``q = 1 - rho``. The quantile is over the tokens given
    here; TRL takes it over all ranks, so a caller that wants the global quantile must gather first.

    Args:
        entropies: ``[N, T]`` per-token entropies (``entropy_from_logits``).
        completion_mask: ``[N, T]`` 1 on completion tokens (after ``truncation_mask`` if used).
        quantile: ``q = 1 - top_entropy_quantile`` in ``[0, 1]``.

    Returns:
        ``[N, T]`` bool, False on every masked token (all False when the mask is empty).
    """
    threshold = entropy_threshold(entropies, completion_mask, quantile)  # []
    return (entropies.to(threshold.dtype) >= threshold) & completion_mask.bool()  # [N, T]


# -- per-token objectives ------------------------------------------------------------------------------------------


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimator of ``KL(pi || ref)`` per token: ``exp(ref - logp) - (ref - logp) - 1 >= 0``.

    Args:
        logps: ``[N, T]`` policy log-probs (differentiable).
        ref_logps: ``[N, T]`` reference log-probs.

    Returns:
        ``[N, T]``, 0 where the two agree.
    """
    diff = ref_logps - logps  # [N, T]
    return torch.exp(diff) - diff - 1  # [N, T]


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float, delta: float | None = None
) -> Tensor:
    """PPO's clipped objective, negated: ``-min(w' A, clip(w, 1 - eps_low, 1 + eps_high) A)``.

    ``w' = min(w, delta)`` with ``delta`` set (two-sided clipping, INTELLECT-2), else ``w``.

    Args:
        ratio: ``[N, T]`` or ``[N, 1]`` or ``[N]`` importance ratios ``w`` (differentiable).
        advantages: broadcastable to ``ratio``.
        epsilon_low, epsilon_high: the clip range.
        delta: upper cap of the unclipped ratio, or ``None``.

    Returns:
        per-element loss, shaped like ``ratio``.
    """
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # like ratio
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)  # like ratio
    return -torch.min(ratio * advantages, clipped * advantages)  # like ratio


# -- one function per GRPO loss_type -------------------------------------------------------------------------------
# Each takes the importance ratio ``w`` ([N, T] per token or [N, 1] per sequence), the per-token log-probs, the
# advantages [N, 1] and the mask [N, T], plus ``token_weights`` [N, T] (entropy mask times the vLLM importance
# correction; ones by default) that multiply the policy term and ``penalty`` [N, T] (``beta * KL``, or 0) that is
# added after it, as TRL orders them. ``**_`` swallows the other losses' hyperparameters.


def _clipped_tokens(ratio, advantages, mask, token_weights, penalty, epsilon_low, epsilon_high, delta) -> Tensor:
    policy = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high, delta)  # [N, T] or [N, 1]
    return (policy * token_weights + penalty) * mask  # [N, T]


def grpo_sequence_mean_loss(
    ratio: Tensor, logps: Tensor, advantages: Tensor, mask: Tensor, *, token_weights: Tensor, penalty: Tensor | float,
    epsilon_low: float, epsilon_high: float, delta: float | None = None, **_: Any,
) -> Tensor:  # fmt: skip
    """``grpo``: mean over sequences of each sequence's token mean, ``mean_i (sum_t m l_it / max(|m_i|, 1))``.

    ``l_it = -min(w A_i, clip(w) A_i) * token_weight + beta KL_it``. Length-biased (the DeepSeekMath original).
    Returns ``[]``.
    """
    per_token = _clipped_tokens(ratio, advantages, mask, token_weights, penalty, epsilon_low, epsilon_high, delta)
    return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()  # []


def bnpo_loss(
    ratio: Tensor, logps: Tensor, advantages: Tensor, mask: Tensor, *, token_weights: Tensor, penalty: Tensor | float,
    epsilon_low: float, epsilon_high: float, delta: float | None = None, **_: Any,
) -> Tensor:  # fmt: skip
    """``bnpo``: token mean over the local batch, ``sum_it m l_it / max(sum m, 1)``. Returns ``[]``."""
    per_token = _clipped_tokens(ratio, advantages, mask, token_weights, penalty, epsilon_low, epsilon_high, delta)
    return per_token.sum() / mask.sum().clamp(min=1)  # []


def dr_grpo_loss(
    ratio: Tensor, logps: Tensor, advantages: Tensor, mask: Tensor, *, token_weights: Tensor, penalty: Tensor | float,
    epsilon_low: float, epsilon_high: float, delta: float | None = None, max_completion_length: int, **_: Any,
) -> Tensor:  # fmt: skip
    """``dr_grpo`` (Liu et al., 2025): ``sum_it m l_it / (N * max_completion_length)``, a constant normalizer.
    Returns ``[]``."""
    per_token = _clipped_tokens(ratio, advantages, mask, token_weights, penalty, epsilon_low, epsilon_high, delta)
    return per_token.sum() / (mask.size(0) * max_completion_length)  # []


def dapo_loss(
    ratio: Tensor, logps: Tensor, advantages: Tensor, mask: Tensor, *, token_weights: Tensor, penalty: Tensor | float,
    epsilon_low: float, epsilon_high: float, delta: float | None = None, num_items_in_batch: Tensor, **_: Any,
) -> Tensor:  # fmt: skip
    """``dapo`` (Yu et al., 2025): ``sum_it m l_it / max(num_items_in_batch, 1)``, the token count of the global
    batch (per micro-batch and rank), so every token weighs the same however the batch is split. Returns ``[]``."""
    per_token = _clipped_tokens(ratio, advantages, mask, token_weights, penalty, epsilon_low, epsilon_high, delta)
    return per_token.sum() / num_items_in_batch.clamp(min=1)  # []


def cispo_loss(
    ratio: Tensor, logps: Tensor, advantages: Tensor, mask: Tensor, *, token_weights: Tensor, penalty: Tensor | float,
    epsilon_high: float, num_items_in_batch: Tensor, **_: Any,
) -> Tensor:  # fmt: skip
    """``cispo`` (MiniMax-M1): REINFORCE with a clipped, stopped-gradient importance weight,
    ``l_it = -sg(min(w, eps_high)) * A_i * log pi(y_it)``, normalized like ``dapo``.

    ``eps_high`` is an absolute cap on the ratio here (ScaleRL's ``eps_max``, recommended 5.0), not ``1 + eps``.
    Returns ``[]``.
    """
    capped = torch.clamp(ratio, max=epsilon_high).detach()  # [N, T] or [N, 1]
    policy = -capped * advantages * logps  # [N, T]
    per_token = (policy * token_weights + penalty) * mask  # [N, T]
    return per_token.sum() / num_items_in_batch.clamp(min=1)  # []


GRPO_LOSSES: dict[str, Callable[..., Tensor]] = {
    "grpo": grpo_sequence_mean_loss,
    "bnpo": bnpo_loss,
    "dr_grpo": dr_grpo_loss,
    "dapo": dapo_loss,
    "cispo": cispo_loss,
}


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: Literal["token", "sequence"] = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | float | None = None,
    entropy_mask: Tensor | None = None,
    importance_sampling_ratio: Tensor | None = None,
    use_bias_correction_kl: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO family's loss, ``GRPO_LOSSES[loss_type]`` applied to the ratio, advantages and KL term.

    - ratio: ``w_it = exp(log pi(y_it) - log pi_old(y_it))`` (``"token"``), or GSPO's sequence ratio
      ``w_i = exp(sum_t m_it (log pi - log pi_old) / max(|m_i|, 1))`` (``"sequence"``), one per row. With
      ``old_logps=None`` (on-policy: one optimizer step per generation) ``pi_old = sg(pi)``, so ``w = 1`` in value,
      nothing clips, and the gradient is the vanilla policy gradient ``-A grad log pi`` under the normalization.
    - KL (``beta != 0``): ``beta * k3_kl(logps, ref_logps)`` per token, times ``w`` when
      ``use_bias_correction_kl`` (TRL's default; the ratio is differentiable, so this changes the gradient even
      on-policy), added after the policy term.
    - per-token policy term multiplied by ``entropy_mask`` (``high_entropy_mask``) and ``importance_sampling_ratio``
      (vLLM's truncated importance correction) when given.

    Args:
        logps: ``[N, T]`` policy per-token log-probs (differentiable).
        old_logps: ``[N, T]`` log-probs of the policy that sampled (no grad), or ``None`` for on-policy.
        ref_logps: ``[N, T]`` reference log-probs; needed only when ``beta != 0``.
        advantages: ``[N]`` (or ``[N, T]`` per-token) advantages.
        completion_mask: ``[N, T]`` 1 on tokens that carry the loss.
        loss_type: a key of ``GRPO_LOSSES``.
        beta: KL coefficient; 0 (TRL's default) needs no reference.
        epsilon: lower clip ``eps_low``.
        epsilon_high: upper clip ``eps_high`` (default ``epsilon``; DAPO uses 0.28); the ratio cap for ``cispo``,
            where it is required.
        delta: two-sided clipping cap of the unclipped ratio (INTELLECT-2), ``> 1 + eps_high``; not for ``cispo``.
        importance_sampling_level: ``"token"`` (GRPO) or ``"sequence"`` (GSPO).
        max_completion_length: ``dr_grpo``'s constant normalizer; default ``T``.
        num_items_in_batch: ``dapo``/``cispo``'s token count: the completion tokens of the whole generation round
            divided by ``world_size * steps_per_generation`` (the average per micro-batch and rank; Lightning divides
            by ``accumulate_grad_batches`` itself). Default: this batch's ``sum(completion_mask)``.
        entropy_mask: ``[N, T]`` bool, tokens kept by ``top_entropy_quantile``.
        importance_sampling_ratio: ``[N, T]`` (or ``[N, 1]``) vLLM importance-sampling correction weights.
        use_bias_correction_kl: multiply the per-token KL by the importance ratio (TRL's default True).

    Returns:
        ``(loss, metrics)``: the scalar loss and detached ``loss``; ``kl`` (mean of the per-token KL term over
        completion tokens, only when ``beta != 0``); for the clipped losses ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (fraction of completion tokens, or of sequences at
        sequence level, with ``w < 1 - eps_low`` and ``A < 0`` / ``w > 1 + eps_high`` and ``A > 0`` / either),
        ``clip_ratio/low_min`` and ``clip_ratio/high_max`` (min / max over sequences of the per-sequence fraction;
        reduce across ranks with min / max); for ``cispo`` ``cispo_clip_ratio`` (``w > eps_high`` and ``A > 0``).
    """
    if loss_type not in GRPO_LOSSES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; valid: {list(GRPO_LOSSES)}.")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"Unknown importance_sampling_level {importance_sampling_level!r}; valid: token, sequence.")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs `ref_logps` (the reference model's per-token log-probs).")
    if loss_type == "cispo" and epsilon_high is None:
        raise ValueError("loss_type='cispo' needs `epsilon_high`, the absolute ratio cap (ScaleRL recommends 5.0).")
    if loss_type == "cispo" and delta is not None:
        raise ValueError("`delta` applies to the clipped losses, not to 'cispo' (which caps at `epsilon_high`).")
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)  # [N, T]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [N, 1]
    advantages = advantages.detach().to(logps.dtype)  # [N, 1] or [N, T]

    old = logps.detach() if old_logps is None else old_logps  # [N, T]
    log_ratio = logps - old  # [N, T]
    if importance_sampling_level == "token":
        log_weights = log_ratio  # [N, T]
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)  # [N, 1] GSPO
    ratio = torch.exp(log_weights)  # [N, T] or [N, 1]
    per_sequence = importance_sampling_level == "sequence"

    token_weights = torch.ones_like(mask)  # [N, T]
    if entropy_mask is not None:
        token_weights = token_weights * entropy_mask.to(mask.dtype)  # [N, T]
    if importance_sampling_ratio is not None:
        token_weights = token_weights * importance_sampling_ratio.to(mask.dtype)  # [N, T]

    penalty: Tensor | float = 0.0
    if beta != 0.0:
        per_token_kl = k3_kl(logps, ref_logps)  # [N, T]
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio  # [N, T]
        penalty = beta * per_token_kl  # [N, T]

    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()  # []
    items = torch.as_tensor(num_items_in_batch, dtype=logps.dtype, device=logps.device)  # []
    loss = GRPO_LOSSES[loss_type](
        ratio, logps, advantages, mask,
        token_weights=token_weights, penalty=penalty, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        delta=delta, max_completion_length=mask.size(1) if max_completion_length is None else max_completion_length,
        num_items_in_batch=items,
    )  # fmt: skip

    with torch.no_grad():
        metrics: dict[str, Tensor] = {"loss": loss.detach()}
        if beta != 0.0:
            metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)  # []
        ratio = ratio.detach()  # [N, T] or [N, 1]
        if loss_type == "cispo":
            is_capped = ((ratio > epsilon_high) & (advantages > 0)).to(mask.dtype)  # [N, T] or [N, 1]
            metrics["cispo_clip_ratio"] = _masked_mean(is_capped, mask, per_sequence)  # []
        else:
            if delta is not None:
                ratio = ratio.clamp(max=delta)  # TRL measures clipping on the delta-capped ratio
            is_low = (ratio < 1 - epsilon_low) & (advantages < 0)  # [N, T] or [N, 1]
            is_high = (ratio > 1 + epsilon_high) & (advantages > 0)  # [N, T] or [N, 1]
            is_low, is_high, is_region = (x.to(mask.dtype) for x in (is_low, is_high, is_low | is_high))
            metrics["clip_ratio/low_mean"] = _masked_mean(is_low, mask, per_sequence)  # []
            metrics["clip_ratio/high_mean"] = _masked_mean(is_high, mask, per_sequence)  # []
            metrics["clip_ratio/region_mean"] = _masked_mean(is_region, mask, per_sequence)  # []
            metrics["clip_ratio/low_min"] = _row_extreme(is_low, mask, largest=False, per_sequence=per_sequence)  # []
            metrics["clip_ratio/high_max"] = _row_extreme(is_high, mask, largest=True, per_sequence=per_sequence)  # []
    return loss, metrics


def rloo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO's loss (TRL's ``RLOOTrainer``): PPO-clip on the sequence ratio, averaged over sequences.

    ``w_i = exp(sum_t m_it log pi(y_it) - sum_t m_it log pi_old(y_it))`` — the *summed* log-ratio (the ratio of the
    sequence probabilities), unlike GSPO's mean — and ``loss = mean_i -min(w_i A_i, clip(w_i, 1 - eps_low,
    1 + eps_high) A_i)``. On-policy (``old_logps=None``) ``w = 1`` and the gradient is
    ``-mean_i A_i grad log pi(y_i)``. The KL penalty lives in the reward (``rloo_kl``), not here.

    Args:
        logps: ``[N, T]`` policy per-token log-probs (differentiable).
        old_logps: ``[N, T]`` sampling-policy log-probs, or ``None`` for on-policy.
        advantages: ``[N]`` from ``rloo_advantages``.
        completion_mask: ``[N, T]`` 1 on completion tokens.
        epsilon: lower clip ``eps_low``.
        epsilon_high: upper clip (default ``epsilon``).
        importance_sampling_ratio: ``[N]`` or ``[N, 1]`` per-sequence weights of the vLLM importance-sampling
            correction (``vllm_importance_sampling`` in a ``sequence_*`` mode), multiplying each sequence's term.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached ``loss``, ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (fractions of sequences), ``clip_ratio/low_min`` and
        ``clip_ratio/high_max`` (min / max over sequences).
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(logps.dtype)  # [N, T]
    sequence_logps = (logps * mask).sum(-1)  # [N]
    old = logps.detach() if old_logps is None else old_logps  # [N, T]
    old_sequence_logps = (old * mask).sum(-1)  # [N]
    ratio = torch.exp(sequence_logps - old_sequence_logps)  # [N]
    advantages = advantages.detach().to(logps.dtype)  # [N]
    per_sequence = clipped_surrogate(ratio, advantages, epsilon, epsilon_high)  # [N]
    if importance_sampling_ratio is not None:
        per_sequence = per_sequence * importance_sampling_ratio.reshape(-1).to(per_sequence.dtype)  # [N]
    loss = per_sequence.mean()  # []

    with torch.no_grad():
        ratio = ratio.detach()  # [N]
        is_low = ((ratio < 1 - epsilon) & (advantages < 0)).to(mask.dtype)  # [N]
        is_high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype)  # [N]
        is_region = torch.maximum(is_low, is_high)  # [N]
        metrics = {
            "loss": loss.detach(),
            "clip_ratio/low_mean": is_low.mean(),
            "clip_ratio/high_mean": is_high.mean(),
            "clip_ratio/region_mean": is_region.mean(),
            "clip_ratio/low_min": is_low.min(),
            "clip_ratio/high_max": is_high.max(),
        }
    return loss, metrics
