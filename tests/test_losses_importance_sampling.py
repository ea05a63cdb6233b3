"""Closed-form tests of the vLLM importance-sampling correction (``ltpost.losses.importance_sampling``).

The worked example of ``vllm_importance_sampling``'s docstring, by hand: two completions, ``T = 2``, the second one
token long, ``mask = [[1, 1], [1, 0]]``; trainer log-probs ``old = [[-1, -2], [-0.5, 0]]``, engine log-probs
``q = [[-1.5, -1], [-3, -7]]``. Per-token log-ratios on completion tokens ``d = old - q = [[0.5, -1], [2.5, .]]``
(the padding slot is masked to 0), so ``exp(d) = [[e^0.5, e^-1], [e^2.5, 1]] = [[1.6487, 0.3679], [12.1825, 1]]``.
Sequence log-ratios ``[0.5 - 1, 2.5] = [-0.5, 2.5]``, ``exp = [0.6065, 12.1825]``. Cap ``C = 3``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from ltpost.losses.grpo import grpo_loss, rloo_loss
from ltpost.losses.importance_sampling import IMPORTANCE_SAMPLING_MODES, vllm_importance_sampling

OLD = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
SAMPLING = torch.tensor([[-1.5, -1.0], [-3.0, -7.0]])
MASK = torch.tensor([[1, 1], [1, 0]])
E05, EM1, E25, EM05 = math.exp(0.5), math.exp(-1.0), math.exp(2.5), math.exp(-0.5)


def metrics_of(metrics: dict) -> tuple[float, ...]:
    keys = ("min", "mean", "max")
    return tuple(float(metrics[f"sampling/importance_sampling_ratio/{k}"]) for k in keys)


def test_token_truncate():
    """``min(exp(d), 3)`` per token: ``[[1.6487, 0.3679], [3, 1]]`` (the padding slot's 1 is masked by the loss).
    Ratio metrics over the three completion tokens ``1.6487, 0.3679, 3``: min ``e^-1``, mean
    ``(e^0.5 + e^-1 + 3) / 3 = 1.6722``, max 3."""
    ratio, metrics = vllm_importance_sampling(OLD, SAMPLING, MASK, "token_truncate", cap=3.0)
    assert_close(ratio, torch.tensor([[E05, EM1], [3.0, 1.0]]))
    assert metrics_of(metrics) == pytest.approx((EM1, (E05 + EM1 + 3) / 3, 3.0), rel=1e-6)


def test_token_mask():
    """``exp(d)`` where ``<= 3``, else 0: ``[[1.6487, 0.3679], [0, 1]]``; metrics over ``1.6487, 0.3679, 0``: min 0,
    mean ``(e^0.5 + e^-1) / 3 = 0.6722``, max ``e^0.5``."""
    ratio, metrics = vllm_importance_sampling(OLD, SAMPLING, MASK, "token_mask", cap=3.0)
    assert_close(ratio, torch.tensor([[E05, EM1], [0.0, 1.0]]))
    assert metrics_of(metrics) == pytest.approx((0.0, (E05 + EM1) / 3, E05), rel=1e-6)


def test_sequence_truncate():
    """One ratio per sequence, ``min(exp([-0.5, 2.5]), 3) = [[0.6065], [3]]``; metrics over the two sequences: min
    ``e^-0.5``, mean ``(e^-0.5 + 3) / 2 = 1.8033``, max 3."""
    ratio, metrics = vllm_importance_sampling(OLD, SAMPLING, MASK, "sequence_truncate", cap=3.0)
    assert_close(ratio, torch.tensor([[EM05], [3.0]]))
    assert metrics_of(metrics) == pytest.approx((EM05, (EM05 + 3) / 2, 3.0), rel=1e-6)


def test_sequence_mask():
    """``exp([-0.5, 2.5])`` masked above 3: ``[[0.6065], [0]]`` (the second sequence is dropped); metrics: min 0, mean
    ``e^-0.5 / 2 = 0.3033``, max ``e^-0.5``."""
    ratio, metrics = vllm_importance_sampling(OLD, SAMPLING, MASK, "sequence_mask", cap=3.0)
    assert_close(ratio, torch.tensor([[EM05], [0.0]]))
    assert metrics_of(metrics) == pytest.approx((0.0, EM05 / 2, EM05), rel=1e-6)


def test_logp_difference_metrics_ignore_padding():
    """``|d|`` over completion tokens ``0.5, 1, 2.5``: mean ``4 / 3``, max 2.5 (the padding slot's ``|0 - (-7)| = 7``
    is not counted), the same in every mode."""
    for mode in IMPORTANCE_SAMPLING_MODES:
        _, metrics = vllm_importance_sampling(OLD, SAMPLING, MASK, mode, cap=3.0)
        assert float(metrics["sampling/sampling_logp_difference/mean"]) == pytest.approx(4 / 3, rel=1e-6), mode
        assert float(metrics["sampling/sampling_logp_difference/max"]) == pytest.approx(2.5, rel=1e-6), mode


def test_a_larger_cap_keeps_more():
    """Cap 20 (above ``e^2.5 = 12.18``): nothing truncated or masked, every mode returns the raw ratio."""
    for mode, expected in (
        ("token_truncate", [[E05, EM1], [E25, 1.0]]),
        ("token_mask", [[E05, EM1], [E25, 1.0]]),
        ("sequence_truncate", [[EM05], [E25]]),
        ("sequence_mask", [[EM05], [E25]]),
    ):
        ratio, _ = vllm_importance_sampling(OLD, SAMPLING, MASK, mode, cap=20.0)
        assert_close(ratio, torch.tensor(expected)), mode


def test_equal_logprobs_give_weight_one_and_zero_difference():
    """When the engine's log-probs equal the trainer's (a synced fp32 engine), every weight is 1 and the difference 0:
    the correction leaves the loss unchanged."""
    for mode in IMPORTANCE_SAMPLING_MODES:
        ratio, metrics = vllm_importance_sampling(OLD, OLD, MASK, mode, cap=3.0)
        assert torch.all(ratio == 1.0), mode
        assert float(metrics["sampling/sampling_logp_difference/max"]) == 0.0
        assert metrics_of(metrics) == (1.0, 1.0, 1.0)


def test_weights_carry_no_gradient():
    old = OLD.clone().requires_grad_(True)
    ratio, metrics = vllm_importance_sampling(old, SAMPLING, MASK, "token_truncate")
    assert not ratio.requires_grad and not any(v.requires_grad for v in metrics.values())


def test_no_completion_token_gives_zero_metrics():
    _, metrics = vllm_importance_sampling(OLD, SAMPLING, torch.zeros_like(MASK), "token_mask")
    assert all(float(v) == 0.0 for v in metrics.values())


def test_bad_mode_and_cap_are_named():
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode.*token_truncate"):
        vllm_importance_sampling(OLD, SAMPLING, MASK, "token_clip")
    with pytest.raises(ValueError, match="vllm_importance_sampling_cap must be > 0"):
        vllm_importance_sampling(OLD, SAMPLING, MASK, "token_mask", cap=0.0)


def test_grpo_loss_weighs_each_token_by_the_ratio():
    """dapo, on-policy (every PPO ratio 1), advantages ``A = [2, -1]``: the per-token loss is ``-A_i * rho_it``, summed
    over completion tokens and divided by their count 3. With ``token_truncate`` weights ``[[e^0.5, e^-1], [3, .]]``:
    ``(-2 e^0.5 - 2 e^-1 + 3) / 3 = -0.3444``; without the correction ``(-2 - 2 + 1) / 3 = -1``."""
    ratio, _ = vllm_importance_sampling(OLD, SAMPLING, MASK, "token_truncate", cap=3.0)
    advantages = torch.tensor([2.0, -1.0])
    loss, _ = grpo_loss(OLD, None, None, advantages, MASK, loss_type="dapo", importance_sampling_ratio=ratio)
    assert float(loss) == pytest.approx((-2 * E05 - 2 * EM1 + 3) / 3, rel=1e-6)
    plain, _ = grpo_loss(OLD, None, None, advantages, MASK, loss_type="dapo")
    assert float(plain) == pytest.approx(-1.0, rel=1e-6)


def test_rloo_loss_weighs_each_sequence_by_the_ratio():
    """RLOO on-policy: each sequence's term is ``-A_i``, here times ``sequence_mask``'s ``[e^-0.5, 0]``; the mean
    over the two sequences is ``(-2 e^-0.5 + 0) / 2 = -0.6065``."""
    ratio, _ = vllm_importance_sampling(OLD, SAMPLING, MASK, "sequence_mask", cap=3.0)
    loss, _ = rloo_loss(OLD, None, torch.tensor([2.0, -1.0]), MASK, importance_sampling_ratio=ratio)
    assert float(loss) == pytest.approx(-EM05, rel=1e-6)
