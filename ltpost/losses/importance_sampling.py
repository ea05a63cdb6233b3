"""Importance-sampling correction for the gap between the engine that sampled and the trainer (vLLM rollouts).

A vLLM engine samples completions from ``q`` (its kernels, its precision, possibly weights a few steps old), while
the loss treats them as drawn from the trainer's policy ``pi_old``. The correction weighs each token (or each
sequence) by ``rho = pi_old / q``, computed from the trainer's log-probs and the sampling log-probs the engine
returned, and bounds it at ``cap`` (TRL's ``vllm_importance_sampling_*`` settings, after Yao et al., "Your
efficient RL framework secretly brings you off-policy RL training", 2025):

- ``token_truncate``: ``rho_t = min(exp(log pi_old_t - log q_t), cap)`` per token (truncated IS, TIS);
- ``token_mask``: ``rho_t = exp(...)`` where it is ``<= cap``, else 0 (the token is dropped);
- ``sequence_truncate``: one ratio per sequence from the summed log-ratio, ``rho_i = min(exp(sum_t m_it
  (log pi_old_it - log q_it)), cap)``;
- ``sequence_mask``: the same, 0 where it exceeds ``cap`` (TRL's default).

The result multiplies the per-token policy term of the loss (``grpo_loss(importance_sampling_ratio=...)``,
``rloo_loss(importance_sampling_ratio=...)``); it carries no gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def vllm_importance_sampling(
    old_logps: Tensor,
    sampling_logps: Tensor,
    completion_mask: Tensor,
    mode: ImportanceSamplingMode = "sequence_mask",
    cap: float = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights ``pi_old / q`` for sampled completions, truncated or masked at ``cap``.

    Worked example (the closed-form test): two completions, ``T = 2``, the second one token long
    (mask ``[[1, 1], [1, 0]]``); trainer log-probs ``[[-1, -2], [-0.5, 0]]``; engine log-probs
    ``[[-1.5, -1], [-3, -7]]``. Per-token log-ratios (masked) ``d = [[0.5, -1], [2.5, 0]]``, so
    ``exp(d) = [[1.6487, 0.3679], [12.1825, 1]]``.

    - ``token_truncate``, cap 3: ``[[1.6487, 0.3679], [3, 1]]`` (the padding slot stays 1 and is masked later);
    - ``token_mask``, cap 3: ``[[1.6487, 0.3679], [0, 1]]``;
    - ``sequence_*``: summed log-ratios ``[-0.5, 2.5]``, ``exp = [0.6065, 12.1825]``; ``sequence_truncate``,
      cap 3: ``[[0.6065], [3]]``; ``sequence_mask``: ``[[0.6065], [0]]``.

    Metrics (TRL's names, under ``sampling/``): ``sampling_logp_difference/mean`` and ``/max`` of ``|log pi_old -
    log q|`` over completion tokens (here ``|d| = 0.5, 1, 2.5``: mean 4/3, max 2.5) and
    ``importance_sampling_ratio/min``, ``/mean``, ``/max`` of the weights after capping, over completion tokens
    (token modes: ``token_truncate`` 0.3679 / 1.6722 / 3, i.e. mean (1.6487 + 0.3679 + 3) / 3) or over sequences
    (sequence modes: ``sequence_mask`` 0 / 0.3033 / 0.6065).

    Args:
        old_logps: ``[N, T]`` the trainer's log-probs of the sampled tokens under the policy that sampled them (at
            the sampling temperature), no gradient.
        sampling_logps: ``[N, T]`` the engine's log-probs of the same tokens (0 on padding).
        completion_mask: ``[N, T]`` 1 on completion tokens.
        mode: ``token_truncate``, ``token_mask``, ``sequence_truncate`` or ``sequence_mask``.
        cap: the bound ``C > 0``.

    Returns:
        ``(ratio, metrics)``: ``[N, T]`` (token modes) or ``[N, 1]`` (sequence modes) detached weights, and
        detached scalar metrics keyed ``sampling/sampling_logp_difference/mean`` ... as above (0 when no token is
        unmasked).
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(
            f"Unknown vllm_importance_sampling_mode {mode!r}; choose from {list(IMPORTANCE_SAMPLING_MODES)}."
        )
    if cap <= 0:
        raise ValueError(f"vllm_importance_sampling_cap must be > 0, got {cap}.")
    mask = completion_mask.to(old_logps.dtype)  # [N, T]
    log_ratio = (old_logps.detach() - sampling_logps.to(old_logps.dtype)) * mask  # [N, T] 0 on padding
    sequence_level = mode.startswith("sequence")
    if sequence_level:
        log_ratio = log_ratio.sum(-1, keepdim=True)  # [N, 1] log of the sequences' probability ratio
    ratio = torch.exp(log_ratio)  # [N, T] or [N, 1]
    if mode.endswith("truncate"):
        ratio = ratio.clamp(max=cap)  # [N, T] or [N, 1]
    else:
        ratio = ratio.masked_fill(ratio > cap, 0.0)  # [N, T] or [N, 1]

    valid = completion_mask.bool()  # [N, T]; boolean indexing below: a host-device sync (metrics only)
    difference = (old_logps.detach() - sampling_logps.to(old_logps.dtype)).abs()[valid]  # [M]
    weights = ratio.reshape(-1) if sequence_level else ratio[valid]  # [N] or [M]
    zero = old_logps.new_zeros(())
    metrics = {
        "sampling/sampling_logp_difference/mean": difference.mean() if difference.numel() else zero,
        "sampling/sampling_logp_difference/max": difference.max() if difference.numel() else zero,
        "sampling/importance_sampling_ratio/min": weights.min() if weights.numel() else zero,
        "sampling/importance_sampling_ratio/mean": weights.mean() if weights.numel() else zero,
        "sampling/importance_sampling_ratio/max": weights.max() if weights.numel() else zero,
    }
    return ratio.detach(), {k: v.detach() for k, v in metrics.items()}
