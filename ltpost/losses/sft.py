"""Supervised fine-tuning losses: pure functions of logits and next-token labels.

``shift_labels[b, t]`` is the token that position ``t`` must predict (already shifted by the collator, so packed
sequences never predict across a boundary), or ``-100`` where no loss applies (prompt, padding, last token).
Each loss averages over the loss tokens of the batch and returns detached metrics named as TRL names them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ltpost.losses.logprobs import entropy_from_logits, selective_log_softmax

IGNORE_INDEX = -100


def _token_logps_and_metrics(
    logits: Tensor, shift_labels: Tensor, chunk_size: int, with_metrics: bool = True
) -> tuple[Tensor, Tensor, dict]:
    mask = shift_labels != IGNORE_INDEX  # [B, T]
    num_loss_tokens = mask.sum().clamp(min=1)  # [] stays on device: no host sync
    token_logps = selective_log_softmax(logits, shift_labels.clamp(min=0), chunk_size)  # [B, T]
    if not with_metrics:  # the entropy is a second pass over [B, T, V]: skip it when nobody logs it
        return token_logps * mask, num_loss_tokens, {}
    with torch.no_grad():
        entropy = (entropy_from_logits(logits, chunk_size) * mask).sum() / num_loss_tokens  # []
        correct = (logits.argmax(-1) == shift_labels) & mask  # [B, T]
        accuracy = correct.sum() / num_loss_tokens  # []
    metrics = {"entropy": entropy, "mean_token_accuracy": accuracy}
    return token_logps * mask, num_loss_tokens, metrics


def nll_loss(
    logits: Tensor, shift_labels: Tensor, chunk_size: int = 1024, with_metrics: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the labels, averaged over loss tokens.

    ``loss = -(1/N) * sum_t log p(y_t)`` over the ``N`` positions whose label is not ``-100``.

    Args:
        logits: ``[B, T, V]`` model outputs.
        shift_labels: ``[B, T]`` next-token targets, ``-100`` where ignored.
        chunk_size: rows per chunk in the log-softmax (memory bound, see ``losses.logprobs``).
        with_metrics: also compute ``entropy`` and ``mean_token_accuracy`` (one more pass over the logits).

    Returns:
        ``(loss, metrics)`` with metrics ``loss``, ``entropy``, ``mean_token_accuracy`` (detached; only ``loss``
        when ``with_metrics`` is False).
    """
    token_logps, num_loss_tokens, metrics = _token_logps_and_metrics(logits, shift_labels, chunk_size, with_metrics)
    loss = -token_logps.sum() / num_loss_tokens  # []
    return loss, {"loss": loss.detach(), **metrics}


def dft_loss(
    logits: Tensor, shift_labels: Tensor, chunk_size: int = 1024, with_metrics: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dynamic Fine-Tuning (Wu et al., 2025): each token's NLL weighted by its own, detached, probability.

    ``loss = -(1/N) * sum_t sg(p(y_t)) * log p(y_t)``. Tokens the model already finds unlikely get little
    weight, which makes SFT behave more like on-policy RL and generalize better.

    Args:
        logits: ``[B, T, V]`` model outputs.
        shift_labels: ``[B, T]`` next-token targets, ``-100`` where ignored.
        chunk_size: rows per chunk in the log-softmax.
        with_metrics: also compute ``entropy`` and ``mean_token_accuracy``.

    Returns:
        ``(loss, metrics)`` as in ``nll_loss``.
    """
    token_logps, num_loss_tokens, metrics = _token_logps_and_metrics(logits, shift_labels, chunk_size, with_metrics)
    weights = token_logps.detach().exp()  # [B, T] p(y_t); exp(0) = 1 on masked positions, but token_logps is 0 there
    loss = -(weights * token_logps).sum() / num_loss_tokens  # []
    return loss, {"loss": loss.detach(), **metrics}


SFT_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {"nll": nll_loss, "dft": dft_loss}
