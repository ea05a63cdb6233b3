"""Direct Preference Optimization losses: pure functions of sequence log-probabilities.

A preference batch holds ``B`` pairs. For each pair the caller gives the policy's and the reference's summed
completion log-probabilities of the chosen and rejected answer (``PreferenceLogps``), usually built from per-token
log-probs with ``sequence_logps``. The quantities every loss is written in:

- log-ratios ``c = log pi(y_w) - log ref(y_w)`` and ``r = log pi(y_l) - log ref(y_l)``;
- scores ``s_c = f'(c)``, ``s_r = f'(r)``: the log-ratios seen through the f-divergence regularizer
  (``f_divergence_scores``; the identity for the standard reverse KL);
- the margin ``delta = s_c - s_r``.

Each ``loss_type`` is one named function with the signature
``loss(logps, chosen_scores, rejected_scores, *, beta, <its hyperparameters>, **_) -> [B]``, returning one loss per
pair; ``**_`` swallows the hyperparameters of the other losses so ``dpo_loss`` can call every entry of
``DPO_LOSSES`` the same way. Losses that TRL defines on the raw log-ratios (``nca_pair``, ``bco_pair``,
``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``) read them from ``logps`` and ignore the
scores; ``dpo_loss`` rejects a non-default f-divergence for them, as TRL does. Formulas and names follow TRL's
``DPOTrainer``. Metrics are detached batch means named as TRL names them; no function here syncs host and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PreferenceLogps(NamedTuple):
    """Summed completion log-probabilities of ``B`` preference pairs.

    Attributes:
        chosen: ``[B]`` policy log-prob of the chosen completion (sum over its tokens).
        rejected: ``[B]`` policy log-prob of the rejected completion.
        ref_chosen: ``[B]`` reference log-prob of the chosen completion (no grad).
        ref_rejected: ``[B]`` reference log-prob of the rejected completion (no grad).
        chosen_lengths: ``[B]`` number of completion tokens of the chosen completion (float or long).
        rejected_lengths: ``[B]`` number of completion tokens of the rejected completion.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor


# -- per-token log-probs -> per-sequence quantities ---------------------------------------------------------------


def sequence_logps(
    token_logps: Tensor,
    loss_mask: Tensor,
    sequence_ids: Tensor,
    num_sequences: int,
    ld_alpha: float | None = None,
    pair_public_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum per-token log-probs into per-sequence log-probs, for padded and padding-free batches alike.

    ``logps[s] = sum_{t in s, mask} w_t * log p(y_t)`` and ``lengths[s] = #{t in s, mask}``, accumulated with
    ``index_add`` so the same code serves ``R = 2B`` padded rows (one sequence per row) and one padding-free row
    holding every sequence back to back. ``w_t = 1`` unless ``ld_alpha`` is given (LD-DPO, Liu et al., 2024): then
    the ``k``-th completion token of sequence ``s`` has ``w_t = 1`` for ``k <= public[s]`` and ``w_t = ld_alpha``
    after it, where ``public[s]`` is the shorter completion length of the pair ``s`` belongs to. ``ld_alpha = 1``
    is plain DPO; ``ld_alpha = 0`` truncates both answers to the shorter one.

    The rank ``k`` is found without a host sync: ``C`` = inclusive cumsum of the mask over the flattened batch,
    ``offset[s]`` = the smallest exclusive cumsum ``C - mask`` over the positions of ``s`` (``scatter_reduce``
    amin; the value at its first position), and ``k = C - offset[s]``. This assumes each sequence occupies
    contiguous positions in row-major order, which both layouts satisfy.

    Args:
        token_logps: ``[R, T]`` per-token log-probs (any value where ``loss_mask`` is False; it is zeroed).
        loss_mask: ``[R, T]`` bool, True on completion tokens that carry the loss.
        sequence_ids: ``[R, T]`` long, which sequence ``0..num_sequences-1`` each position belongs to; ``-1`` on
            padding.
        num_sequences: ``S``, the number of sequences (a Python int, so output shapes are static).
        ld_alpha: LD-DPO weight of the tokens past the public length, or ``None`` for plain sums.
        pair_public_lengths: ``[S]`` per sequence, ``min(chosen_length, rejected_length)`` of its pair; required
            with ``ld_alpha``.

    Returns:
        ``(logps, lengths)``: ``[S]`` weighted sums in ``token_logps``' dtype (differentiable) and ``[S]`` long
        token counts (unweighted, as TRL counts them).
    """
    if ld_alpha is not None and pair_public_lengths is None:
        raise ValueError(
            "`ld_alpha` needs `pair_public_lengths`: the shorter completion length of each sequence's pair."
        )
    flat_ids = sequence_ids.reshape(-1)  # [R*T]
    flat_mask = loss_mask.reshape(-1) & (flat_ids >= 0)  # [R*T] padding never counts
    bins = torch.where(flat_ids >= 0, flat_ids, num_sequences)  # [R*T] padding goes to an extra bin S, dropped below
    values = torch.where(flat_mask, token_logps.reshape(-1), 0.0)  # [R*T] where, not *, so garbage/NaN there is dropped
    if ld_alpha is not None:
        counts = flat_mask.long()  # [R*T]
        inclusive = counts.cumsum(0)  # [R*T] loss tokens up to and including each position
        offsets = torch.full((num_sequences + 1,), inclusive.numel(), dtype=torch.long, device=values.device)  # [S+1]
        offsets = offsets.scatter_reduce(0, bins, inclusive - counts, reduce="amin")  # [S+1] tokens before each seq
        rank = inclusive - offsets[bins]  # [R*T] 1-based rank of each loss token within its sequence
        public = pair_public_lengths.to(device=values.device)  # [S]
        public = torch.cat([public, public.new_zeros(1)])  # [S+1] the padding bin's value is never used
        in_public = rank <= public[bins]  # [R*T]
        values = values * torch.where(in_public, 1.0, ld_alpha).to(values.dtype)  # [R*T]
    logps = values.new_zeros(num_sequences + 1).index_add(0, bins, values)[:num_sequences]  # [S]
    lengths = torch.zeros(num_sequences + 1, dtype=torch.long, device=values.device)  # [S+1]
    lengths = lengths.index_add(0, bins, flat_mask.long())[:num_sequences]  # [S]
    return logps, lengths


@torch.no_grad()
def log_sum_sq_probs(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """``log sum_v softmax(z)_v^2`` per position, the normalizer of the WPO weights; no gradient.

    ``log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z)``, computed ``chunk_size`` rows at a time in float32 so
    the extra memory is ``chunk_size * V``.

    Args:
        logits: ``[..., V]`` unnormalized scores.
        chunk_size: rows processed at once.

    Returns:
        ``[...]`` values in ``(-log V, 0]``.
    """
    flat_logits = logits.reshape(-1, logits.size(-1))  # [N, V]
    pieces = []
    for start in range(0, flat_logits.size(0), chunk_size):
        rows = flat_logits[start : start + chunk_size].float()  # [n, V]
        pieces.append(torch.logsumexp(2 * rows, dim=-1) - 2 * torch.logsumexp(rows, dim=-1))  # [n]
    return torch.cat(pieces).view(logits.shape[:-1])


@torch.no_grad()
def wpo_weights(
    token_logps: Tensor, token_log_sum_sq_probs: Tensor, loss_mask: Tensor, sequence_ids: Tensor, num_sequences: int
) -> Tensor:
    """Per-sequence WPO weights (Zhou et al., 2024, Eq. 2, in TRL's "aligned" form); no gradient.

    ``w[s] = exp( (1/|s|) * sum_{t in s} (log p(y_t) - log sum_v p(v)^2) )``: the length-normalized probability of
    the sequence under the policy, each token's probability divided by the policy's expected probability
    ``sum_v p(v)^2`` at that position, so a token the policy would sample as often as its own average token
    weighs 1. The weight of a pair is ``w[chosen] * w[rejected]``, which the caller passes to ``dpo_loss``.

    Args:
        token_logps: ``[R, T]`` policy per-token log-probs of the labels (plain, not LD-weighted).
        token_log_sum_sq_probs: ``[R, T]`` ``log sum_v p(v)^2`` per position (``log_sum_sq_probs(logits)``).
        loss_mask: ``[R, T]`` bool completion mask.
        sequence_ids: ``[R, T]`` long sequence index, ``-1`` on padding (as in ``sequence_logps``).
        num_sequences: ``S``.

    Returns:
        ``[S]`` detached weights (``exp(0) = 1`` for a sequence without loss tokens).
    """
    aligned = token_logps - token_log_sum_sq_probs  # [R, T]
    sums, lengths = sequence_logps(aligned, loss_mask, sequence_ids, num_sequences)  # [S], [S]
    return torch.exp(sums / lengths.clamp(min=1))  # [S]


# -- f-divergence regularizers (f-DPO, Wang et al., 2023) -----------------------------------------------------------

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
"""Losses built on the chosen-minus-rejected score difference, where the f-DPO normalizer ``beta log Z(x)`` cancels."""


def f_divergence_scores(
    logratios: Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> Tensor:
    """``f'(u)`` at ``u = pi/ref = exp(logratio)``: what replaces the log-ratio when the KL is another f-divergence.

    - ``reverse_kl``: ``f'(u) = log u``, the log-ratio itself (standard DPO);
    - ``forward_kl``: ``f'(u) = 1 - 1/u = 1 - exp(-logratio)``;
    - ``js_divergence``: ``f'(u) = log(2u / (1 + u)) = log 2 + logsigmoid(logratio)``;
    - ``alpha_divergence``: ``f'(u) = (u^(a-1) - 1) / (a-1) = (exp((a-1) logratio) - 1) / (a-1)``, the exponent
      clamped at 80 (11 in fp16) so the exponential stays finite; ``a = 1`` is the reverse-KL limit.

    Args:
        logratios: ``[B]`` policy minus reference sequence log-probs.
        f_divergence_type: one of ``F_DIVERGENCES``.
        f_alpha_divergence_coef: ``a`` for ``alpha_divergence``.

    Returns:
        ``[B]`` scores, differentiable.
    """
    if f_divergence_type == "reverse_kl":
        return logratios  # [B]
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)  # [B]
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)  # [B]
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            return logratios  # [B] limit a -> 1 of (u^(a-1) - 1)/(a-1) is log u
        exponent = (f_alpha_divergence_coef - 1.0) * logratios  # [B]
        clamp_max = 11.0 if exponent.dtype == torch.float16 else 80.0  # exp(11) < fp16 max; exp(80) < fp32/bf16 max
        compute_dtype = torch.promote_types(exponent.dtype, torch.float32)  # half precision computes in fp32
        powered_minus_one = torch.expm1(exponent.to(compute_dtype).clamp(max=clamp_max)).to(exponent.dtype)  # [B]
        return powered_minus_one / (f_alpha_divergence_coef - 1.0)  # [B]
    raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; valid: {list(F_DIVERGENCES)}.")


# -- one function per loss_type -----------------------------------------------------------------------------------


def _logratios(logps: PreferenceLogps) -> tuple[Tensor, Tensor]:
    return logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected  # [B], [B]


def sigmoid_loss(
    logps: PreferenceLogps, chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float = 0.1, **_: Any
) -> Tensor:
    """DPO (Rafailov et al., 2023): ``-log sigmoid(beta * (s_c - s_r))``. Returns ``[B]``."""
    return -F.logsigmoid(beta * (chosen_scores - rejected_scores))  # [B]


def hinge_loss(
    logps: PreferenceLogps, chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float = 0.1, **_: Any
) -> Tensor:
    """SLiC (Zhao et al., 2023): ``relu(1 - beta * (s_c - s_r))``; ``1/beta`` is the margin. Returns ``[B]``."""
    return torch.relu(1 - beta * (chosen_scores - rejected_scores))  # [B]


def ipo_loss(
    logps: PreferenceLogps, chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float = 0.1, **_: Any
) -> Tensor:
    """IPO (Azar et al., 2023, Eq. 17), length-normalized as TRL does: ``(s_c/n_c - s_r/n_r - 1/(2 beta))^2``.

    ``n`` are the completion lengths (clamped at 1); ``beta`` plays the paper's ``tau``. Returns ``[B]``.
    """
    chosen_avg = chosen_scores / logps.chosen_lengths.clamp(min=1)  # [B]
    rejected_avg = rejected_scores / logps.rejected_lengths.clamp(min=1)  # [B]
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2  # [B]


def exo_pair_loss(
    logps: PreferenceLogps,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **_: Any,
) -> Tensor:
    """EXO-pref (Ji et al., 2024, Eq. 16): ``KL(q || p)`` over {chosen, rejected}.

    ``q = (sigmoid(x), sigmoid(-x))`` with ``x = beta * (s_c - s_r)`` and ``p = (1 - eps, eps)``, ``eps`` =
    ``label_smoothing`` (must be in (0, 1)): ``q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)``.
    Returns ``[B]``.
    """
    x = beta * (chosen_scores - rejected_scores)  # [B]
    log_q_w, log_q_l = F.logsigmoid(x), F.logsigmoid(-x)  # [B], [B]
    kl_w = log_q_w.exp() * (log_q_w - math.log1p(-label_smoothing))  # [B]
    kl_l = log_q_l.exp() * (log_q_l - math.log(label_smoothing))  # [B]
    return kl_w + kl_l  # [B]


def nca_pair_loss(
    logps: PreferenceLogps, chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float = 0.1, **_: Any
) -> Tensor:
    """NCA (Chen et al., 2024), on rewards ``r_w = beta c``, ``r_l = beta r``:
    ``-log sigmoid(r_w) - 0.5 log sigmoid(-r_w) - 0.5 log sigmoid(-r_l)``. Returns ``[B]``."""
    chosen_logratios, rejected_logratios = _logratios(logps)  # [B], [B]
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios  # [B], [B]
    chosen_term = -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)  # [B]
    return chosen_term - 0.5 * F.logsigmoid(-rejected_rewards)  # [B]


def robust_loss(
    logps: PreferenceLogps,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **_: Any,
) -> Tensor:
    """Robust DPO (Chowdhury et al., 2024), unbiased under label-flip rate ``eps`` = ``label_smoothing`` in [0, 0.5):
    ``(-(1 - eps) log sigmoid(x) + eps log sigmoid(-x)) / (1 - 2 eps)``, ``x = beta (s_c - s_r)``. Returns ``[B]``."""
    x = beta * (chosen_scores - rejected_scores)  # [B]
    clean = -(1 - label_smoothing) * F.logsigmoid(x)  # [B]
    flipped = -label_smoothing * F.logsigmoid(-x)  # [B]
    return (clean - flipped) / (1 - 2 * label_smoothing)  # [B]


def bco_pair_loss(
    logps: PreferenceLogps,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    beta: float = 0.1,
    bco_delta: Tensor | float = 0.0,
    **_: Any,
) -> Tensor:
    """BCO on pairs (Jung et al., 2024): ``-log sigmoid(beta c - delta) - log sigmoid(-(beta r - delta))``.

    ``delta`` (``bco_delta``) is the caller's running mean of the rewards ``beta c`` and ``beta r`` (TRL's older
    trainers kept it in a ``RunningMoments``; TRL 1.x uses ``delta = 0``, the default). ``dpo_loss`` reports this
    batch's mean reward as ``bco_pair/reward_mean`` to update it with. Returns ``[B]``.
    """
    chosen_logratios, rejected_logratios = _logratios(logps)  # [B], [B]
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios  # [B], [B]
    return -F.logsigmoid(chosen_rewards - bco_delta) - F.logsigmoid(-(rejected_rewards - bco_delta))  # [B]


def sppo_hard_loss(
    logps: PreferenceLogps, chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float = 0.1, **_: Any
) -> Tensor:
    """SPPO with hard win probabilities (Wu et al., 2024, Eq. 4.7 with P = 1 / 0):
    ``(c - 1/(2 beta))^2 + (r + 1/(2 beta))^2``. Returns ``[B]``."""
    chosen_logratios, rejected_logratios = _logratios(logps)  # [B], [B]
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2  # [B]


def aot_loss(
    logps: PreferenceLogps,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **_: Any,
) -> Tensor:
    """AOT, paired (Melnyk et al., 2024): distributional alignment by sorting across the batch.

    ``d = sort(log pi(y_w) - log pi(y_l)) - sort(log ref(y_w) - log ref(y_l))`` (each sorted over the batch),
    ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``. Entry ``i`` is the ``i``-th quantile, not pair
    ``i``; only the mean is meaningful. With one pair it is the sigmoid loss. Returns ``[B]``.
    """
    policy_logratios = logps.chosen - logps.rejected  # [B]
    ref_logratios = logps.ref_chosen - logps.ref_rejected  # [B]
    delta = torch.sort(policy_logratios, dim=0).values - torch.sort(ref_logratios, dim=0).values  # [B]
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing  # [B]


def aot_unpaired_loss(
    logps: PreferenceLogps,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **_: Any,
) -> Tensor:
    """AOT, unpaired (Melnyk et al., 2024): ``d = sort(c) - sort(r)`` over the batch, then as ``aot_loss``.

    Chosen and rejected log-ratio distributions are aligned without using the pairing. Returns ``[B]`` (quantiles).
    """
    chosen_logratios, rejected_logratios = _logratios(logps)  # [B], [B]
    delta = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values  # [B]
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing  # [B]


def apo_zero_loss(
    logps: PreferenceLogps, chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float = 0.1, **_: Any
) -> Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, Eq. 7): ``1 - sigmoid(beta c) + sigmoid(beta r)``.

    Raises the chosen likelihood and lowers the rejected one; for chosen answers better than the model's own.
    Returns ``[B]``.
    """
    chosen_logratios, rejected_logratios = _logratios(logps)  # [B], [B]
    return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)  # [B]


def apo_down_loss(
    logps: PreferenceLogps, chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float = 0.1, **_: Any
) -> Tensor:
    """APO-down (D'Oosterlinck et al., 2024, Eq. 8): ``sigmoid(beta c) + 1 - sigmoid(beta (c - r))``.

    Lowers the chosen likelihood and the rejected one more; for chosen answers worse than the model's own.
    Returns ``[B]``.
    """
    chosen_logratios, rejected_logratios = _logratios(logps)  # [B], [B]
    margin = chosen_logratios - rejected_logratios  # [B]
    return torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * margin)  # [B]


def discopop_loss(
    logps: PreferenceLogps,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    beta: float = 0.1,
    discopop_tau: float = 0.05,
    **_: Any,
) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al., 2024, Eq. 5), ``x = beta (s_c - s_r)``:
    ``(1 - m) * (-log sigmoid(x)) + m * exp(-x)`` with ``m = sigmoid(x / tau)``.

    ``m * exp(-x)`` is computed as ``exp(-x + log sigmoid(x / tau))``, equal but finite for very negative ``x``
    (where TRL's product is ``0 * inf``). Returns ``[B]``.
    """
    x = beta * (chosen_scores - rejected_scores)  # [B]
    modulation = torch.sigmoid(x / discopop_tau)  # [B]
    logistic = -F.logsigmoid(x) * (1 - modulation)  # [B]
    exponential = torch.exp(-x + F.logsigmoid(x / discopop_tau))  # [B] exp(-x) * m
    return logistic + exponential  # [B]


def sft_loss(
    logps: PreferenceLogps,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    *,
    sft_chosen_logps: Tensor | None = None,
    **_: Any,
) -> Tensor:
    """NLL of the chosen completions, averaged over all their tokens in the batch (as TRL's ``sft`` loss type):
    ``-sum_i log pi(y_w,i) / sum_i n_w,i``, the same scalar repeated ``[B]`` times so it combines like the others.

    ``sft_chosen_logps`` (``[B]``) replaces ``logps.chosen`` when that is LD-weighted, since TRL's NLL uses the
    plain token log-probs. Returns ``[B]``.
    """
    chosen = logps.chosen if sft_chosen_logps is None else sft_chosen_logps  # [B]
    token_mean = -chosen.sum() / logps.chosen_lengths.sum().clamp(min=1)  # []
    return token_mean.expand(chosen.shape[0])  # [B]


def sigmoid_norm_loss(
    logps: PreferenceLogps, chosen_scores: Tensor, rejected_scores: Tensor, *, beta: float = 0.1, **_: Any
) -> Tensor:
    """Length-normalized DPO: ``-log sigmoid(beta (s_c/n_c - s_r/n_r))`` with ``n`` the completion lengths (clamped
    at 1), i.e. DPO on per-token average log-ratios. Returns ``[B]``."""
    chosen_avg = chosen_scores / logps.chosen_lengths.clamp(min=1)  # [B]
    rejected_avg = rejected_scores / logps.rejected_lengths.clamp(min=1)  # [B]
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg))  # [B]


DPO_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
    "sigmoid_norm": sigmoid_norm_loss,
}


def dpo_loss(
    logps: PreferenceLogps,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
    wpo_weights: Tensor | None = None,
    discopop_tau: float = 0.05,
    bco_delta: Tensor | float = 0.0,
    sft_chosen_logps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO family's loss: ``sum_k weight_k * mean_i(w_i * loss_k(pair i))``.

    ``loss_k`` are the ``DPO_LOSSES`` named in ``loss_type`` (one name, or several combined with ``loss_weights``
    as in MPO), computed on the f-divergence scores ``f_divergence_scores(c)``, ``f_divergence_scores(r)``.
    ``w_i`` are the WPO pair weights when ``use_weighting`` is set, else 1.

    Args:
        logps: the pairs' policy and reference sequence log-probs and lengths, ``[B]`` each.
        loss_type: a name or a list of names from ``DPO_LOSSES``.
        loss_weights: one weight per loss type (default 1.0 each).
        beta: inverse strength of the pull to the reference (IPO's ``tau``).
        label_smoothing: label-flip rate for ``robust`` (in [0, 0.5)) and ``aot``/``aot_unpaired``; EXO's
            ``eps`` for ``exo_pair`` (in (0, 1); the EXO paper suggests 1e-3).
        f_divergence_type: ``reverse_kl`` (standard), ``forward_kl``, ``js_divergence`` or ``alpha_divergence``;
            non-default values only for the losses in ``F_DIVERGENCE_LOSS_TYPES``.
        f_alpha_divergence_coef: ``a`` of the alpha divergence.
        use_weighting: apply WPO weighting; needs ``wpo_weights``. Not for ``aot``/``aot_unpaired`` (their entries
            are sorted quantiles, not pairs).
        wpo_weights: ``[B]`` detached pair weights ``w[chosen] * w[rejected]`` from ``wpo_weights``.
        discopop_tau: DiscoPOP's temperature.
        bco_delta: running reward mean subtracted in ``bco_pair`` (TRL 1.x: 0).
        sft_chosen_logps: ``[B]`` plain chosen log-probs for the ``sft`` term when ``logps.chosen`` is LD-weighted.

    Returns:
        ``(loss, metrics)``: the scalar loss and detached batch means ``loss``, ``rewards/chosen``
        (``beta * c``), ``rewards/rejected``, ``rewards/accuracies`` (fraction with ``beta c > beta r``),
        ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; plus ``bco_pair/reward_mean`` (mean of
        ``beta c`` and ``beta r`` over the batch) when ``bco_pair`` is used.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    _check_arguments(loss_types, weights, label_smoothing, f_divergence_type, use_weighting, wpo_weights)

    chosen_logratios, rejected_logratios = _logratios(logps)  # [B], [B]
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)  # [B]
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)  # [B]
    hyperparameters = {
        "beta": beta,
        "label_smoothing": label_smoothing,
        "discopop_tau": discopop_tau,
        "bco_delta": bco_delta,
        "sft_chosen_logps": sft_chosen_logps,
    }
    loss = chosen_scores.new_zeros(())  # []
    for name, weight in zip(loss_types, weights):
        per_pair = DPO_LOSSES[name](logps, chosen_scores, rejected_scores, **hyperparameters)  # [B]
        if use_weighting:
            per_pair = per_pair * wpo_weights  # [B]
        loss = loss + weight * per_pair.mean()  # []

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios  # [B]
        rejected_rewards = beta * rejected_logratios  # [B]
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": logps.chosen.detach().mean(),
            "logps/rejected": logps.rejected.detach().mean(),
        }
        if "bco_pair" in loss_types:
            metrics["bco_pair/reward_mean"] = torch.cat([chosen_rewards, rejected_rewards]).mean()  # []
    return loss, metrics


def _check_arguments(
    loss_types: list[str],
    weights: list[float],
    label_smoothing: float,
    f_divergence_type: str,
    use_weighting: bool,
    wpo_weights: Tensor | None,
) -> None:
    if not loss_types:
        raise ValueError(f"`loss_type` is empty; give one or more of {list(DPO_LOSSES)}.")
    unknown = [name for name in loss_types if name not in DPO_LOSSES]
    if unknown:
        raise ValueError(f"Unknown loss_type {unknown}; valid: {list(DPO_LOSSES)}.")
    if len(weights) != len(loss_types):
        raise ValueError(f"`loss_weights` has {len(weights)} entries for {len(loss_types)} loss types {loss_types}.")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"Unknown f_divergence_type {f_divergence_type!r}; valid: {list(F_DIVERGENCES)}.")
    if f_divergence_type != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} only applies to {sorted(F_DIVERGENCE_LOSS_TYPES)} (the reference "
            f"normalizer cancels only in the chosen-rejected difference); got {loss_types}. Use 'reverse_kl'."
        )
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"'exo_pair' needs 0 < label_smoothing < 1 (the EXO paper suggests 1e-3); got {label_smoothing}."
        )
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"'robust' needs 0 <= label_smoothing < 0.5 (a label-flip rate); got {label_smoothing}.")
    if use_weighting and wpo_weights is None:
        raise ValueError("`use_weighting=True` needs `wpo_weights` ([B] pair weights from `wpo_weights(...)`).")
    if not use_weighting and wpo_weights is not None:
        raise ValueError("`wpo_weights` was given but `use_weighting=False`; set `use_weighting=True` to apply it.")
    if use_weighting and {"aot", "aot_unpaired"} & set(loss_types):
        raise ValueError(
            "WPO weighting does not apply to 'aot'/'aot_unpaired': their entries are sorted quantiles, not pairs."
        )
