"""Closed-form tests of the GRPO/RLOO advantages, masks and losses.

Every expected value is derived by hand in the test's docstring from small numbers. ``std`` is the unbiased (Bessel)
standard deviation, as TRL's ``nanstd``; ``EPS = 1e-4`` is the default added to the std.

Most loss tests use two rows of three positions, the third of row 0 padding:
``mask = [[1, 1, 0], [1, 1, 1]]`` (5 completion tokens), ``logps = [[-1, -2, -9], [-0.5, -1, -1.5]]`` and
advantages ``A = [2, -1]``. On-policy (``old_logps=None``) every ratio is 1, so each unclipped per-token loss is
``-A_i``: ``-2`` on row 0's two tokens and ``+1`` on row 1's three; their masked sum is ``-4 + 3 = -1``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from ltpost.losses.grpo import (
    GRPO_LOSSES,
    entropy_threshold,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    k3_kl,
    rloo_advantages,
    rloo_kl,
    rloo_loss,
    truncation_mask,
)

EPS = 1e-4
LN2 = math.log(2)
NAN = float("nan")


def t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def base_batch(grad=True):
    """The module docstring's batch: (logps, mask, advantages)."""
    logps = t([[-1.0, -2.0, -9.0], [-0.5, -1.0, -1.5]], grad)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logps, mask, t([2.0, -1.0])


# -- group_advantages ------------------------------------------------------------------------------------------------


def test_group_advantages_group_scaling():
    """rewards [1, 0 | 2, 2], G = 2.

    Group 0: mean 0.5, std = sqrt((0.25 + 0.25) / 1) = sqrt(0.5); A = +-0.5 / (sqrt(0.5) + EPS).
    Group 1: std 0, so A = 0 / EPS = 0.
    Metrics: reward = 5/4; reward_std = batch std of [1, 0, 2, 2]: deviations from 1.25 squared are
    0.0625, 1.5625, 0.5625, 0.5625 (sum 2.75), so sqrt(2.75 / 3); frac_reward_zero_std = 1 of 2 groups = 0.5.
    """
    advantages, metrics = group_advantages(t([1.0, 0.0, 2.0, 2.0]), num_generations=2)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    assert_close(advantages, t([a, -a, 0.0, 0.0]))
    assert_close(metrics["reward"], scalar(1.25))
    assert_close(metrics["reward_std"], scalar(math.sqrt(2.75 / 3)))
    assert_close(metrics["frac_reward_zero_std"], scalar(0.5))
    assert all(not value.requires_grad for value in metrics.values())


def test_group_advantages_batch_and_none_scaling():
    """Same rewards. "batch": the group mean is still subtracted (+-0.5, 0, 0) but the divisor is the batch std
    sqrt(2.75 / 3) + EPS. "none": the centered rewards [0.5, -0.5, 0, 0] themselves."""
    rewards = t([1.0, 0.0, 2.0, 2.0])
    batch, _ = group_advantages(rewards, 2, scale_rewards="batch")
    b = 0.5 / (math.sqrt(2.75 / 3) + EPS)
    assert_close(batch, t([b, -b, 0.0, 0.0]))
    none, metrics = group_advantages(rewards, 2, scale_rewards="none")
    assert_close(none, t([0.5, -0.5, 0.0, 0.0]))
    assert_close(metrics["frac_reward_zero_std"], scalar(0.5))


def test_group_advantages_eps_is_added_to_std():
    """rewards [0, 2], eps = 0.5: mean 1, std = sqrt((1 + 1) / 1) = sqrt(2); A = +-1 / (sqrt(2) + 0.5)."""
    advantages, _ = group_advantages(t([0.0, 2.0]), 2, eps=0.5)
    a = 1 / (math.sqrt(2) + 0.5)
    assert_close(advantages, t([-a, a]))


def test_group_advantages_zero_std_groups_get_zero_advantage():
    """Every group constant ([3, 3 | -1, -1]): every advantage is 0 in every scaling, frac_reward_zero_std = 1."""
    for scale in ("group", "batch", "none"):
        advantages, metrics = group_advantages(t([3.0, 3.0, -1.0, -1.0]), 2, scale_rewards=scale)
        assert_close(advantages, t([0.0, 0.0, 0.0, 0.0]))
        assert_close(metrics["frac_reward_zero_std"], scalar(1.0))


def test_group_advantages_nan_rewards_are_unscorable():
    """rewards [1, NaN, 3], G = 3: the NaN is left out, mean 2, std = sqrt((1 + 1) / 1) = sqrt(2);
    A = [-1 / (sqrt(2) + EPS), 0, 1 / (sqrt(2) + EPS)]; reward = mean of [1, 3] = 2; reward_std = sqrt(2)."""
    advantages, metrics = group_advantages(t([1.0, NAN, 3.0]), 3)
    a = 1 / (math.sqrt(2) + EPS)
    assert_close(advantages, t([-a, 0.0, a]))
    assert_close(metrics["reward"], scalar(2.0))
    assert_close(metrics["reward_std"], scalar(math.sqrt(2)))
    assert_close(metrics["frac_reward_zero_std"], scalar(0.0))


def test_group_advantages_single_generation_and_bad_shape():
    """G = 1: each reward is its own group mean, so A = 0 and every group has std 0. 3 rewards for G = 2 raise."""
    advantages, metrics = group_advantages(t([1.0, 5.0]), 1)
    assert_close(advantages, t([0.0, 0.0]))
    assert_close(metrics["frac_reward_zero_std"], scalar(1.0))
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(t([1.0, 2.0]), 2, scale_rewards="mean")  # type: ignore[arg-type]


# -- rloo_advantages / rloo_kl ---------------------------------------------------------------------------------------


def test_rloo_advantages_two_generations_are_plus_minus_difference():
    """G = 2, rewards [3, 1 | 5, 5]: the baseline is the other reward, so A = [3-1, 1-3, 0, 0] = [2, -2, 0, 0].
    reward = 14/4 = 3.5; group stds sqrt(2) and 0, so frac_reward_zero_std = 0.5."""
    advantages, metrics = rloo_advantages(t([3.0, 1.0, 5.0, 5.0]), 2)
    assert_close(advantages, t([2.0, -2.0, 0.0, 0.0]))
    assert_close(metrics["reward"], scalar(3.5))
    assert_close(metrics["frac_reward_zero_std"], scalar(0.5))


def test_rloo_advantages_three_generations_sum_to_zero():
    """G = 3, rewards [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5; A = [-3, -1.5, 4.5], sum 0."""
    advantages, _ = rloo_advantages(t([1.0, 2.0, 6.0]), 3)
    assert_close(advantages, t([-3.0, -1.5, 4.5]))
    assert_close(advantages.sum(), scalar(0.0))


def test_rloo_advantages_normalized():
    """rewards [3, 1 | 5, 5] -> A = [2, -2, 0, 0], mean 0, std = sqrt((4 + 4) / 3) = sqrt(8/3);
    normalized A = [2, -2, 0, 0] / (sqrt(8/3) + EPS)."""
    advantages, _ = rloo_advantages(t([3.0, 1.0, 5.0, 5.0]), 2, normalize_advantages=True)
    a = 2 / (math.sqrt(8 / 3) + EPS)
    assert_close(advantages, t([a, -a, 0.0, 0.0]))


def test_rloo_advantages_kl_penalty_and_nan():
    """kl_penalty [0.5, -0.5] on rewards [1, 1]: penalized [0.5, 1.5], A = [-1, 1]; the logged reward is the raw
    mean 1 and the penalized group has std > 0 (frac_reward_zero_std = 0).
    NaN: rewards [1, NaN, 3], G = 3: two scorable, baseline of 1 is (4 - 1) / 1 = 3 -> A = -2; of 3 -> A = 2."""
    advantages, metrics = rloo_advantages(t([1.0, 1.0]), 2, kl_penalty=t([0.5, -0.5]))
    assert_close(advantages, t([-1.0, 1.0]))
    assert_close(metrics["reward"], scalar(1.0))
    assert_close(metrics["frac_reward_zero_std"], scalar(0.0))
    advantages, _ = rloo_advantages(t([1.0, NAN, 3.0]), 3)
    assert_close(advantages, t([-2.0, 0.0, 2.0]))


def test_rloo_kl_sums_first_order_log_ratio():
    """old - ref = [[0.5, -1, (pad 7)], [0.25, 0.25, 0.25]]: sums [-0.5, 0.75]; kl metric = 0.25 / 5 = 0.05."""
    old = t([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -1.0, -7.0], [-1.25, -1.25, -1.25]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kl, metrics = rloo_kl(old, ref, mask)
    assert_close(kl, t([-0.5, 0.75]))
    assert_close(metrics["kl"], scalar(0.05))


# -- masks -----------------------------------------------------------------------------------------------------------


def test_truncation_mask_zeroes_truncated_rows():
    """Row 1 is truncated: its mask row becomes 0; dtype is kept (int and bool)."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    truncated = torch.tensor([False, True])
    assert torch.equal(truncation_mask(truncated, mask), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert torch.equal(
        truncation_mask(truncated, mask.bool()), torch.tensor([[True, True, False], [False, False, False]])
    )


ENTROPIES = [[0.1, 0.5, 9.0], [0.3, 0.2, NAN]]  # the last column is padding (any value, even NaN)
ENTROPY_MASK = [[1, 1, 0], [1, 1, 0]]


@pytest.mark.parametrize(
    ("quantile", "threshold", "expected"),
    [
        # sorted valid values [0.1, 0.2, 0.3, 0.5], position q * 3
        (0.5, 0.25, [[False, True, False], [True, False, False]]),  # pos 1.5: 0.2 + 0.5 * 0.1
        (0.8, 0.38, [[False, True, False], [False, False, False]]),  # pos 2.4: 0.3 + 0.4 * 0.2 (rho = 0.2)
        (0.0, 0.1, [[True, True, False], [True, True, False]]),  # pos 0: the minimum keeps every token
        (1.0, 0.5, [[False, True, False], [False, False, False]]),  # pos 3: the maximum
    ],
)
def test_high_entropy_mask_matches_torch_quantile(quantile, threshold, expected):
    """The threshold is the linear-interpolation quantile of the non-pad entropies, as ``torch.quantile``; tokens
    with entropy >= it are kept, padding never."""
    entropies, mask = t(ENTROPIES), torch.tensor(ENTROPY_MASK)
    value = entropy_threshold(entropies, mask, quantile)
    assert_close(value, scalar(threshold))
    assert_close(value, torch.quantile(entropies[mask.bool()], quantile))
    assert torch.equal(high_entropy_mask(entropies, mask, quantile), torch.tensor(expected))


def test_high_entropy_mask_empty_and_float32():
    """An all-zero mask keeps nothing (threshold NaN, no error); float32 input matches torch.quantile."""
    entropies = t(ENTROPIES)
    empty = torch.zeros(2, 3, dtype=torch.long)
    assert not high_entropy_mask(entropies, empty, 0.5).any()
    values = torch.tensor([[3.0, 1.0, 4.0, 1.5], [9.0, 2.0, 6.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    assert_close(entropy_threshold(values, mask, 0.3), torch.quantile(values[mask.bool()], 0.3))


# -- k3_kl -----------------------------------------------------------------------------------------------------------


def test_k3_kl_closed_form():
    """logp = 0, ref = -ln 2: exp(-ln 2) - (-ln 2) - 1 = 0.5 + ln 2 - 1; logp = ref gives 0."""
    assert_close(k3_kl(t([[0.0, -1.0]]), t([[-LN2, -1.0]])), t([[0.5 + LN2 - 1, 0.0]]))


# -- grpo_loss: one closed form per loss_type, on-policy -------------------------------------------------------------


def test_grpo_losses_registry():
    assert set(GRPO_LOSSES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo"}


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected", "row0_grad", "row1_grad"),
    [
        # grpo: row means -2 and +1, mean over rows -0.5; d/dlogp = -A / (|m_i| * N): -2/4, 1/6
        ("grpo", {}, -0.5, -0.5, 1 / 6),
        # bnpo: sum -1 over 5 tokens; d/dlogp = -A / 5
        ("bnpo", {}, -0.2, -0.4, 0.2),
        # dr_grpo: sum / (N * L) = -1 / (2 * 4); d/dlogp = -A / 8
        ("dr_grpo", {"max_completion_length": 4}, -0.125, -0.25, 0.125),
        # dr_grpo default L = T = 3: -1 / 6
        ("dr_grpo", {}, -1 / 6, -1 / 3, 1 / 6),
        # dapo with the global token count 10: -1 / 10; d/dlogp = -A / 10
        ("dapo", {"num_items_in_batch": 10.0}, -0.1, -0.2, 0.1),
        # dapo default: the local count 5
        ("dapo", {}, -0.2, -0.4, 0.2),
        # cispo: -sg(min(1, 5)) * A * logp: row 0 -2*(-1), -2*(-2) = 2, 4; row 1 -0.5, -1, -1.5; sum 3 over 5 tokens.
        # d/dlogp = -A / 5, as bnpo
        ("cispo", {"epsilon_high": 5.0}, 0.6, -0.4, 0.2),
    ],
)
def test_grpo_loss_on_policy_closed_form(loss_type, kwargs, expected, row0_grad, row1_grad):
    """On-policy (old_logps=None) the ratio is 1: each loss is the vanilla policy gradient, normalized per loss_type
    (values and gradients in the parametrization); the padded token gets no gradient and nothing is clipped."""
    logps, mask, advantages = base_batch()
    loss, metrics = grpo_loss(logps, None, None, advantages, mask, loss_type=loss_type, **kwargs)
    assert_close(loss, scalar(expected))
    assert_close(metrics["loss"], scalar(expected))
    loss.backward()
    assert_close(logps.grad, t([[row0_grad, row0_grad, 0.0], [row1_grad, row1_grad, row1_grad]]))
    assert "kl" not in metrics
    if loss_type == "cispo":
        assert_close(metrics["cispo_clip_ratio"], scalar(0.0))
    else:
        for name in ("low_mean", "high_mean", "region_mean", "low_min", "high_max"):
            assert_close(metrics[f"clip_ratio/{name}"], scalar(0.0))


def test_grpo_loss_on_policy_sequence_level_equals_token_level():
    """On-policy the GSPO ratio is also 1, so the loss and gradient equal the token-level ones (bnpo: -0.2)."""
    logps, mask, advantages = base_batch()
    loss, _ = grpo_loss(logps, None, None, advantages, mask, loss_type="bnpo", importance_sampling_level="sequence")
    assert_close(loss, scalar(-0.2))
    loss.backward()
    assert_close(logps.grad, t([[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]))


# -- grpo_loss: clipping --------------------------------------------------------------------------------------------


def off_policy_batch():
    """old = 0, logps = log-ratios: row 0 (A = 2) ratios [1.5, 1.1], row 1 (A = -1) ratios [0.5, 1.5]."""
    logps = t([[math.log(1.5), math.log(1.1)], [math.log(0.5), math.log(1.5)]], grad=True)
    return logps, torch.zeros(2, 2, dtype=torch.float64), t([2.0, -1.0]), torch.ones(2, 2)


def test_grpo_loss_token_clipping_counts_and_gradient():
    """eps = 0.2, bnpo. Per token -min(w A, clip(w, 0.8, 1.2) A):
    row 0 (A=2): w 1.5 -> -min(3, 2.4) = -2.4 (clipped high); w 1.1 -> -2.2.
    row 1 (A=-1): w 0.5 -> -min(-0.5, -0.8) = 0.8 (clipped low); w 1.5 -> -min(-1.5, -1.2) = 1.5 (not clipped:
    a ratio above the range with A < 0 keeps its gradient). Loss (-2.4 - 2.2 + 0.8 + 1.5) / 4 = -0.575.
    Metrics: low 1/4, high 1/4, region 2/4; per-row low fractions [0, 1/2] (min 0), high [1/2, 0] (max 1/2).
    Gradient d/dlogp = -A w / 4 on unclipped tokens, 0 on clipped: [[0, -2.2/4], [0, 1.5/4]]."""
    logps, old, advantages, mask = off_policy_batch()
    loss, metrics = grpo_loss(logps, old, None, advantages, mask, loss_type="bnpo", epsilon=0.2)
    assert_close(loss, scalar(-0.575))
    assert_close(metrics["clip_ratio/low_mean"], scalar(0.25))
    assert_close(metrics["clip_ratio/high_mean"], scalar(0.25))
    assert_close(metrics["clip_ratio/region_mean"], scalar(0.5))
    assert_close(metrics["clip_ratio/low_min"], scalar(0.0))
    assert_close(metrics["clip_ratio/high_max"], scalar(0.5))
    loss.backward()
    assert_close(logps.grad, t([[0.0, -2.2 / 4], [0.0, 1.5 / 4]]))


def test_grpo_loss_epsilon_high_widens_upper_bound():
    """epsilon_high = 0.6: row 0's w = 1.5 < 1.6 is no longer clipped, -3 instead of -2.4;
    loss (-3 - 2.2 + 0.8 + 1.5) / 4 = -0.725; high_mean 0, low_mean still 1/4."""
    logps, old, advantages, mask = off_policy_batch()
    loss, metrics = grpo_loss(logps, old, None, advantages, mask, loss_type="bnpo", epsilon_high=0.6)
    assert_close(loss, scalar(-0.725))
    assert_close(metrics["clip_ratio/high_mean"], scalar(0.0))
    assert_close(metrics["clip_ratio/low_mean"], scalar(0.25))


def test_grpo_loss_delta_caps_the_unclipped_ratio():
    """delta = 1.3: row 1's w = 1.5 with A = -1 becomes -min(-1.3, -1.2) = 1.3 (was 1.5); row 0's clipped token is
    -min(2.6, 2.4) = -2.4 as before. Loss (-2.4 - 2.2 + 0.8 + 1.3) / 4 = -0.625."""
    logps, old, advantages, mask = off_policy_batch()
    loss, _ = grpo_loss(logps, old, None, advantages, mask, loss_type="bnpo", delta=1.3)
    assert_close(loss, scalar(-0.625))


def test_grpo_loss_sequence_level_ratio_is_exp_mean_log_ratio():
    """GSPO: row 0 log-ratios [ln 2, 0] -> w = exp(ln 2 / 2) = sqrt(2); row 1 [ln 1.1, (pad) ln 5] with mask [1, 0]
    -> w = 1.1 (padding excluded). A = [1, 1].
    eps = 10 (nothing clips), grpo: -mean_i w_i = -(sqrt(2) + 1.1) / 2.
    eps = 0.2: row 0 clips at 1.2, grpo loss -(1.2 + 1.1) / 2 = -1.15; bnpo broadcasts the per-sequence loss over
    the 3 tokens: (-1.2 * 2 - 1.1) / 3; clip metrics count sequences: high_mean 1/2, high_max 1."""
    old = torch.zeros(2, 2, dtype=torch.float64)
    logps = t([[LN2, 0.0], [math.log(1.1), math.log(5.0)]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = t([1.0, 1.0])
    kwargs = {"importance_sampling_level": "sequence"}
    loss, _ = grpo_loss(logps, old, None, advantages, mask, loss_type="grpo", epsilon=10.0, **kwargs)
    assert_close(loss, scalar(-(math.sqrt(2) + 1.1) / 2))
    loss, metrics = grpo_loss(logps, old, None, advantages, mask, loss_type="grpo", **kwargs)
    assert_close(loss, scalar(-1.15))
    assert_close(metrics["clip_ratio/high_mean"], scalar(0.5))
    assert_close(metrics["clip_ratio/region_mean"], scalar(0.5))
    assert_close(metrics["clip_ratio/high_max"], scalar(1.0))
    loss, _ = grpo_loss(logps, old, None, advantages, mask, loss_type="bnpo", **kwargs)
    assert_close(loss, scalar((-1.2 * 2 - 1.1) / 3))


def test_cispo_caps_stopped_ratio():
    """cispo, eps_high = 5, A = 1, logps [-1, -2], old chosen so the ratios are [6, 2]:
    l = -sg(min(w, 5)) * A * logp = [5, 4]; loss 9 / 2 = 4.5; gradient -min(w, 5) * A / 2 = [-2.5, -1];
    cispo_clip_ratio = 1/2 (the ratio 6 > 5 with A > 0)."""
    logps = t([[-1.0, -2.0]], grad=True)
    old = t([[-1.0 - math.log(6.0), -2.0 - LN2]])
    loss, metrics = grpo_loss(logps, old, None, t([1.0]), torch.ones(1, 2), loss_type="cispo", epsilon_high=5.0)
    assert_close(loss, scalar(4.5))
    assert_close(metrics["cispo_clip_ratio"], scalar(0.5))
    assert "clip_ratio/region_mean" not in metrics
    loss.backward()
    assert_close(logps.grad, t([[-2.5, -1.0]]))


# -- grpo_loss: KL, token weights ------------------------------------------------------------------------------------


def test_grpo_loss_kl_term_and_bias_correction_gradient():
    """beta = 0.1, on-policy, A = 0, logps 0, ref -ln 2 on both tokens: k3 = 0.5 + ln 2 - 1 per token, bnpo loss
    = 0.1 * k3, metric kl = k3.
    Gradient per token (/2 for bnpo): d k3/d logp = 1 - exp(ref - logp) = 0.5 without bias correction; with it
    (k3 * w, w = exp(logp - sg(logp)) = 1, dw/dlogp = 1): 0.5 + k3 = logp - ref = ln 2, the reverse-KL gradient."""
    k3 = 0.5 + LN2 - 1
    for correction, grad in ((True, LN2), (False, 0.5)):
        logps = t([[0.0, 0.0]], grad=True)
        ref = t([[-LN2, -LN2]])
        loss, metrics = grpo_loss(
            logps, None, ref, t([0.0]), torch.ones(1, 2), loss_type="bnpo", beta=0.1, use_bias_correction_kl=correction
        )
        assert_close(loss, scalar(0.1 * k3))
        assert_close(metrics["kl"], scalar(k3))
        loss.backward()
        assert_close(logps.grad, t([[0.1 * grad / 2, 0.1 * grad / 2]]))


def test_grpo_loss_beta_zero_needs_no_reference():
    """beta = 0: no reference needed and no kl metric; beta != 0 without a reference raises."""
    logps, mask, advantages = base_batch()
    _, metrics = grpo_loss(logps, None, None, advantages, mask, beta=0.0)
    assert "kl" not in metrics
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, advantages, mask, beta=0.04)


def test_grpo_loss_entropy_mask_and_importance_sampling_ratio():
    """A = 1, on-policy, 2 tokens, bnpo: entropy_mask [1, 0] drops the second policy term but not its place in the
    normalizer: -1 / 2; importance_sampling_ratio [0.5, 1]: -(0.5 + 1) / 2 = -0.75."""
    logps, mask = t([[-1.0, -1.0]], grad=True), torch.ones(1, 2)
    loss, _ = grpo_loss(logps, None, None, t([1.0]), mask, loss_type="bnpo", entropy_mask=torch.tensor([[True, False]]))
    assert_close(loss, scalar(-0.5))
    loss, _ = grpo_loss(logps, None, None, t([1.0]), mask, loss_type="bnpo", importance_sampling_ratio=t([[0.5, 1.0]]))
    assert_close(loss, scalar(-0.75))


def test_grpo_loss_argument_errors():
    logps, mask, advantages = base_batch()
    with pytest.raises(ValueError, match="Unknown loss_type"):
        grpo_loss(logps, None, None, advantages, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="epsilon_high"):
        grpo_loss(logps, None, None, advantages, mask, loss_type="cispo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, None, None, advantages, mask, importance_sampling_level="batch")  # type: ignore[arg-type]


@pytest.mark.parametrize("loss_type", sorted(GRPO_LOSSES))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_all_zero_mask_is_finite(loss_type, level):
    """No completion token at all (every row masked, e.g. all truncated): loss 0, zero gradient, finite metrics."""
    logps = t([[-1.0, -2.0], [-3.0, -4.0]], grad=True)
    mask = torch.zeros(2, 2)
    loss, metrics = grpo_loss(
        logps, t([[-1.5, -2.0], [-3.0, -3.0]]), t([[-1.0, -1.0], [-1.0, -1.0]]), t([1.0, -1.0]), mask,
        loss_type=loss_type, beta=0.1, epsilon_high=5.0 if loss_type == "cispo" else None,
        importance_sampling_level=level,
    )  # fmt: skip
    assert_close(loss, scalar(0.0))
    loss.backward()
    assert_close(logps.grad, torch.zeros(2, 2, dtype=torch.float64))
    for name, value in metrics.items():
        assert torch.isfinite(value), name


# -- rloo_loss ------------------------------------------------------------------------------------------------------


def test_rloo_loss_on_policy_is_policy_gradient():
    """On-policy, A = [2, -1]: w = 1, loss -mean(A) = -(2 - 1)/2 = -0.5; d/dlogp_it = -A_i m_it / N:
    row 0 [-1, -1, 0 (pad)], row 1 [0.5, 0.5, 0.5]; no clipping."""
    logps, mask, advantages = base_batch()
    loss, metrics = rloo_loss(logps, None, advantages, mask)
    assert_close(loss, scalar(-0.5))
    loss.backward()
    assert_close(logps.grad, t([[-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]]))
    assert_close(metrics["clip_ratio/region_mean"], scalar(0.0))


def test_rloo_loss_clips_sequence_ratio_of_summed_log_ratios():
    """old = 0. Row 0 (A = 2): token ratios [1.1, 1.1] -> w = 1.1 * 1.1 = 1.21 (sum of log-ratios) > 1.2: clipped,
    -2.4. Row 1 (A = -1): [0.8, 0.9, (pad) 100] -> w = 0.72 < 0.8: clipped, -min(-0.72, -0.8) = 0.8.
    Loss (-2.4 + 0.8) / 2 = -0.8; low 1/2, high 1/2, region 1, low_min 0, high_max 1.
    epsilon_high = 0.3: row 0 unclipped, -2.42; loss (-2.42 + 0.8) / 2 = -0.81."""
    logps = t([[math.log(1.1), math.log(1.1), 0.0], [math.log(0.8), math.log(0.9), math.log(100.0)]])
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, metrics = rloo_loss(logps, old, t([2.0, -1.0]), mask)
    assert_close(loss, scalar(-0.8))
    assert_close(metrics["clip_ratio/low_mean"], scalar(0.5))
    assert_close(metrics["clip_ratio/high_mean"], scalar(0.5))
    assert_close(metrics["clip_ratio/region_mean"], scalar(1.0))
    assert_close(metrics["clip_ratio/low_min"], scalar(0.0))
    assert_close(metrics["clip_ratio/high_max"], scalar(1.0))
    loss, _ = rloo_loss(logps, old, t([2.0, -1.0]), mask, epsilon_high=0.3)
    assert_close(loss, scalar(-0.81))


def test_rloo_loss_all_zero_mask_is_finite():
    """No completion tokens: w = exp(0) = 1, loss = -mean(A) = 0 for A = [1, -1], zero gradient."""
    logps = t([[-1.0, -2.0]] * 2, grad=True)
    loss, metrics = rloo_loss(logps, t([[0.0, 0.0]] * 2), t([1.0, -1.0]), torch.zeros(2, 2))
    assert_close(loss, scalar(0.0))
    loss.backward()
    assert_close(logps.grad, torch.zeros(2, 2, dtype=torch.float64))
    assert all(torch.isfinite(value) for value in metrics.values())
