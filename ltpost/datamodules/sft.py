"""SFTDataModule: tokenizes once in ``setup()``, then batches padding-free (default) or padded.

Dataset formats, as TRL users know them (detected from the columns):

- language modeling: a text column (``dataset_text_field``, default ``text``);
- prompt-completion: ``prompt`` and ``completion``, plain strings or conversational message lists;
- conversational: ``messages`` (a list of ``{"role", "content"}``);
- pre-tokenized: ``input_ids``, with an optional ``completion_mask`` or ``assistant_masks``.

Every tokenized row is ``input_ids`` plus a ``completion_mask`` (1 on the tokens that carry loss) and
``seq_lengths`` (the lengths of the sequences inside the row: one, or several after packing).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any, Literal

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader

from ltpost.datamodules.data import load_split
from ltpost.datamodules.resumable import ResumableDataLoader, ResumableSampler, data_parallel_rank, default_seed
from ltpost.losses.sft import IGNORE_INDEX
from ltpost.models import load_tokenizer

log = logging.getLogger(__name__)

FORMATS = ("text", "prompt-completion", "conversational-prompt-completion", "messages", "tokenized")


def detect_format(columns: list[str], first_row: dict, text_field: str) -> str:
    """The dataset format implied by ``columns``; a ``ValueError`` naming the columns and the fix otherwise."""
    if "input_ids" in columns:
        return "tokenized"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "conversational-prompt-completion" if isinstance(first_row["prompt"], list) else "prompt-completion"
    if text_field in columns:
        return "text"
    hint = ""
    if "prompt" in columns or "completion" in columns:
        hint = " Prompt-completion data needs both a 'prompt' and a 'completion' column."
    elif "conversations" in columns or "chat" in columns:
        hint = " Rename the conversation column to 'messages' (dataset.rename_column)."
    else:
        hint = f" For plain text in another column, set dataset_text_field (now {text_field!r})."
    raise ValueError(
        f"SFT dataset columns {columns} match no known format. Expected one of: {text_field!r} (plain text), "
        f"'messages' (conversational), 'prompt' + 'completion', or 'input_ids' (pre-tokenized).{hint}"
    )


def tokenize_row(
    row: dict,
    *,
    tokenizer,
    data_format: str,
    text_field: str,
    completion_only_loss: bool,
    assistant_only_loss: bool,
) -> dict[str, list[int]]:
    """``input_ids`` and ``completion_mask`` for one row (no truncation here: it is applied afterwards)."""
    eos = tokenizer.eos_token_id
    if data_format == "text":
        ids = tokenizer(row[text_field]).input_ids
        ids = ids if ids and ids[-1] == eos else ids + [eos]
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}
    if data_format == "prompt-completion":
        prompt = tokenizer(row["prompt"]).input_ids
        completion = tokenizer(row["completion"], add_special_tokens=False).input_ids + [eos]
        mask = [0 if completion_only_loss else 1] * len(prompt) + [1] * len(completion)
        return {"input_ids": prompt + completion, "completion_mask": mask}
    if data_format == "conversational-prompt-completion":
        prompt = tokenizer.apply_chat_template(
            row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
        )
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
        prompt_ids, ids = prompt["input_ids"], full["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "The chat template does not render the prompt as a token prefix of prompt + completion, so the "
                "completion tokens cannot be located. Use a template that emits the generation prompt exactly "
                "as the start of the assistant turn, or convert the data to 'messages' with assistant_only_loss."
            )
        mask = [0 if completion_only_loss else 1] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
        return {"input_ids": ids, "completion_mask": mask}
    if data_format == "messages":
        full = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only_loss
        )
        ids = full["input_ids"]
        mask = full["assistant_masks"] if assistant_only_loss else [1] * len(ids)
        return {"input_ids": ids, "completion_mask": list(mask)}
    ids = list(row["input_ids"])  # tokenized
    mask = row.get("completion_mask") or row.get("assistant_masks") or [1] * len(ids)
    return {"input_ids": ids, "completion_mask": list(mask)}


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of sequences grouped into bins of at most ``capacity`` tokens, best-fit decreasing.

    Each sequence goes, longest first, into the open bin it fills most tightly; near-optimal packing in
    ``O(n * bins)``, which is fine at the scale of a fine-tuning dataset (it runs once, in ``setup()``).
    """
    bins: list[list[int]] = []
    space: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        best, best_space = -1, capacity + 1
        for b, left in enumerate(space):
            if lengths[index] <= left < best_space:
                best, best_space = b, left
        if best < 0:
            bins.append([index])
            space.append(capacity - lengths[index])
        else:
            bins[best].append(index)
            space[best] -= lengths[index]
    return bins


def collate_sft(
    examples: list[dict[str, Any]], pad_token_id: int, padding_free: bool = True, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor | int]:
    """Batch tokenized rows; pure (no tokenizer, no module state).

    Padding-free: every sequence of the batch is concatenated into one row ``[1, N]`` and ``position_ids``
    restart at 0 for each sequence, with no attention mask; transformers derives the block-diagonal causal mask
    from the restarts. Padded: rows are right-padded to the longest (optionally to a multiple) with an
    ``attention_mask``. Either way ``shift_labels[t]`` is the target of position ``t``: the next token where it
    carries loss, ``-100`` elsewhere (including the last position of each sequence, so no sequence predicts
    the first token of the next one).

    ``num_tokens`` and ``num_loss_tokens`` are Python ints, counted here on the host so the training step can
    log them without a device sync.
    """
    rows_ids, rows_pos, rows_labels = [], [], []
    for example in examples:
        ids = torch.as_tensor(example["input_ids"], dtype=torch.long)  # [L]
        mask = torch.as_tensor(example["completion_mask"], dtype=torch.bool)  # [L]
        labels = torch.where(mask, ids, IGNORE_INDEX)  # [L]
        positions, shifted, start = [], [], 0
        for length in example.get("seq_lengths") or [len(ids)]:
            positions.append(torch.arange(length))
            shifted.append(torch.cat([labels[start + 1 : start + length], torch.tensor([IGNORE_INDEX])]))
            start += length
        rows_ids.append(ids)
        rows_pos.append(torch.cat(positions))
        rows_labels.append(torch.cat(shifted))
    num_tokens = sum(len(r) for r in rows_ids)
    if padding_free:
        batch = {
            "input_ids": torch.cat(rows_ids)[None],  # [1, N]
            "position_ids": torch.cat(rows_pos)[None],  # [1, N]
            "shift_labels": torch.cat(rows_labels)[None],  # [1, N]
        }
    else:
        width = max(len(r) for r in rows_ids)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = torch.full((len(rows_ids), width), pad_token_id, dtype=torch.long)  # [B, T]
        position_ids = torch.zeros((len(rows_ids), width), dtype=torch.long)  # [B, T]
        shift_labels = torch.full((len(rows_ids), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(rows_ids), width), dtype=torch.long)  # [B, T]
        for row, (ids, pos, labels) in enumerate(zip(rows_ids, rows_pos, rows_labels)):
            input_ids[row, : len(ids)] = ids
            position_ids[row, : len(ids)] = pos
            shift_labels[row, : len(ids)] = labels
            attention_mask[row, : len(ids)] = 1
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "shift_labels": shift_labels,
            "attention_mask": attention_mask,
        }
    batch["num_tokens"] = num_tokens
    batch["num_loss_tokens"] = int((batch["shift_labels"] != IGNORE_INDEX).sum())
    return batch


class SFTDataModule(LightningDataModule):
    """Supervised fine-tuning data: tokenized once in ``setup()``, batched padding-free by default.

    Args:
        dataset: a built-in task (``ltpost:arithmetic``), a local file or folder (json, jsonl, parquet, csv, or a
            dataset saved with ``save_to_disk``), or a Hugging Face hub id.
        tokenizer: tokenizer name or path; defaults to the module's model.
        dataset_config: the hub dataset's configuration name, if it has several.
        train_split: split used for training.
        eval_split: split used for validation and prediction prompts; None for no validation.
        dataset_text_field: column holding plain text for language-modeling data.
        chat_template: a Jinja template (or a path to a ``.jinja`` file) replacing the tokenizer's.
        max_length: longest row in tokens; longer rows are truncated at the end (None: no limit).
        completion_only_loss: compute the loss on completion tokens only (prompt-completion data). None means
            on for prompt-completion data.
        assistant_only_loss: compute the loss on assistant tokens only (conversational ``messages`` data); needs a
            chat template that marks assistant turns with ``{% generation %}``.
        padding_free: concatenate each batch into one row with per-sequence ``position_ids`` instead of padding.
            The model must run without a KV cache (``SFTModule`` does) so transformers builds the block-diagonal
            mask from ``position_ids``; verified equal to padded logits with sdpa and eager.
        packing: pack rows into bins of ``max_length`` tokens before batching.
        packing_strategy: ``bfd`` (best-fit decreasing, sequences kept whole, needs ``padding_free``) or
            ``wrapped`` (the corpus cut into ``max_length`` blocks across document boundaries, for pre-training
            style corpora).
        batch_size: rows (or packed bins) per device per step.
        eval_batch_size: rows per device per validation step; defaults to ``batch_size``.
        pad_to_multiple_of: round padded widths up to a multiple (tensor cores like multiples of 8).
        max_train_samples: use only the first N training rows (debugging, quick runs).
        max_eval_samples: use only the first N evaluation rows.
        num_workers: DataLoader worker processes.
        seed: seed of the train shuffle (each epoch's order is a permutation seeded by ``seed + epoch``, so a
            resumed run sees the same order); None: the run's seed (``seed_everything``).
        dataset_num_proc: processes for tokenization.
    """

    def __init__(
        self,
        dataset: str = "ltpost:arithmetic",
        tokenizer: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        eval_split: str | None = "test",
        dataset_text_field: str = "text",
        chat_template: str | None = None,
        max_length: int | None = 1024,
        completion_only_loss: bool | None = None,
        assistant_only_loss: bool = False,
        padding_free: bool = True,
        packing: bool = False,
        packing_strategy: Literal["bfd", "wrapped"] = "bfd",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        num_workers: int = 0,
        dataset_num_proc: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens (or None for no limit), got {max_length}.")
        if packing and max_length is None:
            raise ValueError("packing needs max_length: it is the size of each packed bin. Set max_length.")
        if packing and packing_strategy == "bfd" and not padding_free:
            raise ValueError(
                "packing_strategy='bfd' keeps sequences apart through per-sequence position_ids, which needs "
                "padding_free=True. Set padding_free=True, or use packing_strategy='wrapped'."
            )
        self.save_hyperparameters()
        self.seed = seed
        self.dataset_name = dataset
        self.tokenizer_name = tokenizer
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.eval_split = eval_split
        self.dataset_text_field = dataset_text_field
        self.chat_template = chat_template
        self.max_length = max_length
        self.completion_only_loss = completion_only_loss
        self.assistant_only_loss = assistant_only_loss
        self.padding_free = padding_free
        self.packing = packing
        self.packing_strategy = packing_strategy
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.num_workers = num_workers
        self.dataset_num_proc = dataset_num_proc
        self.tokenizer = None
        self.train_dataset: datasets.Dataset | None = None
        self.eval_dataset: datasets.Dataset | None = None
        self.eval_raw: datasets.Dataset | None = None

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self._tokenizer_source(), chat_template=self.chat_template)
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = self._prepare(self.train_split, self.max_train_samples, pack=self.packing)
        if stage in ("fit", "validate", "test", "predict") and self.eval_split and self.eval_dataset is None:
            self.eval_raw = load_split(self.dataset_name, self.eval_split, self.dataset_config, self.max_eval_samples)
            self.eval_dataset = self._prepare(self.eval_split, self.max_eval_samples, pack=False, raw=self.eval_raw)

    def _tokenizer_source(self) -> str:
        if self.tokenizer_name is not None:
            return self.tokenizer_name
        module = self.trainer.lightning_module if self.trainer is not None else None
        name = getattr(module, "model_name", None)
        if name is None:
            raise ValueError(
                "SFTDataModule has no tokenizer: pass tokenizer=... or attach it to a trainer with a module."
            )
        return name

    def _prepare(self, split: str, max_rows: int | None, pack: bool, raw: datasets.Dataset | None = None):
        raw = load_split(self.dataset_name, split, self.dataset_config, max_rows) if raw is None else raw
        if len(raw) == 0:
            raise ValueError(f"Split {split!r} of dataset {self.dataset_name!r} is empty: it has no rows to train on.")
        data_format = detect_format(raw.column_names, raw[0], self.dataset_text_field)
        if data_format in ("messages", "conversational-prompt-completion") and not self.tokenizer.chat_template:
            raise ValueError(
                f"Dataset {self.dataset_name!r} is conversational but the tokenizer has no chat template. Set "
                "data.init_args.chat_template to a Jinja template or a .jinja file, or use a tokenizer that has one."
            )
        if self.assistant_only_loss and data_format != "messages":
            raise ValueError(
                f"assistant_only_loss applies to conversational 'messages' data; this dataset is {data_format}."
            )
        completion_only = self.completion_only_loss is not False and "prompt-completion" in data_format
        tokenized = raw.map(
            tokenize_row,
            fn_kwargs=dict(
                tokenizer=self.tokenizer,
                data_format=data_format,
                text_field=self.dataset_text_field,
                completion_only_loss=completion_only,
                assistant_only_loss=self.assistant_only_loss,
            ),
            remove_columns=raw.column_names,
            num_proc=self.dataset_num_proc,
            desc=f"Tokenizing {split}",
        )
        if self.assistant_only_loss and not any(any(m) for m in tokenized["completion_mask"][:1000]):
            raise ValueError(
                "assistant_only_loss found no assistant tokens: the chat template does not mark assistant turns with "
                "{% generation %} ... {% endgeneration %}. Use such a template (data.init_args.chat_template)."
            )
        if pack and self.packing_strategy == "wrapped":
            return self._wrap(tokenized)
        tokenized = self._truncate(tokenized, split)
        if pack:
            return self._pack_bfd(tokenized)
        return tokenized.add_column("seq_lengths", [[n] for n in tokenized["length"]]).remove_columns("length")

    def _truncate(self, tokenized: datasets.Dataset, split: str) -> datasets.Dataset:
        lengths = [len(ids) for ids in tokenized["input_ids"]]
        limit = self.max_length
        if limit is not None:
            # Where the loss starts in each row: for prompt-completion data, the prompt's length.
            loss_starts = [
                next((i for i, m in enumerate(mask) if m), len(mask)) for mask in tokenized["completion_mask"]
            ]
            if all(start >= limit for start in loss_starts):
                raise ValueError(
                    f"No row of split {split!r} keeps a loss token after truncation to max_length={limit}: the prompts "
                    f"fill the whole length (shortest prompt {min(loss_starts)} tokens). Raise max_length or shorten "
                    "the prompts."
                )
            too_long = sum(n > limit for n in lengths)
            if too_long == len(lengths):
                raise ValueError(
                    f"Every one of the {len(lengths)} rows of split {split!r} is longer than max_length={limit} "
                    f"tokens (shortest {min(lengths)}, median {int(statistics.median(lengths))}). Raise max_length, "
                    "or, for long documents, use packing=True with packing_strategy='wrapped'."
                )
            if too_long:
                log.warning(
                    f"{too_long} of {len(lengths)} rows of split {split!r} are longer than max_length={limit} and are truncated."
                )
            tokenized = tokenized.map(
                lambda row: {"input_ids": row["input_ids"][:limit], "completion_mask": row["completion_mask"][:limit]},
                desc="Truncating",
            )
        # A row whose loss tokens were all cut off (prompt longer than max_length) teaches nothing.
        keep = [i for i, mask in enumerate(tokenized["completion_mask"]) if any(mask[1:])]
        if not keep:
            raise ValueError(f"No row of split {split!r} has a loss token (check completion_mask / the chat template).")
        if len(keep) < len(tokenized):
            log.warning(
                f"Dropped {len(tokenized) - len(keep)} rows of split {split!r} with no loss token after truncation."
            )
            tokenized = tokenized.select(keep)
        return tokenized.add_column("length", [len(ids) for ids in tokenized["input_ids"]])

    def _pack_bfd(self, tokenized: datasets.Dataset) -> datasets.Dataset:
        lengths = tokenized["length"]
        ids, masks = tokenized["input_ids"], tokenized["completion_mask"]
        rows = []
        for members in pack_best_fit_decreasing(lengths, self.max_length):
            rows.append(
                {
                    "input_ids": [t for i in members for t in ids[i]],
                    "completion_mask": [m for i in members for m in masks[i]],
                    "seq_lengths": [lengths[i] for i in members],
                }
            )
        log.info(
            f"Packed {len(tokenized)} rows into {len(rows)} bins of <= {self.max_length} tokens (best-fit decreasing)."
        )
        return datasets.Dataset.from_list(rows)

    def _wrap(self, tokenized: datasets.Dataset) -> datasets.Dataset:
        ids = [t for row in tokenized["input_ids"] for t in row]
        masks = [m for row in tokenized["completion_mask"] for m in row]
        size = self.max_length
        rows = [
            {
                "input_ids": ids[s : s + size],
                "completion_mask": masks[s : s + size],
                "seq_lengths": [len(ids[s : s + size])],
            }
            for s in range(0, len(ids), size)
            if len(ids[s : s + size]) > 1
        ]
        log.info(f"Wrapped {len(tokenized)} rows ({len(ids)} tokens) into {len(rows)} blocks of {size} tokens.")
        return datasets.Dataset.from_list(rows)

    # -- loaders -------------------------------------------------------------------------------------------------

    def collate(self, examples: list[dict]) -> dict:
        return collate_sft(examples, self.tokenizer.pad_token_id, self.padding_free, self.pad_to_multiple_of)

    def train_dataloader(self) -> DataLoader:
        # Resumable mid-epoch (ltpost.datamodules.resumable); the sampler already shards over data-parallel ranks.
        replicas, rank = data_parallel_rank(self.trainer)
        sampler = ResumableSampler(self.train_dataset, replicas, rank, shuffle=True, seed=default_seed(self.seed))
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.eval_dataset is None:
            return []
        return DataLoader(
            self.eval_dataset, batch_size=self.eval_batch_size, collate_fn=self.collate, num_workers=self.num_workers
        )

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Prompts of the evaluation split, left-padded for generation (conversational or prompt-completion)."""
        if self.eval_raw is None:
            raise ValueError("predict needs an eval_split holding prompts; set data.init_args.eval_split.")
        data_format = detect_format(self.eval_raw.column_names, self.eval_raw[0], self.dataset_text_field)
        if data_format in ("text", "tokenized"):
            raise ValueError(
                f"predict needs prompts, but this dataset is {data_format}; use a prompt-completion or messages dataset."
            )
        prompts = []
        for row in self.eval_raw:
            if data_format == "prompt-completion":
                prompts.append(self.tokenizer(row["prompt"]).input_ids)
            else:
                messages = row["prompt"] if data_format.startswith("conversational") else _prompt_turns(row["messages"])
                prompts.append(
                    self.tokenizer.apply_chat_template(
                        messages, tokenize=True, add_generation_prompt=True, return_dict=True
                    )["input_ids"]
                )
        pad = self.tokenizer.pad_token_id
        return DataLoader(prompts, batch_size=self.eval_batch_size, collate_fn=lambda rows: collate_prompts(rows, pad))


def _prompt_turns(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its last assistant turn."""
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return messages[: assistant_turns[-1]] if assistant_turns else messages


def collate_prompts(prompts: list[list[int]], pad_token_id: int) -> dict[str, Tensor]:
    """Left-pad prompt ids for batched generation: ``input_ids`` and ``attention_mask``, both ``[B, P]``."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
