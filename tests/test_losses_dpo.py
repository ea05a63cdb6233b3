"""Closed-form tests of the DPO-family losses and the sequence log-prob helpers.

Every expected value is derived by hand in the test's docstring from small numbers. Notation: ``c`` and ``r`` are
the chosen and rejected log-ratios (policy minus reference sequence log-prob), ``delta = c - r``,
``sp(x) = log(1 + e^x)`` so that ``-log sigmoid(x) = sp(-x)``, and ``sigma`` is the logistic function.

Most tests use the pair chosen = -1, rejected = -3, ref_chosen = ref_rejected = -2, lengths 2 and 4, beta = 0.5:
``c = 1``, ``r = -1``, ``delta = 2``, ``beta * delta = 1``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from ltpost.losses.dpo import (
    DPO_LOSSES,
    F_DIVERGENCE_LOSS_TYPES,
    PreferenceLogps,
    dpo_loss,
    f_divergence_scores,
    log_sum_sq_probs,
    sequence_logps,
    wpo_weights,
)

LN2 = math.log(2)
REQUIRED_LOSS_TYPES = {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
}  # fmt: skip
# Hyperparameters some losses need to be defined at all (EXO's log(eps) needs eps > 0).
LOSS_KWARGS = {"exo_pair": {"label_smoothing": 0.1}}


def sp(x: float) -> float:
    """softplus: log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def pairs(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths=None, rejected_lengths=None, grad=False):
    """PreferenceLogps in float64 from lists; lengths default to 1 token each."""

    def t(values, requires_grad=False):
        return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)

    batch = len(chosen)
    return PreferenceLogps(
        chosen=t(chosen, grad),
        rejected=t(rejected, grad),
        ref_chosen=t(ref_chosen),
        ref_rejected=t(ref_rejected),
        chosen_lengths=torch.tensor(chosen_lengths or [1] * batch),
        rejected_lengths=torch.tensor(rejected_lengths or [1] * batch),
    )


def base_pair(**overrides):
    """chosen -1, rejected -3, refs -2, lengths 2 and 4: c = 1, r = -1, delta = 2."""
    values = {"chosen": [-1.0], "rejected": [-3.0], "ref_chosen": [-2.0], "ref_rejected": [-2.0]}
    values.update(overrides)
    return pairs(**values, chosen_lengths=[2], rejected_lengths=[4])


def loss_of(loss_type, logps, **kwargs):
    loss, _ = dpo_loss(logps, loss_type, **kwargs)
    return loss


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def grads(loss: torch.Tensor, logps: PreferenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d chosen and d loss / d rejected, zeros where the loss does not use the input."""
    inputs = (logps.chosen, logps.rejected)
    found = torch.autograd.grad(loss, inputs, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found))


def test_registry_holds_exactly_the_trl_loss_types():
    """``DPO_LOSSES`` has one function per TRL ``loss_type`` name, the 15 TRL lists, and no others."""
    assert set(DPO_LOSSES) == REQUIRED_LOSS_TYPES
    assert all(callable(fn) for fn in DPO_LOSSES.values())


# -- invariants ---------------------------------------------------------------------------------------------------


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    """Policy == reference: c = r = 0, so delta = 0 and the sigmoid loss is -log sigma(0) = log 2 exactly, for any
    beta. Rewards beta*c, beta*r and the margin are 0; accuracy counts beta*c > beta*r strictly, so it is 0."""
    logps = pairs([-1.0, -7.0], [-3.0, -2.5], [-1.0, -7.0], [-3.0, -2.5])
    loss, metrics = dpo_loss(logps, "sigmoid", beta=0.3)
    assert_close(loss, scalar(LN2))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert_close(metrics[key], scalar(0.0), msg=key)
    assert_close(metrics["loss"], scalar(LN2))


def test_metrics_closed_form_and_detached():
    """Two pairs, beta = 0.5: chosen [-1, -2], rejected [-3, -1], all refs -2.

    c = [1, 0], r = [-1, 1]; rewards beta*c = [0.5, 0], beta*r = [-0.5, 0.5].
    rewards/chosen = 0.25, rewards/rejected = 0, margins = mean([1, -0.5]) = 0.25,
    accuracies = mean([0.5 > -0.5, 0 > 0.5]) = 0.5, logps/chosen = -1.5, logps/rejected = -2.
    """
    logps = pairs([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0], grad=True)
    loss, metrics = dpo_loss(logps, "sigmoid", beta=0.5)
    expected = {
        "rewards/chosen": 0.25,
        "rewards/rejected": 0.0,
        "rewards/margins": 0.25,
        "rewards/accuracies": 0.5,
        "logps/chosen": -1.5,
        "logps/rejected": -2.0,
    }
    for key, value in expected.items():
        assert_close(metrics[key].double(), scalar(value), msg=key)
    assert loss.requires_grad
    assert all(not value.requires_grad for value in metrics.values())
    assert_close(metrics["loss"], loss.detach())


# -- one closed-form test per loss type -----------------------------------------------------------------------------


def test_sigmoid_closed_form():
    """beta*delta = 1: loss = -log sigma(1) = log(1 + e^-1) = 0.3132617."""
    assert_close(loss_of("sigmoid", base_pair(), beta=0.5), scalar(sp(-1.0)))
    assert_close(loss_of("sigmoid", base_pair(), beta=0.5), scalar(0.31326168751822286))


def test_hinge_closed_form():
    """beta = 0.25: beta*delta = 0.5 < 1, loss = relu(1 - 0.5) = 0.5. beta = 0.5: beta*delta = 1, loss = relu(0) = 0
    (the margin 1/beta = 2 is met)."""
    assert_close(loss_of("hinge", base_pair(), beta=0.25), scalar(0.5))
    assert_close(loss_of("hinge", base_pair(), beta=0.5), scalar(0.0))


def test_ipo_closed_form():
    """Length-normalized: c/n_c = 1/2, r/n_r = -1/4, difference 3/4; target 1/(2 beta) = 1 for beta = 0.5.
    loss = (3/4 - 1)^2 = 1/16 = 0.0625."""
    assert_close(loss_of("ipo", base_pair(), beta=0.5), scalar(0.0625))


def test_exo_pair_closed_form():
    """x = beta*delta = 1, eps = 0.1: q_w = sigma(1) = 0.7310586, q_l = sigma(-1) = 0.2689414.
    KL(q || (0.9, 0.1)) = q_w log(q_w / 0.9) + q_l log(q_l / 0.1)
                        = 0.7310586 * (-0.2079012) + 0.2689414 * 0.9893234 = 0.1140821."""
    q_w, q_l = sigma(1.0), sigma(-1.0)
    expected = q_w * math.log(q_w / 0.9) + q_l * math.log(q_l / 0.1)
    assert_close(loss_of("exo_pair", base_pair(), beta=0.5, label_smoothing=0.1), scalar(expected))
    assert_close(scalar(expected), scalar(0.1140821), atol=1e-6, rtol=0)


def test_exo_pair_is_zero_at_its_target():
    """KL(q || p) = 0 when q = p: beta*delta = log((1 - eps) / eps) makes sigma(beta*delta) = 1 - eps.
    With eps = 0.2, beta = 1: delta = log 4, so chosen = log 4 with all else 0."""
    logps = pairs([math.log(4)], [0.0], [0.0], [0.0])
    assert_close(loss_of("exo_pair", logps, beta=1.0, label_smoothing=0.2), scalar(0.0))


def test_nca_pair_closed_form():
    """Rewards beta*c = 0.5, beta*r = -0.5.
    loss = -log sigma(0.5) - 0.5 log sigma(-0.5) - 0.5 log sigma(0.5) = 1.5 sp(-0.5) + 0.5 sp(0.5)
         = 1.5 * 0.4740770 + 0.5 * 0.9740770 = 1.1981540."""
    expected = 1.5 * sp(-0.5) + 0.5 * sp(0.5)
    assert_close(loss_of("nca_pair", base_pair(), beta=0.5), scalar(expected))
    assert_close(scalar(expected), scalar(1.1981540), atol=1e-6, rtol=0)


def test_robust_closed_form():
    """eps = 0.1, x = 1: (-(0.9) log sigma(1) + 0.1 log sigma(-1)) / 0.8 = (0.9 sp(-1) - 0.1 sp(1)) / 0.8
    = (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1882617."""
    expected = (0.9 * sp(-1.0) - 0.1 * sp(1.0)) / 0.8
    assert_close(loss_of("robust", base_pair(), beta=0.5, label_smoothing=0.1), scalar(expected))
    assert_close(scalar(expected), scalar(0.1882617), atol=1e-6, rtol=0)


def test_robust_without_label_smoothing_is_sigmoid():
    """eps = 0: (-(1) log sigma(x) + 0) / 1 = -log sigma(x), the sigmoid loss, for every pair."""
    logps = pairs([-1.0, -4.0, 0.5], [-3.0, -1.0, -0.5], [-2.0, -3.0, 0.0], [-2.0, -2.0, 1.0])
    assert_close(loss_of("robust", logps, beta=0.7), loss_of("sigmoid", logps, beta=0.7))


def test_bco_pair_closed_form_and_reward_mean():
    """Rewards beta*c = 0.5, beta*r = -0.5.
    delta = 0: -log sigma(0.5) - log sigma(0.5) = 2 sp(-0.5) = 0.9481540.
    delta = 0.25: -log sigma(0.5 - 0.25) - log sigma(-(-0.5 - 0.25)) = sp(-0.25) + sp(-0.75) = 0.5759394 + 0.3868710 = 0.9628104.
    The reported batch reward mean is mean(0.5, -0.5) = 0."""
    loss, metrics = dpo_loss(base_pair(), "bco_pair", beta=0.5)
    assert_close(loss, scalar(2 * sp(-0.5)))
    assert_close(metrics["bco_pair/reward_mean"], scalar(0.0))
    shifted = loss_of("bco_pair", base_pair(), beta=0.5, bco_delta=torch.tensor(0.25, dtype=torch.float64))
    assert_close(shifted, scalar(sp(-0.25) + sp(-0.75)))
    assert_close(shifted, scalar(0.9628104), atol=1e-6, rtol=0)


def test_bco_reward_mean_is_over_chosen_and_rejected_rewards():
    """beta = 1, two pairs with c = [1, 2], r = [0, -1]: mean of the four rewards [1, 2, 0, -1] = 0.5."""
    logps = pairs([1.0, 2.0], [0.0, -1.0], [0.0, 0.0], [0.0, 0.0])
    _, metrics = dpo_loss(logps, "bco_pair", beta=1.0)
    assert_close(metrics["bco_pair/reward_mean"], scalar(0.5))


def test_sppo_hard_closed_form():
    """beta = 1: targets c -> 1/(2 beta) = 0.5, r -> -0.5. loss = (1 - 0.5)^2 + (-1 + 0.5)^2 = 0.5.
    beta = 0.5: targets +-1 are met exactly, loss = 0."""
    assert_close(loss_of("sppo_hard", base_pair(), beta=1.0), scalar(0.5))
    assert_close(loss_of("sppo_hard", base_pair(), beta=0.5), scalar(0.0))


def test_aot_sorts_policy_and_reference_margins_separately():
    """Two pairs: chosen [-1, -1], rejected [-2, -4], ref_chosen [-1, -2], ref_rejected [-3, -2].
    Policy margins chosen - rejected = [1, 3]; reference margins [2, 0].
    Sorted: [1, 3] and [0, 2], so d = [1, 1] (unsorted it would be [-1, 3]).
    beta = 0.5: loss = mean(-log sigma(0.5), -log sigma(0.5)) = sp(-0.5) = 0.4740770."""
    logps = pairs([-1.0, -1.0], [-2.0, -4.0], [-1.0, -2.0], [-3.0, -2.0])
    assert_close(loss_of("aot", logps, beta=0.5), scalar(sp(-0.5)))
    unsorted = (sp(0.5) + sp(-1.5)) / 2  # what the pairwise sigmoid loss gives instead
    assert_close(loss_of("sigmoid", logps, beta=0.5), scalar(unsorted))


def test_aot_unpaired_sorts_chosen_and_rejected_logratios_separately():
    """Same batch as the paired test: c = chosen - ref_chosen = [0, 1], r = rejected - ref_rejected = [1, -2].
    Sorted c [0, 1], sorted r [-2, 1]: d = [2, 0]. beta = 0.5: loss = (sp(-1) + sp(0)) / 2
    = (0.3132617 + 0.6931472) / 2 = 0.5032044."""
    logps = pairs([-1.0, -1.0], [-2.0, -4.0], [-1.0, -2.0], [-3.0, -2.0])
    expected = (sp(-1.0) + LN2) / 2
    assert_close(loss_of("aot_unpaired", logps, beta=0.5), scalar(expected))
    assert_close(scalar(expected), scalar(0.5032044), atol=1e-6, rtol=0)


def test_aot_label_smoothing_closed_form():
    """One pair, d = delta = 2, beta = 0.5, eps = 0.1: 0.9 * sp(-1) + 0.1 * sp(1) = 0.4132617."""
    expected = 0.9 * sp(-1.0) + 0.1 * sp(1.0)
    for loss_type in ("aot", "aot_unpaired"):
        assert_close(loss_of(loss_type, base_pair(), beta=0.5, label_smoothing=0.1), scalar(expected), msg=loss_type)


def test_aot_variants_with_one_pair_are_sigmoid():
    """With one pair sorting does nothing: aot's d = (chosen - rejected) - (ref_chosen - ref_rejected) = c - r, and
    aot_unpaired's d = c - r; both equal the sigmoid loss -log sigma(beta (c - r))."""
    logps = pairs([-1.3], [-0.2], [-2.0], [-0.9])
    expected = loss_of("sigmoid", logps, beta=0.4)
    assert_close(loss_of("aot", logps, beta=0.4), expected)
    assert_close(loss_of("aot_unpaired", logps, beta=0.4), expected)


def test_apo_zero_closed_form():
    """beta*c = 0.5, beta*r = -0.5: 1 - sigma(0.5) + sigma(-0.5) = 2 sigma(-0.5) = 2 * 0.3775407 = 0.7550813."""
    assert_close(loss_of("apo_zero", base_pair(), beta=0.5), scalar(2 * sigma(-0.5)))
    assert_close(loss_of("apo_zero", base_pair(), beta=0.5), scalar(0.7550813), atol=1e-6, rtol=0)


def test_apo_down_closed_form():
    """beta*c = 0.5, beta*(c - r) = 1: sigma(0.5) + 1 - sigma(1) = 0.6224593 + 1 - 0.7310586 = 0.8914007."""
    assert_close(loss_of("apo_down", base_pair(), beta=0.5), scalar(sigma(0.5) + 1 - sigma(1.0)))
    assert_close(loss_of("apo_down", base_pair(), beta=0.5), scalar(0.8914007), atol=1e-6, rtol=0)


def test_discopop_closed_form():
    """x = beta*delta = 1, m = sigma(x / tau); loss = (1 - m) sp(-x) + m e^-x.
    tau = 1: m = sigma(1) = 0.7310586; loss = 0.2689414 * 0.3132617 + 0.7310586 * 0.3678794 = 0.3531905.
    tau = 0.05 (default): m = sigma(20) = 1 - 2.06e-9; loss = e^-1 + (1 - m)(sp(-1) - e^-1) ~ 0.3678794."""
    m = sigma(1.0)
    expected = (1 - m) * sp(-1.0) + m * math.exp(-1.0)
    assert_close(loss_of("discopop", base_pair(), beta=0.5, discopop_tau=1.0), scalar(expected))
    assert_close(scalar(expected), scalar(0.3531905), atol=1e-6, rtol=0)
    m = sigma(20.0)
    expected_default = (1 - m) * sp(-1.0) + m * math.exp(-1.0)
    assert_close(loss_of("discopop", base_pair(), beta=0.5), scalar(expected_default))


def test_discopop_is_finite_for_very_negative_margins():
    """x = -100: m = sigma(-2000) underflows to 0 and e^100 is large; m e^-x = exp(100 - 2000 + ...) ~ 0, so
    loss ~ sp(100) = 100 (TRL's literal product would be 0 * inf in float32)."""
    logps = PreferenceLogps(*(torch.tensor([v], dtype=torch.float32) for v in (-200.0, 0.0, 0.0, 0.0, 1.0, 1.0)))
    loss, _ = dpo_loss(logps, "discopop", beta=0.5)
    assert torch.isfinite(loss)
    assert_close(loss, torch.tensor(100.0))


def test_sft_is_token_mean_nll_of_chosen():
    """Two pairs, chosen sums [-1, -3] over [2, 4] tokens: NLL per token = (1 + 3) / (2 + 4) = 2/3 (a mean of
    per-sequence means would be (0.5 + 0.75) / 2 = 0.625). Rejected and reference log-probs do not enter."""
    logps = pairs([-1.0, -3.0], [-50.0, 7.0], [3.0, 3.0], [-9.0, 2.0], chosen_lengths=[2, 4], rejected_lengths=[9, 1])
    assert_close(loss_of("sft", logps), scalar(2 / 3))


def test_sft_uses_plain_chosen_logps_when_given():
    """With LD-DPO the chosen sums are weighted; ``sft_chosen_logps`` = [-2, -4] replaces them: (2 + 4) / 6 = 1."""
    logps = pairs([-1.0, -3.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0], chosen_lengths=[2, 4], rejected_lengths=[1, 1])
    plain = torch.tensor([-2.0, -4.0], dtype=torch.float64)
    assert_close(loss_of("sft", logps, sft_chosen_logps=plain), scalar(1.0))


def test_sigmoid_norm_closed_form():
    """Per-token log-ratios c/n_c = 1/2, r/n_r = -1/4, difference 3/4; beta = 0.5:
    loss = -log sigma(0.375) = sp(-0.375) = 0.5231233."""
    assert_close(loss_of("sigmoid_norm", base_pair(), beta=0.5), scalar(sp(-0.375)))
    assert_close(loss_of("sigmoid_norm", base_pair(), beta=0.5), scalar(0.5231233), atol=1e-6, rtol=0)


# -- combinations -------------------------------------------------------------------------------------------------


def test_loss_type_list_is_the_weighted_sum_of_single_losses():
    """MPO-style: loss = sum_k w_k * loss_k. With weights [0.8, 0.2, 1.0] for sigmoid, bco_pair, sft on a random
    batch it equals the same combination of the three single-loss values."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 3, generator=generator, dtype=torch.float64) - 2  # [4 fields, B=3]
    logps = PreferenceLogps(*values, torch.tensor([2, 3, 5]), torch.tensor([4, 1, 2]))
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    combined, metrics = dpo_loss(logps, names, loss_weights=weights, beta=0.3)
    expected = sum(w * loss_of(name, logps, beta=0.3) for name, w in zip(names, weights))
    assert_close(combined, expected)
    assert "bco_pair/reward_mean" in metrics


def test_loss_type_list_defaults_to_unit_weights():
    """No weights: sigmoid + hinge = sp(-1) + relu(1 - 1) = 0.3132617 at beta*delta = 1."""
    assert_close(loss_of(["sigmoid", "hinge"], base_pair(), beta=0.5), scalar(sp(-1.0)))
    assert_close(loss_of(["sigmoid", "sigmoid"], base_pair(), beta=0.5), scalar(2 * sp(-1.0)))


# -- f-divergences ------------------------------------------------------------------------------------------------


def test_f_divergence_scores_closed_form():
    """At log-ratio 1 (u = e):
    forward_kl: 1 - 1/u = 1 - e^-1 = 0.6321206;
    js_divergence: log(2u / (1 + u)) = log 2 + log sigma(1) = 0.3798854;
    alpha_divergence, a = 0.5: (u^-0.5 - 1) / (-0.5) = 2 (1 - e^-0.5) = 0.7869387;
    alpha_divergence, a = 1: the limit log u = 1; reverse_kl: log u = 1."""
    x = torch.tensor([1.0], dtype=torch.float64)
    assert_close(f_divergence_scores(x, "forward_kl"), torch.tensor([1 - math.exp(-1)], dtype=torch.float64))
    js = math.log(2 * math.e / (1 + math.e))
    assert_close(f_divergence_scores(x, "js_divergence"), torch.tensor([js], dtype=torch.float64))
    alpha = 2 * (1 - math.exp(-0.5))
    assert_close(f_divergence_scores(x, "alpha_divergence", 0.5), torch.tensor([alpha], dtype=torch.float64))
    assert_close(f_divergence_scores(x, "alpha_divergence", 1.0), x)
    assert_close(f_divergence_scores(x, "reverse_kl"), x)


def test_sigmoid_with_forward_kl_closed_form():
    """c = 1, r = -1: scores 1 - e^-1 and 1 - e^1, delta = e - e^-1 = 2 sinh 1 = 2.3504024.
    beta = 0.5: loss = sp(-sinh 1) = sp(-1.1752012) = 0.2690777."""
    expected = sp(-math.sinh(1.0))
    assert_close(loss_of("sigmoid", base_pair(), beta=0.5, f_divergence_type="forward_kl"), scalar(expected))
    assert_close(scalar(expected), scalar(0.2690777), atol=1e-6, rtol=0)


def test_sigmoid_with_js_divergence_closed_form():
    """c = 1, r = -1: delta = log sigma(1) - log sigma(-1) = 1 (log sigma(x) - log sigma(-x) = x).
    beta = 0.5: loss = sp(-0.5) = 0.4740770."""
    assert_close(loss_of("sigmoid", base_pair(), beta=0.5, f_divergence_type="js_divergence"), scalar(sp(-0.5)))


def test_sigmoid_with_alpha_divergence_closed_form():
    """a = 0.5, c = 1, r = -1: scores 2(1 - e^-0.5) and 2(1 - e^0.5), delta = 2(e^0.5 - e^-0.5) = 4 sinh 0.5
    = 2.0843812. beta = 0.5: loss = sp(-2 sinh 0.5) = sp(-1.0421906) = 0.3020887.
    a = 1 is the reverse-KL limit: the plain sigmoid value sp(-1)."""
    kwargs = {"beta": 0.5, "f_divergence_type": "alpha_divergence"}
    expected = sp(-2 * math.sinh(0.5))
    assert_close(loss_of("sigmoid", base_pair(), f_alpha_divergence_coef=0.5, **kwargs), scalar(expected))
    assert_close(scalar(expected), scalar(0.3020887), atol=1e-6, rtol=0)
    assert_close(loss_of("sigmoid", base_pair(), f_alpha_divergence_coef=1.0, **kwargs), scalar(sp(-1.0)))


def test_alpha_divergence_clamps_the_exponent():
    """a = 2, log-ratio 200: (a - 1) * 200 = 200 is clamped to 80, score = e^80 - 1 (finite in float32)."""
    scores = f_divergence_scores(torch.tensor([200.0]), "alpha_divergence", 2.0)
    assert torch.isfinite(scores).all()
    assert_close(scores, torch.tensor([math.exp(80) - 1]))


def test_f_divergence_only_for_difference_losses():
    """TRL allows a non-default f-divergence only for losses on s_c - s_r; others (e.g. nca_pair) raise."""
    assert F_DIVERGENCE_LOSS_TYPES <= set(DPO_LOSSES)
    with pytest.raises(ValueError, match="only applies"):
        dpo_loss(base_pair(), "nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="Unknown f_divergence_type"):
        dpo_loss(base_pair(), "sigmoid", f_divergence_type="hellinger")
    for loss_type in sorted(F_DIVERGENCE_LOSS_TYPES):
        kwargs = LOSS_KWARGS.get(loss_type, {})
        assert torch.isfinite(loss_of(loss_type, base_pair(), f_divergence_type="js_divergence", **kwargs))


# -- argument checks ----------------------------------------------------------------------------------------------


def test_bad_arguments_raise():
    """Unknown names list the valid ones; weights must match; EXO needs eps in (0, 1); robust needs eps < 0.5;
    WPO needs weights, and does not apply to the sorted aot losses."""
    with pytest.raises(ValueError, match="sigmoid_norm"):
        dpo_loss(base_pair(), "kto")
    with pytest.raises(ValueError, match="Unknown loss_type"):
        dpo_loss(base_pair(), ["sigmoid", "nope"])
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(base_pair(), [])
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(base_pair(), ["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(base_pair(), "exo_pair")
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(base_pair(), "robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="wpo_weights"):
        dpo_loss(base_pair(), "sigmoid", use_weighting=True)
    with pytest.raises(ValueError, match="use_weighting"):
        dpo_loss(base_pair(), "sigmoid", wpo_weights=torch.ones(1))
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(base_pair(), "aot", use_weighting=True, wpo_weights=torch.ones(1))


# -- gradient direction -------------------------------------------------------------------------------------------

# Sign of d loss / d chosen and d loss / d rejected at a point with small positive margin (c = 0.2, r = -0.2).
# Gradient descent moves against it, so (-, +) raises chosen over rejected. Exceptions, by design of the loss:
# - apo_down lowers the chosen likelihood too: d/dc = beta (sigma'(beta c) - sigma'(beta (c - r))) > 0 here;
# - sft ignores the rejected completion: its gradient is exactly 0.
# ipo, sppo_hard, exo_pair, nca_pair and hinge stop pushing (and push back) past their targets; discopop has the
# wrong sign at zero margin (test below). The chosen point is inside the region where all of them push the right way.
EXPECTED_SIGNS = {name: (-1, 1) for name in DPO_LOSSES} | {"apo_down": (1, 1), "sft": (-1, 0)}


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_gradient_raises_chosen_over_rejected(loss_type):
    """beta = 0.5, two pairs, each c = 0.2 and r = -0.2 with different references and lengths 2 / 4: every pair's
    chosen gradient has the expected sign (see EXPECTED_SIGNS), and so does every rejected gradient."""
    logps = pairs(
        [-1.8, -2.8],
        [-2.7, -1.2],
        [-2.0, -3.0],
        [-2.5, -1.0],
        chosen_lengths=[2, 3],
        rejected_lengths=[4, 1],
        grad=True,
    )
    chosen_grad, rejected_grad = grads(loss_of(loss_type, logps, beta=0.5, **LOSS_KWARGS.get(loss_type, {})), logps)
    chosen_sign, rejected_sign = EXPECTED_SIGNS[loss_type]
    assert torch.equal(torch.sign(chosen_grad), torch.full((2,), float(chosen_sign), dtype=torch.float64))
    assert torch.equal(torch.sign(rejected_grad), torch.full((2,), float(rejected_sign), dtype=torch.float64))


def test_discopop_pushes_the_wrong_way_at_zero_margin():
    """Documented exception: f(x) = (1 - m) sp(-x) + m e^-x, m = sigma(x / tau). At x = 0:
    f'(0) = -sigma(0)(1 - m) - sp(0) m' - m + m' with m = 1/2, m' = sigma'(0)/tau = 1/(4 tau):
    f'(0) = -1/4 - 1/2 + (1 - log 2) / (4 tau) = -0.75 + 5 * 0.3068528 = 0.7842641 > 0 for tau = 0.05.
    With beta = 1 and policy == reference, d loss / d chosen = f'(0)."""
    logps = pairs([0.0], [0.0], [0.0], [0.0], grad=True)
    loss_of("discopop", logps, beta=1.0).backward()
    assert_close(logps.chosen.grad, torch.tensor([-0.75 + 5 * (1 - LN2)], dtype=torch.float64))


def test_hinge_has_no_gradient_past_the_margin():
    """beta*delta = 2 > 1: relu(1 - 2) = 0 with zero gradient."""
    logps = pairs([1.0], [-1.0], [-1.0], [1.0], grad=True)
    loss_of("hinge", logps, beta=0.5).backward()
    assert torch.equal(logps.chosen.grad, torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_all_zero_batch_gives_finite_loss_and_gradient(loss_type):
    """All log-probs 0 and all lengths 0 (an empty completion): lengths are clamped at 1, so no 0/0; every loss and
    its gradient is finite."""
    zeros = [0.0, 0.0]
    logps = pairs(zeros, zeros, zeros, zeros, chosen_lengths=[0, 0], rejected_lengths=[0, 0], grad=True)
    loss, metrics = dpo_loss(logps, loss_type, **LOSS_KWARGS.get(loss_type, {}))
    chosen_grad, rejected_grad = grads(loss, logps)
    assert torch.isfinite(loss)
    assert torch.isfinite(chosen_grad).all() and torch.isfinite(rejected_grad).all()
    assert all(torch.isfinite(value) for value in metrics.values())


# -- sequence_logps -----------------------------------------------------------------------------------------------

# One pair: prompt of 2 tokens, chosen completion [-1, -2, -3], rejected completion [-1, -1, -1, -2, -2].
CHOSEN_TOKENS = [-1.0, -2.0, -3.0]
REJECTED_TOKENS = [-1.0, -1.0, -1.0, -2.0, -2.0]


def padded_example(garbage: float = 0.0):
    """Rows [chosen, rejected], T = 7: chosen row = P P c c c pad pad; rejected row = P P r r r r r."""
    token_logps = torch.tensor(
        [[garbage, garbage, *CHOSEN_TOKENS, garbage, garbage], [garbage, garbage, *REJECTED_TOKENS]]
    )  # [2, 7]
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)  # [2, 7]
    sequence_ids = torch.tensor([[0, 0, 0, 0, 0, -1, -1], [1] * 7])  # [2, 7]
    return token_logps, loss_mask, sequence_ids


def packed_example():
    """One row: P P c c c P P r r r r r pad (T = 13), sequence ids 0 then 1, -1 on the pad."""
    token_logps = torch.tensor([[0.0, 0.0, *CHOSEN_TOKENS, 0.0, 0.0, *REJECTED_TOKENS, 0.0]])  # [1, 13]
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # [1, 13]
    sequence_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, -1]])  # [1, 13]
    return token_logps, loss_mask, sequence_ids


def test_sequence_logps_hand_example_padded_and_packed():
    """Chosen: -1 - 2 - 3 = -6 over 3 tokens; rejected: -1 - 1 - 1 - 2 - 2 = -7 over 5 tokens; same for the padded
    rows and the padding-free row. Lengths are long counts."""
    for token_logps, loss_mask, sequence_ids in (padded_example(), packed_example()):
        logps, lengths = sequence_logps(token_logps, loss_mask, sequence_ids, num_sequences=2)
        assert_close(logps, torch.tensor([-6.0, -7.0]))
        assert lengths.dtype == torch.long
        assert torch.equal(lengths, torch.tensor([3, 5]))


def test_sequence_logps_ignores_values_outside_the_mask():
    """Prompt and pad positions hold 9 and NaN: neither reaches the sums (-6, -7) nor their gradient."""
    for garbage in (9.0, float("nan")):
        token_logps, loss_mask, sequence_ids = padded_example(garbage)
        token_logps.requires_grad_(True)
        logps, _ = sequence_logps(token_logps, loss_mask, sequence_ids, 2)
        assert_close(logps, torch.tensor([-6.0, -7.0]))
        logps.sum().backward()
        assert torch.equal(token_logps.grad, loss_mask.float())


def test_ld_dpo_hand_example():
    """ld_alpha = 0.5, public length min(3, 5) = 3 for both sequences. Chosen has only public tokens: -6.
    Rejected: first 3 tokens count fully (-3), the last 2 count half: -3 + 0.5 * (-2 - 2) = -5.
    The gradient w.r.t. each token log-prob is its weight: rejected row [0, 0, 1, 1, 1, 0.5, 0.5]."""
    public = torch.tensor([3, 3])
    for token_logps, loss_mask, sequence_ids in (padded_example(), packed_example()):
        token_logps.requires_grad_(True)
        logps, lengths = sequence_logps(
            token_logps, loss_mask, sequence_ids, 2, ld_alpha=0.5, pair_public_lengths=public
        )
        assert_close(logps, torch.tensor([-6.0, -5.0]))
        assert torch.equal(lengths, torch.tensor([3, 5]))  # lengths stay the plain counts
        logps.sum().backward()
        assert_close(token_logps.grad.sum(), torch.tensor(3 + 3 + 0.5 * 2))
    padded_logps, padded_mask, padded_ids = padded_example()
    padded_logps.requires_grad_(True)
    sequence_logps(padded_logps, padded_mask, padded_ids, 2, ld_alpha=0.5, pair_public_lengths=public)[
        0
    ].sum().backward()
    assert_close(padded_logps.grad[1], torch.tensor([0, 0, 1, 1, 1, 0.5, 0.5]))


def test_ld_alpha_one_is_plain_and_zero_truncates():
    """ld_alpha = 1 weighs every token 1: (-6, -7). ld_alpha = 0 drops tokens past the public length 3:
    rejected = -1 - 1 - 1 = -3."""
    token_logps, loss_mask, sequence_ids = packed_example()
    public = torch.tensor([3, 3])
    one, _ = sequence_logps(token_logps, loss_mask, sequence_ids, 2, ld_alpha=1.0, pair_public_lengths=public)
    zero, _ = sequence_logps(token_logps, loss_mask, sequence_ids, 2, ld_alpha=0.0, pair_public_lengths=public)
    assert_close(one, torch.tensor([-6.0, -7.0]))
    assert_close(zero, torch.tensor([-6.0, -3.0]))


def test_ld_alpha_needs_public_lengths():
    """Without the pair's public lengths the LD weights are undefined."""
    with pytest.raises(ValueError, match="pair_public_lengths"):
        sequence_logps(*packed_example(), 2, ld_alpha=0.5)


def _layouts(num_pairs: int, seed: int):
    """Random prompts and completions for ``num_pairs`` pairs (sequences 0..B-1 chosen, B..2B-1 rejected), laid out
    three ways: padded [2B, T], one padding-free row, and padding-free split over two rows."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []  # (prompt_len, completion token log-probs)
    for _ in range(2 * num_pairs):
        prompt_len = int(torch.randint(1, 4, (1,), generator=generator))
        completion_len = int(torch.randint(1, 7, (1,), generator=generator))
        sequences.append((prompt_len, -torch.rand(completion_len, generator=generator)))
    width = max(p + len(c) for p, c in sequences)

    def row_of(seq_indices, width):
        values, mask, ids = [], [], []
        for s in seq_indices:
            prompt_len, completion = sequences[s]
            values += [0.0] * prompt_len + completion.tolist()
            mask += [False] * prompt_len + [True] * len(completion)
            ids += [s] * (prompt_len + len(completion))
        pad = width - len(values)
        return values + [0.0] * pad, mask + [False] * pad, ids + [-1] * pad

    def stack(rows):
        values, mask, ids = zip(*rows)
        return torch.tensor(values), torch.tensor(mask), torch.tensor(ids)

    padded = stack([row_of([s], width) for s in range(2 * num_pairs)])
    total = sum(p + len(c) for p, c in sequences)
    packed = stack([row_of(range(2 * num_pairs), total + 3)])
    half = num_pairs  # first half of the sequences in row 0, the rest in row 1
    two_rows = stack([row_of(range(half), total), row_of(range(half, 2 * num_pairs), total)])
    lengths = torch.tensor([len(c) for _, c in sequences])
    public = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)  # [2B]
    expected_plain = torch.stack([c.sum() for _, c in sequences])
    return (padded, packed, two_rows), lengths, public, expected_plain


@pytest.mark.parametrize("ld_alpha", [None, 0.3])
def test_sequence_logps_padded_and_padding_free_agree(ld_alpha):
    """Four random pairs in a padded batch, one padding-free row, and two padding-free rows give identical
    (logps, lengths); without ld_alpha the sums equal the per-sequence sums computed directly."""
    layouts, lengths, public, expected_plain = _layouts(num_pairs=4, seed=1)
    kwargs = {} if ld_alpha is None else {"ld_alpha": ld_alpha, "pair_public_lengths": public}
    results = [sequence_logps(*layout, 8, **kwargs) for layout in layouts]
    for logps, counts in results:
        assert_close(logps, results[0][0])
        assert torch.equal(counts, lengths)
    if ld_alpha is None:
        assert_close(results[0][0], expected_plain)
    else:
        assert (results[0][0] >= expected_plain - 1e-6).all()  # down-weighting negative log-probs raises the sum


# -- WPO ----------------------------------------------------------------------------------------------------------


def test_log_sum_sq_probs_closed_form():
    """p = [1/2, 1/2]: sum p^2 = 1/2 -> log 1/2. p = [0.8, 0.2]: 0.64 + 0.04 = 0.68 -> log 0.68.
    Logits are log p (plus any constant, which softmax ignores)."""
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.8, 0.2]]])) + 3.0  # [1, 2, V=2]
    for chunk_size in (1, 1024):
        result = log_sum_sq_probs(logits, chunk_size)
        assert result.shape == (1, 2)
        assert_close(result, torch.log(torch.tensor([[0.5, 0.68]])))


def test_wpo_weights_closed_form():
    """Sequence 0: tokens log p = [log 1/2, log 1/2], log sum p^2 = [log 1/2, log 1/4]; aligned = [0, log 2];
    mean = log 2 / 2, weight = sqrt 2. Sequence 1: one token, log p = log 1/4, log sum p^2 = log 1/2;
    aligned = log 1/2, weight = 1/2. The prompt position (masked) does not count."""
    token_logps = torch.log(torch.tensor([[0.9, 0.5, 0.5, 0.9, 0.25]]))  # [1, 5] prompt, s0, s0, prompt, s1
    sq = torch.log(torch.tensor([[0.3, 0.5, 0.25, 0.3, 0.5]]))  # [1, 5]
    mask = torch.tensor([[False, True, True, False, True]])
    ids = torch.tensor([[0, 0, 0, 1, 1]])
    weights = wpo_weights(token_logps, sq, mask, ids, 2)
    assert_close(weights, torch.tensor([math.sqrt(2), 0.5]))
    assert not weights.requires_grad


def test_wpo_weighting_scales_each_pair():
    """Two identical pairs with sigmoid loss sp(-1) each, pair weights [0.5, 2]: loss = mean(0.5, 2) * sp(-1)
    = 1.25 * 0.3132617 = 0.3915771. Metrics are not weighted."""
    logps = pairs([-1.0, -1.0], [-3.0, -3.0], [-2.0, -2.0], [-2.0, -2.0])
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)
    loss, metrics = dpo_loss(logps, "sigmoid", beta=0.5, use_weighting=True, wpo_weights=weights)
    assert_close(loss, scalar(1.25 * sp(-1.0)))
    assert_close(metrics["rewards/margins"], scalar(1.0))
