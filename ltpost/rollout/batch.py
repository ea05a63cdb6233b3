"""From a rollout to a training batch: prompt + completion sequences packed padding-free, and their log-probs.

``pack_rollout`` lays the ``N`` sequences end to end in rows of at most ``max_row_tokens`` tokens (one row when
None), with ``position_ids`` restarting at every sequence, so no token is padding except a short tail per row.
Why rows at all: with flash-attention (varlen) one row costs nothing extra, but sdpa and eager build a dense
``[L, L]`` mask over a row, so attention is quadratic in the row length; rows of a few hundred tokens keep that
small while the linear layers still see no padding. Only the positions that predict completion tokens reach the
LM head (``logits_to_keep``), so the prompt tokens cost no vocabulary projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ltpost.losses.logprobs import entropy_from_logits, selective_log_softmax


def pack_rollout(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    pad_token_id: int = 0,
    max_row_tokens: int | None = None,
) -> dict[str, Any]:
    """Pack ``N`` prompt + completion sequences into padding-free rows (pure; host-side lists to tensors).

    Args:
        prompt_ids: ``N`` prompt token lists (one per completion: prompts repeated per generation).
        completion_ids: ``N`` completion token lists (may be empty).
        pad_token_id: fills the tail of rows shorter than the longest.
        max_row_tokens: most tokens per row (a sequence longer than this gets a row of its own); None: one row.

    Returns:
        ``input_ids`` and ``position_ids`` ``[R, L]``; ``logit_positions`` ``[R, K]`` (the positions whose next
        token is a completion token, padded with position 0), ``targets`` ``[R, K]`` (those tokens),
        ``scatter_rows`` / ``scatter_cols`` ``[R, K]`` (where each lands in the ``[N, T]`` completion layout; -1 on
        padding), ``completion_mask`` ``[N, T]`` (``T`` the longest completion), ``completion_lengths`` ``[N]``,
        and ``num_tokens`` (int, real tokens).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"Got {len(prompt_ids)} prompts for {len(completion_ids)} completions.")
    rows: list[list[int]] = []
    for index, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        length = len(prompt) + len(completion)
        if rows and (max_row_tokens is None or rows[-1][0] + length <= max_row_tokens):
            rows[-1][0] += length
            rows[-1].append(index)
        else:
            rows.append([length, index])
    width = max(row[0] for row in rows)
    completion_lengths = [len(c) for c in completion_ids]
    keep = max(max(sum(completion_lengths[i] for i in row[1:]) for row in rows), 1)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    logit_positions = torch.zeros((len(rows), keep), dtype=torch.long)
    targets = torch.zeros((len(rows), keep), dtype=torch.long)
    scatter_rows = torch.full((len(rows), keep), -1, dtype=torch.long)
    scatter_cols = torch.full((len(rows), keep), -1, dtype=torch.long)
    for r, (used, *members) in enumerate(rows):
        offset, kept = 0, 0
        for index in members:
            prompt, completion = prompt_ids[index], completion_ids[index]
            length, count = len(prompt) + len(completion), len(completion)
            input_ids[r, offset : offset + length] = torch.as_tensor(prompt + completion)
            position_ids[r, offset : offset + length] = torch.arange(length)
            # Position p predicts token p + 1: the completion's tokens are predicted from the prompt's last token on.
            start = offset + len(prompt) - 1
            logit_positions[r, kept : kept + count] = torch.arange(start, start + count)
            targets[r, kept : kept + count] = torch.as_tensor(completion, dtype=torch.long)
            scatter_rows[r, kept : kept + count] = index
            scatter_cols[r, kept : kept + count] = torch.arange(count)
            offset, kept = offset + length, kept + count
        position_ids[r, offset:] = torch.arange(width - offset)  # the padding tail is a sequence of its own
    longest = max(max(completion_lengths), 1)
    lengths = torch.tensor(completion_lengths)
    completion_mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()  # [N, T]
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "logit_positions": logit_positions,
        "targets": targets,
        "scatter_rows": scatter_rows,
        "scatter_cols": scatter_cols,
        "completion_mask": completion_mask,
        "completion_lengths": lengths,
        "num_tokens": sum(len(p) for p in prompt_ids) + sum(completion_lengths),
    }


def completion_logps(
    model: torch.nn.Module,
    batch: dict[str, Any],
    temperature: float = 1.0,
    chunk_size: int = 4096,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs ``[N, T]`` of the completion tokens of a ``pack_rollout`` batch (0 outside the mask),
    and their entropies (no gradient) when asked.

    One forward over the packed rows, without a KV cache (needed for ``position_ids`` restarts to separate the
    sequences), with the LM head applied only at ``logit_positions``. Logits are divided by ``temperature`` as the
    sampler did (TRL's convention), so the log-probs are those of the distribution the completions came from.
    """
    rows = batch["logit_positions"].size(0)
    logits = []
    for r in range(rows):  # logits_to_keep takes one 1-D index tensor, shared by the rows of a call
        output = model(
            input_ids=batch["input_ids"][r : r + 1],
            position_ids=batch["position_ids"][r : r + 1],
            use_cache=False,
            logits_to_keep=batch["logit_positions"][r],
        )
        logits.append(output.logits[0])  # [K, V]
    logits = torch.stack(logits) / temperature  # [R, K, V]
    token_logps = selective_log_softmax(logits, batch["targets"], chunk_size)  # [R, K]
    valid = batch["scatter_rows"] >= 0  # [R, K]
    mask = batch["completion_mask"]  # [N, T]
    rows_index, cols_index = batch["scatter_rows"][valid], batch["scatter_cols"][valid]  # [M], [M]
    logps = token_logps.new_zeros(mask.shape).index_put((rows_index, cols_index), token_logps[valid])  # [N, T]
    entropies = None
    if with_entropy:
        token_entropy = entropy_from_logits(logits.detach(), chunk_size)  # [R, K]
        entropies = token_entropy.new_zeros(mask.shape).index_put((rows_index, cols_index), token_entropy[valid])
    return logps, entropies
