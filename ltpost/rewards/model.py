"""A learned reward model (a ``RewardModule`` export) wrapped as a reward function."""

from __future__ import annotations

import os
from typing import Any

import torch

from ltpost.datamodules.preference import is_conversational, tokenize_pair, truncate_pair
from ltpost.models import Dtype, load_model, load_tokenizer
from ltpost.modules.reward import sequence_scores


class RewardModelScorer:
    """Score completions with a sequence classifier, e.g. the folder ``HFExport`` writes for a ``RewardModule``.

    A reward function like any other: ``scorer(prompts, completions, **columns) -> list[float]`` (other columns are
    ignored). Each prompt + completion is tokenized exactly as ``PreferenceDataModule`` tokenized the pairs the
    model was trained on (``tokenize_pair``): conversational prompts through the chat template (a string completion
    becomes one assistant message), plain text as prompt tokens + completion tokens + EOS. The score is read at each
    sequence's last token (``sequence_scores``) in right-padded batches of ``batch_size``, under
    ``torch.inference_mode``.

    Args:
        path: hub id, local path or built-in name of the classifier (loaded with ``num_labels=1``).
        batch_size: sequences per forward pass.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...).
        dtype: dtype the weights are loaded in.
        max_length: most tokens per sequence; a longer one loses the start of its prompt first (None: no limit).
        chat_template: a Jinja template (or ``.jinja`` path) replacing the tokenizer's.
        name: the name rewards are logged under; defaults to the folder's base name.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        dtype: Dtype = "float32",
        max_length: int | None = None,
        chat_template: str | None = None,
        name: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 token (or None for no limit), got {max_length}.")
        self.path = path
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.max_length = max_length
        self.model = load_model(path, task="sequence-classification", dtype=dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(path, chat_template=chat_template)
        self.__name__ = name or os.path.basename(os.path.normpath(path)).replace("ltpost:", "") or "reward_model"

    def token_ids(self, prompt: Any, completion: Any) -> list[int]:
        """The token ids of prompt + completion as the reward model was trained to read them."""
        conversational = is_conversational(prompt)
        if conversational:
            if not self.tokenizer.chat_template:
                raise ValueError(
                    f"The prompts are conversational but the tokenizer of {self.path!r} has no chat template; pass "
                    "chat_template=... to RewardModelScorer."
                )
            if isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
        elif not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError(
                "RewardModelScorer expects a conversational prompt (a list of messages) or a plain-text prompt with a "
                f"string completion; got a {type(prompt).__name__} prompt and a {type(completion).__name__} completion."
            )
        row = {"prompt": prompt, "chosen": completion, "rejected": completion}
        ids = tokenize_pair(row, tokenizer=self.tokenizer, conversational=conversational, explicit=True)
        prompt_ids, completion_ids = ids["prompt_ids"], ids["chosen_ids"]
        if self.max_length is not None:
            prompt_ids, completion_ids, _ = truncate_pair(
                prompt_ids, completion_ids, completion_ids, None, None, self.max_length
            )
        return list(prompt_ids) + list(completion_ids)

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__} got {len(prompts)} prompts for {len(completions)} completions.")
        sequences = [self.token_ids(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            batch = padded_batch(sequences[start : start + self.batch_size], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            scores.extend(sequence_scores(self.model, batch).tolist())  # host sync, once per batch
        return scores

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.path!r}, batch_size={self.batch_size}, device={str(self.device)!r})"


def padded_batch(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``position_ids`` ``[N, T]`` and ``sequence_ends`` ``[N]``
    (flat index of each sequence's last token), the keys ``sequence_scores`` reads; pure."""
    if any(len(ids) == 0 for ids in sequences):
        raise ValueError("Cannot score an empty sequence (no prompt and no completion tokens).")
    lengths = torch.tensor([len(ids) for ids in sequences])  # [N]
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [N, T]
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [N, T]
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    position_ids = (torch.arange(width)[None] * attention_mask).long()  # [N, T], 0 on padding
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "sequence_ends": torch.arange(len(sequences)) * width + lengths - 1,  # [N]
    }
