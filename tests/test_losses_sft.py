"""Closed-form tests of the SFT losses and the chunked log-prob helpers.

Every expected value is derived by hand in the test's docstring from softmax(z)_j = exp(z_j) / sum_k exp(z_k),
then compared with what the code computes. Logits are chosen so the probabilities are simple fractions:
logits ``[0, ln 3]`` give ``p = [1/4, 3/4]``, logits ``[0, ln 3, 0]`` give ``p = [1/5, 3/5, 1/5]``, and so on.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from ltpost.losses.logprobs import entropy_from_logits, selective_log_softmax
from ltpost.losses.sft import IGNORE_INDEX, SFT_LOSSES, dft_loss, nll_loss

LN2, LN3, LN4, LN5 = math.log(2), math.log(3), math.log(4), math.log(5)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


# -- selective_log_softmax / entropy_from_logits -----------------------------------------------------------------


def test_selective_log_softmax_two_class_closed_form():
    """logits [0, ln 3]: logsumexp = ln(1 + 3) = ln 4, so log p = z - ln 4 = [-ln 4, ln 3 - ln 4] = [ln 1/4, ln 3/4]."""
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])  # [2, V=2]
    index = torch.tensor([0, 1])
    assert_close(selective_log_softmax(logits, index), torch.tensor([math.log(1 / 4), math.log(3 / 4)]))


def test_selective_log_softmax_keeps_index_shape_and_matches_log_softmax():
    """For any logits, the result is log_softmax(logits).gather(-1, index): same shape as ``index`` ([B, T])."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator)  # [B, T, V]
    index = torch.randint(0, 11, (3, 5), generator=generator)  # [B, T]
    expected = torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1)
    for chunk_size in (1, 4, 1024):
        result = selective_log_softmax(logits, index, chunk_size)
        assert result.shape == (3, 5)
        assert_close(result, expected)


def test_selective_log_softmax_is_stable_for_huge_logits():
    """logits [1000, 0]: logsumexp = 1000 + ln(1 + e^-1000) = 1000 (to float precision), so log p = [0, -1000].

    A naive log(softmax) would give log(0) = -inf for the second entry; logsumexp keeps it finite.
    """
    logits = torch.tensor([[1000.0, 0.0], [1000.0, 0.0]])
    result = selective_log_softmax(logits, torch.tensor([0, 1]))
    assert_close(result, torch.tensor([0.0, -1000.0]))


def test_selective_log_softmax_computes_half_precision_in_float32():
    """bf16 logits [0, 1] (both exact in bf16): log p(1) = 1 - ln(1 + e) = -0.3132617 in float32. The result is
    float32 at float32 accuracy; a bf16 result would be rounded to a multiple of 2^-9 ~ 0.002 near 0.31
    (-0.3125 or -0.314453), far outside float32 tolerance."""
    logits = torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16)
    result = selective_log_softmax(logits, torch.tensor([1]))
    assert result.dtype == torch.float32
    assert_close(result, torch.tensor([1 - math.log(1 + math.e)]))


def test_selective_log_softmax_gradient_is_onehot_minus_softmax():
    """d/dz_j log softmax(z)_y = 1[j = y] - p_j. For z = [0, ln 3], y = 1: [0, 1] - [1/4, 3/4] = [-1/4, 1/4]."""
    logits = torch.tensor([[0.0, LN3]], requires_grad=True)
    selective_log_softmax(logits, torch.tensor([1])).sum().backward()
    assert_close(logits.grad, torch.tensor([[-0.25, 0.25]]))


def test_entropy_two_class_closed_form():
    """p = [1/4, 3/4] (logits [0, ln 3]):
    H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 1/4 ln 4 + 3/4 ln 4 - 3/4 ln 3 = ln 4 - 3/4 ln 3."""
    logits = torch.tensor([[0.0, LN3]])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert math.isclose(expected, LN4 - 0.75 * LN3)
    assert_close(entropy_from_logits(logits), torch.tensor([expected]))


def test_entropy_of_uniform_is_ln_v_and_of_one_hot_is_zero():
    """Uniform p_j = 1/V: H = -sum_j 1/V ln(1/V) = ln V, whatever the common logit value (here 0 and 7).
    logits [1000, 0, 0]: p = [1, e^-1000, e^-1000] ~ [1, 0, 0], H = 0 (and no NaN from 0 * log 0)."""
    logits = torch.tensor([[0.0] * 7, [7.0] * 7])
    assert_close(entropy_from_logits(logits), torch.full((2,), math.log(7)))
    peaked = torch.tensor([[1000.0, 0.0, 0.0]])
    assert_close(entropy_from_logits(peaked), torch.tensor([0.0]))


def test_entropy_keeps_leading_shape_chunk_invariant_and_has_no_gradient():
    """Entropy per position: shape [B, T] from [B, T, V]; chunking only groups rows, so the values are identical;
    it runs under no_grad, so the result never requires grad even when the logits do."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 13, generator=generator, requires_grad=True)
    probs = torch.softmax(logits.detach(), -1)
    expected = -(probs * torch.log_softmax(logits.detach(), -1)).sum(-1)
    results = [entropy_from_logits(logits, chunk_size) for chunk_size in (1, 5, 1024)]
    for result in results:
        assert result.shape == (2, 6)
        assert not result.requires_grad
        assert_close(result, expected)
        assert torch.equal(result, results[0])


# -- nll_loss / dft_loss: values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label, nll, dft, accuracy",
    [
        # p = [1/4, 3/4]. Label 1: NLL = -ln 3/4 = ln 4/3, DFT = p * NLL = 3/4 ln 4/3, argmax 1 = label -> 1.
        (1, math.log(4 / 3), 0.75 * math.log(4 / 3), 1.0),
        # Label 0: NLL = -ln 1/4 = ln 4, DFT = 1/4 ln 4, argmax 1 != 0 -> 0.
        (0, LN4, 0.25 * LN4, 0.0),
    ],
)
def test_single_token_nll_dft_and_metrics(label, nll, dft, accuracy):
    """One loss token, logits [0, ln 3] over V = 2, so p = [1/4, 3/4] and N = 1.

    nll = -ln p(y); dft = -sg(p(y)) ln p(y) = p(y) * nll; entropy = ln 4 - 3/4 ln 3 (see the entropy test);
    mean_token_accuracy = 1[argmax z = y] = 1[y = 1].
    """
    logits = torch.tensor([[[0.0, LN3]]])  # [B=1, T=1, V=2]
    labels = torch.tensor([[label]])
    entropy = LN4 - 0.75 * LN3
    for loss_fn, expected in ((nll_loss, nll), (dft_loss, dft)):
        loss, metrics = loss_fn(logits, labels)
        assert_close(loss, scalar(expected))
        assert set(metrics) == {"loss", "entropy", "mean_token_accuracy"}
        assert_close(metrics["loss"], scalar(expected))
        assert_close(metrics["entropy"], scalar(entropy))
        assert_close(metrics["mean_token_accuracy"], scalar(accuracy))


def test_masked_positions_contribute_nothing_and_mean_is_over_loss_tokens():
    """T = 3, V = 2; positions 0 and 2 are loss tokens, position 1 is -100.

    Position 0: z = [0, ln 3], y = 1 -> p(y) = 3/4. Position 2: z = [ln 3, 0], y = 0 -> p(y) = 3/4.
    N = 2, so nll = (ln 4/3 + ln 4/3) / 2 = ln 4/3 (dividing by T = 3 would give 2/3 ln 4/3),
    dft = 3/4 ln 4/3, entropy = mean of two H(1/4, 3/4) = ln 4 - 3/4 ln 3 (the masked position, uniform
    [0, 0] -> H = ln 2, must not enter the mean), accuracy = 2/2 = 1.
    The masked position's logits are then replaced by wild values [100, -100]: nothing may change.
    """
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [LN3, 0.0]]])  # [1, 3, 2]
    labels = torch.tensor([[1, IGNORE_INDEX, 0]])
    wild = logits.clone()
    wild[0, 1] = torch.tensor([100.0, -100.0])
    for z in (logits, wild):
        loss, metrics = nll_loss(z, labels)
        assert_close(loss, scalar(math.log(4 / 3)))
        assert_close(metrics["entropy"], scalar(LN4 - 0.75 * LN3))
        assert_close(metrics["mean_token_accuracy"], scalar(1.0))
        loss, _ = dft_loss(z, labels)
        assert_close(loss, scalar(0.75 * math.log(4 / 3)))


def test_batch_of_several_rows():
    """B = 2, T = 2, V = 3; three loss tokens (row 1, position 1 is -100), so N = 3.

    r0p0: z = [0, 0, ln 2], y = 0: exp = [1, 1, 2], p = [1/4, 1/4, 1/2]; p(y) = 1/4, NLL ln 4; argmax 2 != 0;
          H = 2 * 1/4 ln 4 + 1/2 ln 2 = 3/2 ln 2.
    r0p1: z = [ln 2, 0, 0], y = 0: p = [1/2, 1/4, 1/4]; p(y) = 1/2, NLL ln 2; argmax 0 = y; H = 3/2 ln 2.
    r1p0: z = [0, ln 3, 0], y = 1: p = [1/5, 3/5, 1/5]; p(y) = 3/5, NLL ln 5/3; argmax 1 = y;
          H = 2 * 1/5 ln 5 + 3/5 ln 5/3 = ln 5 - 3/5 ln 3.
    nll = (ln 4 + ln 2 + ln 5/3) / 3 = ln(40/3) / 3
    dft = (1/4 ln 4 + 1/2 ln 2 + 3/5 ln 5/3) / 3
    entropy = (3/2 ln 2 + 3/2 ln 2 + ln 5 - 3/5 ln 3) / 3 = (3 ln 2 + ln 5 - 3/5 ln 3) / 3
    accuracy = 2 / 3
    """
    logits = torch.tensor(
        [
            [[0.0, 0.0, LN2], [LN2, 0.0, 0.0]],
            [[0.0, LN3, 0.0], [5.0, -5.0, 0.0]],
        ]
    )  # [2, 2, 3]
    labels = torch.tensor([[0, 0], [1, IGNORE_INDEX]])
    nll, metrics = nll_loss(logits, labels)
    assert_close(nll, scalar(math.log(40 / 3) / 3))
    assert_close(metrics["entropy"], scalar((3 * LN2 + LN5 - 0.6 * LN3) / 3))
    assert_close(metrics["mean_token_accuracy"], scalar(2 / 3))
    dft, dft_metrics = dft_loss(logits, labels)
    assert_close(dft, scalar((0.25 * LN4 + 0.5 * LN2 + 0.6 * math.log(5 / 3)) / 3))
    assert_close(dft_metrics["mean_token_accuracy"], scalar(2 / 3))


def test_uniform_logits_give_nll_and_entropy_ln_v():
    """Uniform logits (any constant, here 3.5) over V = 7: p(y) = 1/7 for every label, so nll = ln 7,
    entropy = ln 7, dft = 1/7 ln 7. Accuracy: argmax of a tie is index 0 (torch returns the first maximum),
    and the labels are 1..6 here, so accuracy = 0."""
    logits = torch.full((2, 3, 7), 3.5)
    labels = torch.tensor([[1, 2, 3], [4, 5, IGNORE_INDEX]])
    loss, metrics = nll_loss(logits, labels)
    assert_close(loss, scalar(math.log(7)))
    assert_close(metrics["entropy"], scalar(math.log(7)))
    assert_close(metrics["mean_token_accuracy"], scalar(0.0))
    loss, _ = dft_loss(logits, labels)
    assert_close(loss, scalar(math.log(7) / 7))


def test_all_masked_batch_gives_zero_not_nan():
    """No loss token: N = 0 is clamped to 1, every term is masked to 0, so loss = 0 / 1 = 0 (not 0 / 0 = NaN),
    entropy = accuracy = 0, and the gradient is exactly zero (finite)."""
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    labels = torch.full((2, 3), IGNORE_INDEX)
    for loss_fn in (nll_loss, dft_loss):
        loss, metrics = loss_fn(logits, labels)
        assert_close(loss, scalar(0.0))
        assert_close(metrics["entropy"], scalar(0.0))
        assert_close(metrics["mean_token_accuracy"], scalar(0.0))
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(logits))


def test_metrics_are_detached_and_losses_registered():
    """The returned metrics never carry a graph (they are for logging); the loss does."""
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 5]])
    for name, loss_fn in (("nll", nll_loss), ("dft", dft_loss)):
        assert SFT_LOSSES[name] is loss_fn
        loss, metrics = loss_fn(logits, labels)
        assert loss.requires_grad
        assert all(not value.requires_grad for value in metrics.values())
        assert_close(metrics["loss"], loss.detach())


# -- gradients -------------------------------------------------------------------------------------------------


def _random_problem(seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 11, generator=generator) * 2  # [B, T, V]
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    labels[0, 0] = labels[1, 3] = labels[2, 4] = labels[2, 1] = IGNORE_INDEX
    return logits, labels


def test_nll_gradient_is_softmax_minus_onehot_over_n():
    """nll = -(1/N) sum_t m_t log softmax(z_t)[y_t]. Since d/dz_tj log softmax(z_t)[y] = 1[j = y] - p_tj,
    dnll/dz_tj = m_t (p_tj - 1[j = y_t]) / N, and 0 on masked positions.

    Closed form first: one token, z = [0, ln 3], y = 1, N = 1 -> grad = [1/4, 3/4] - [0, 1] = [1/4, -1/4].
    Then the formula on random logits with 11 of 15 positions unmasked (N = 11).
    """
    logits = torch.tensor([[[0.0, LN3]]], requires_grad=True)
    nll_loss(logits, torch.tensor([[1]]))[0].backward()
    assert_close(logits.grad, torch.tensor([[[0.25, -0.25]]]))

    z, labels = _random_problem(4)
    z.requires_grad_(True)
    nll_loss(z, labels)[0].backward()
    mask = (labels != IGNORE_INDEX).float()[..., None]  # [B, T, 1]
    assert int(mask.sum()) == 11
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 11).float()
    expected = (torch.softmax(z.detach(), -1) - onehot) * mask / 11
    assert_close(z.grad, expected)


def test_dft_gradient_uses_the_detached_weight():
    """dft = -(1/N) sum_t sg(p_t(y_t)) log p_t(y_t): the weight is a constant for autograd, so
    ddft/dz_tj = m_t p_t(y_t) (p_tj - 1[j = y_t]) / N: the NLL gradient scaled by the token's probability.

    Closed form: z = [0, ln 3], y = 1 -> p(y) = 3/4, grad = 3/4 * [1/4, -1/4] = [3/16, -3/16].
    Had the weight not been detached, d/dz(-p log p) = -(ln p + 1) dp/dz with dp/dz = p (1[j=y] - p_j)
    = 3/4 [-1/4, 1/4], i.e. -(ln 3/4 + 1) * [-3/16, 3/16] = [3/16 (1 + ln 3/4), -3/16 (1 + ln 3/4)],
    which differs: the test rules it out.
    """
    logits = torch.tensor([[[0.0, LN3]]], requires_grad=True)
    dft_loss(logits, torch.tensor([[1]]))[0].backward()
    assert_close(logits.grad, torch.tensor([[[3 / 16, -3 / 16]]]))
    undetached = 3 / 16 * (1 + math.log(3 / 4))
    assert abs(logits.grad[0, 0, 0].item() - undetached) > 0.05

    z, labels = _random_problem(5)
    z.requires_grad_(True)
    dft_loss(z, labels)[0].backward()
    mask = (labels != IGNORE_INDEX).float()[..., None]
    n = mask.sum()
    probs = torch.softmax(z.detach(), -1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 11).float()
    weight = probs.gather(-1, labels.clamp(min=0)[..., None])  # [B, T, 1] p(y_t)
    assert_close(z.grad, weight * (probs - onehot) * mask / n)


@pytest.mark.parametrize("loss_fn", [nll_loss, dft_loss], ids=["nll", "dft"])
def test_chunk_size_changes_neither_values_nor_gradients(loss_fn):
    """Chunking splits the [N, V] rows into groups; each row's log-softmax depends on that row only, so
    chunk_size = 1, 2, 7 and 1024 must give identical losses, metrics and gradients."""
    z, labels = _random_problem(6)
    results = []
    for chunk_size in (1, 2, 7, 1024):
        logits = z.clone().requires_grad_(True)
        loss, metrics = loss_fn(logits, labels, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), metrics, logits.grad))
    reference_loss, reference_metrics, reference_grad = results[-1]
    assert reference_grad.abs().sum() > 0
    for loss, metrics, grad in results[:-1]:
        assert_close(loss, reference_loss, rtol=1e-6, atol=1e-7)
        for name in ("entropy", "mean_token_accuracy"):
            assert_close(metrics[name], reference_metrics[name], rtol=1e-6, atol=1e-7)
        assert_close(grad, reference_grad, rtol=1e-6, atol=1e-8)


def test_nll_matches_torch_cross_entropy():
    """nll_loss is cross-entropy with ignore_index=-100 and mean reduction over non-ignored targets."""
    z, labels = _random_problem(7)
    expected = torch.nn.functional.cross_entropy(z.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert_close(nll_loss(z, labels)[0], expected)
