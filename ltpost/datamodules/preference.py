"""PreferenceDataModule: (prompt, chosen, rejected) pairs for DPO and reward modeling, tokenized once in ``setup()``.

Dataset formats, as TRL users know them (detected from the columns and the first row):

- explicit prompt: ``prompt``, ``chosen`` and ``rejected``;
- implicit prompt: only ``chosen`` and ``rejected``, each holding the whole text or conversation; the prompt is
  their shared beginning (see ``extract_prompt``). A ``prompt`` column whose kind (text or conversation) differs
  from ``chosen``'s is ignored and the prompt is extracted, as TRL's ``maybe_extract_prompt`` does.

Each of them is either plain text (strings) or conversational (lists of ``{"role", "content"}`` messages, rendered
with the tokenizer's chat template). An optional ``margin`` column (a float per pair, for reward modeling) is
passed through; other columns are dropped.

Every tokenized row holds ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (the completions, EOS or end-of-turn
included) and, when the dataset has one, ``margin``. ``collate_preference`` turns rows into one concatenated batch
of 2B sequences, chosen first, so a single forward pass scores both sides of every pair.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

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


def is_conversational(value: Any) -> bool:
    """True when ``value`` is a list of chat messages (dicts with a ``role``), TRL's test."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def detect_format(columns: list[str], first_row: dict) -> tuple[bool, bool]:
    """``(conversational, explicit_prompt)`` implied by ``columns``, or a ``ValueError`` naming them and the fix."""
    if "chosen" in columns and "rejected" in columns:
        conversational = is_conversational(first_row["chosen"])
        explicit = "prompt" in columns and is_conversational(first_row["prompt"]) == conversational
        if "prompt" in columns and not explicit:
            log.info(
                "'prompt' and 'chosen' differ in kind (text vs messages): extracting the prompt from chosen/rejected."
            )
        return conversational, explicit
    if "chosen" in columns or "rejected" in columns:
        hint = " Preference data needs both a 'chosen' and a 'rejected' column."
    elif "messages" in columns or "completion" in columns or "text" in columns:
        hint = " This looks like supervised data: use SFTDataModule, or add 'chosen' and 'rejected' columns."
    else:
        hint = " Rename the columns before training (datasets' rename_column), e.g. 'response_a' -> 'chosen'."
    raise ValueError(
        f"Preference dataset columns {columns} match no known format. Expected 'prompt' + 'chosen' + 'rejected' "
        "(explicit prompt) or 'chosen' + 'rejected' sharing their beginning (implicit prompt), as plain text or "
        f"conversational message lists, with an optional 'margin'.{hint}"
    )


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """Split an implicit-prompt pair into ``(prompt, chosen, rejected)``: the prompt is their common beginning.

    TRL's ``extract_prompt`` rule: the prompt ends where ``chosen`` and ``rejected`` first differ (for
    conversations, at the first differing message); when one is a prefix of the other, it stops one element (message
    or character) before the shorter one ends, so each completion keeps something.

    Plain text only: the prompt then ends at the last whole word before the divergence, and the whitespace before
    the diverging word goes to the completions (``"What is 2 + 2?"`` / ``" 4"``). TRL moves one space the same way;
    here a divergence inside a word (``"is 42"`` / ``"is 43"``) also moves back to that word's start, because the
    prompt and completions are tokenized separately and a word cut in two tokenizes unlike the whole word. Text with
    no whitespace before the divergence keeps TRL's cut.
    """
    shortest = min(len(chosen), len(rejected))
    end = next((i for i in range(shortest) if chosen[i] != rejected[i]), max(shortest - 1, 0))
    if isinstance(chosen, str):
        cut = end
        while cut > 0 and not chosen[cut - 1].isspace():  # back to the start of the diverging word
            cut -= 1
        while cut > 0 and chosen[cut - 1].isspace():  # and before the whitespace that precedes it
            cut -= 1
        end = cut or end
    return chosen[:end], chosen[end:], rejected[end:]


def tokenize_pair(row: dict, *, tokenizer, conversational: bool, explicit: bool) -> dict[str, Any]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (and ``margin``) for one row; no truncation here.

    Plain text: the prompt with the tokenizer's special tokens, each completion without them plus EOS, all tokenized
    separately. Conversational: the prompt rendered with ``add_generation_prompt=True``; each completion is what the
    template adds after it when rendering prompt + completion (the assistant turn, end-of-turn included).
    """
    if explicit:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    out: dict[str, Any] = {}
    if conversational:
        if not chosen or not rejected:
            raise ValueError(
                "A conversational preference row has no message in 'chosen' or 'rejected' after the prompt. Each "
                "needs at least one assistant message; drop such rows before training."
            )
        render = {"tokenize": True, "return_dict": True}
        out["prompt_ids"] = list(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **render)["input_ids"]
        )
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            full = list(tokenizer.apply_chat_template(prompt + completion, **render)["input_ids"])
            if full[: len(out["prompt_ids"])] != out["prompt_ids"]:
                raise ValueError(
                    f"The chat template does not render the prompt (with add_generation_prompt=True) as a token prefix "
                    f"of prompt + {side}, so the completion tokens cannot be located. Use a template that emits the "
                    "generation prompt exactly as the start of the assistant turn (data.init_args.chat_template)."
                )
            out[f"{side}_ids"] = full[len(out["prompt_ids"]) :]
    else:
        eos = tokenizer.eos_token_id
        out["prompt_ids"] = tokenizer(prompt).input_ids
        out["chosen_ids"] = tokenizer(chosen, add_special_tokens=False).input_ids + [eos]
        out["rejected_ids"] = tokenizer(rejected, add_special_tokens=False).input_ids + [eos]
    if "margin" in row:
        if row["margin"] is None:
            raise ValueError("The 'margin' column has a missing value; fill it (e.g. 0.0) or remove the column.")
        out["margin"] = float(row["margin"])
    return out


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_prompt_length: int | None,
    max_completion_length: int | None,
    max_length: int | None,
) -> tuple[list[int], list[int], list[int]]:
    """Apply the three limits in order; pure.

    1. ``max_prompt_length``: the prompt keeps its last tokens (left truncation: the question and the generation
       prompt sit at its end).
    2. ``max_completion_length``: each completion keeps its first tokens.
    3. ``max_length`` bounds prompt + the longer completion. When a pair exceeds it, tokens are dropped from the
       prompt's start first (TRL's ``keep_end``), as many as needed and if need be the whole prompt; only when the
       longer completion alone exceeds ``max_length`` are the completions then cut to ``max_length - len(prompt)``
       tokens, keeping their start. Set ``max_completion_length`` to keep room for the prompt.
    """
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), max_prompt_length) :]
    if max_completion_length is not None:
        chosen_ids, rejected_ids = chosen_ids[:max_completion_length], rejected_ids[:max_completion_length]
    if max_length is not None:
        excess = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) - max_length
        if excess > 0:
            prompt_ids = prompt_ids[min(excess, len(prompt_ids)) :]
            budget = max_length - len(prompt_ids)
            chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    return prompt_ids, chosen_ids, rejected_ids


def collate_preference(
    examples: list[dict[str, Any]], pad_token_id: int, padding_free: bool = True, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor | int]:
    """Batch B pairs as 2B sequences ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]``; pure.

    Each sequence is prompt + completion. Padding-free: all of them concatenated into one row ``[1, N]`` with
    ``position_ids`` restarting at 0 per sequence and no attention mask (the model must run with
    ``use_cache=False`` so transformers builds the block-diagonal mask from the restarts). Padded: ``[2B, T]``,
    right-padded (``T`` rounded up to ``pad_to_multiple_of``), with an ``attention_mask``.

    Keys: ``input_ids``, ``position_ids``, ``shift_labels`` (the next token where it is a completion token, else
    -100; -100 at each sequence's last position), ``sequence_ids`` (0..2B-1 per position, -1 on padding),
    ``sequence_ends`` (``[2B]``, flat index into ``input_ids.view(-1)`` of each sequence's last token),
    ``attention_mask`` (padded only), ``num_pairs`` and ``num_tokens`` (ints, counted on the host: no device
    sync to log them), ``chosen_lengths`` and ``rejected_lengths`` (``[B]`` completion token counts), and
    ``margin`` (``[B]`` float) when the rows have one.
    """
    num_pairs = len(examples)
    sequences = [(ex["prompt_ids"], ex["chosen_ids"]) for ex in examples]
    sequences += [(ex["prompt_ids"], ex["rejected_ids"]) for ex in examples]
    rows_ids, rows_labels = [], []
    for prompt, completion in sequences:
        ids = torch.as_tensor(list(prompt) + list(completion), dtype=torch.long)  # [L]
        labels = ids.clone()  # [L]
        labels[: len(prompt)] = IGNORE_INDEX
        rows_ids.append(ids)
        rows_labels.append(torch.cat([labels[1:], torch.tensor([IGNORE_INDEX])]))  # [L], target of each position
    lengths = torch.tensor([len(ids) for ids in rows_ids])  # [2B]
    num_tokens = int(lengths.sum())
    if padding_free:
        batch: dict[str, Tensor | int] = {
            "input_ids": torch.cat(rows_ids)[None],  # [1, N]
            "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None],  # [1, N]
            "shift_labels": torch.cat(rows_labels)[None],  # [1, N]
            "sequence_ids": torch.repeat_interleave(torch.arange(2 * num_pairs), lengths)[None],  # [1, N]
            "sequence_ends": lengths.cumsum(0) - 1,  # [2B]
        }
    else:
        width = int(lengths.max())
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        shape = (2 * num_pairs, width)
        input_ids = torch.full(shape, pad_token_id, dtype=torch.long)  # [2B, T]
        position_ids = torch.zeros(shape, dtype=torch.long)  # [2B, T]
        shift_labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # [2B, T]
        sequence_ids = torch.full(shape, -1, dtype=torch.long)  # [2B, T]
        attention_mask = torch.zeros(shape, dtype=torch.long)  # [2B, T]
        for row, (ids, labels) in enumerate(zip(rows_ids, rows_labels)):
            input_ids[row, : len(ids)] = ids
            position_ids[row, : len(ids)] = torch.arange(len(ids))
            shift_labels[row, : len(ids)] = labels
            sequence_ids[row, : len(ids)] = row
            attention_mask[row, : len(ids)] = 1
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "shift_labels": shift_labels,
            "sequence_ids": sequence_ids,
            "sequence_ends": torch.arange(2 * num_pairs) * width + lengths - 1,  # [2B]
            "attention_mask": attention_mask,
        }
    batch["num_pairs"] = num_pairs
    batch["num_tokens"] = num_tokens
    if examples and "example_index" in examples[0]:
        batch["example_index"] = torch.tensor([ex["example_index"] for ex in examples], dtype=torch.long)  # [B]
    batch["chosen_lengths"] = torch.tensor([len(ex["chosen_ids"]) for ex in examples], dtype=torch.long)  # [B]
    batch["rejected_lengths"] = torch.tensor([len(ex["rejected_ids"]) for ex in examples], dtype=torch.long)  # [B]
    if examples and "margin" in examples[0]:
        batch["margin"] = torch.tensor([float(ex["margin"]) for ex in examples], dtype=torch.float)  # [B]
    return batch


class PreferenceDataModule(LightningDataModule):
    """Preference pairs for DPO and reward modeling: tokenized once in ``setup()``, batched padding-free by default.

    Each batch holds B pairs as 2B sequences, chosen then rejected (see ``collate_preference``), so one forward
    pass scores both sides.

    Args:
        dataset: a built-in task (``ltpost:arithmetic-preference``), a local file or folder (json, jsonl, parquet,
            csv, or a dataset saved with ``save_to_disk``), or a Hugging Face hub id. Columns: ``chosen`` and
            ``rejected``, with ``prompt`` for an explicit prompt, plain text or conversational; optional ``margin``.
        tokenizer: tokenizer name or path; defaults to the module's model.
        dataset_config: the hub dataset's configuration name, if it has several.
        train_split: split used for training.
        eval_split: split used for validation and test; None for no validation.
        chat_template: a Jinja template (or a path to a ``.jinja`` file) replacing the tokenizer's.
        max_prompt_length: most prompt tokens kept; a longer prompt keeps its end (None: no limit).
        max_completion_length: most tokens kept of each completion; a longer one keeps its start (None: no limit).
        max_length: most tokens of prompt + the longer completion. A longer pair loses tokens from the start of its
            prompt first (the whole prompt if need be), then its completions are cut to fit, keeping their start
            (None: no limit). Applied after the two limits above.
        padding_free: concatenate each batch into one row with per-sequence ``position_ids`` instead of padding.
            The model must run without a KV cache (``use_cache=False``) so transformers builds the block-diagonal
            mask from ``position_ids``.
        batch_size: preference pairs per device per step (each step runs 2 * batch_size sequences).
        eval_batch_size: pairs per device per validation step; defaults to ``batch_size``.
        pad_to_multiple_of: round padded widths up to a multiple (padded batches only).
        max_train_samples: use only the first N training pairs (debugging, quick runs).
        max_eval_samples: use only the first N evaluation pairs.
        num_workers: DataLoader worker processes.
        seed: seed of the train shuffle (each epoch's order is a permutation seeded by ``seed + epoch``, so a
            resumed run sees the same order); None: the run's seed (``seed_everything``).
        dataset_num_proc: processes for tokenization.
    """

    def __init__(
        self,
        dataset: str = "ltpost:arithmetic-preference",
        tokenizer: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        eval_split: str | None = "test",
        chat_template: str | None = None,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        max_length: int | None = 1024,
        padding_free: bool = True,
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
            raise ValueError(f"batch_size must be >= 1 (pairs per device), got {batch_size}.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens (or None for no limit), got {max_length}.")
        for name, value in (("max_prompt_length", max_prompt_length), ("max_completion_length", max_completion_length)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 token (or None for no limit), got {value}.")
        self.save_hyperparameters()
        self.seed = seed
        self.dataset_name = dataset
        self.tokenizer_name = tokenizer
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.eval_split = eval_split
        self.chat_template = chat_template
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length
        self.max_length = max_length
        self.padding_free = padding_free
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

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self._tokenizer_source(), chat_template=self.chat_template)
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = self._prepare(self.train_split, self.max_train_samples)
        if stage in ("fit", "validate", "test") and self.eval_split and self.eval_dataset is None:
            self.eval_dataset = self._prepare(self.eval_split, self.max_eval_samples)

    def _tokenizer_source(self) -> str:
        if self.tokenizer_name is not None:
            return self.tokenizer_name
        module = self.trainer.lightning_module if self.trainer is not None else None
        name = getattr(module, "model_name", None)
        if name is None:
            raise ValueError(
                "PreferenceDataModule has no tokenizer: pass tokenizer=... or attach it to a trainer with a module."
            )
        return name

    def _prepare(self, split: str, max_rows: int | None) -> datasets.Dataset:
        raw = load_split(self.dataset_name, split, self.dataset_config, max_rows)
        if len(raw) == 0:
            raise ValueError(
                f"Split {split!r} of dataset {self.dataset_name!r} is empty: it has no rows to train on. Check the "
                "dataset path, the split name (train_split / eval_split) and max_train_samples / max_eval_samples."
            )
        conversational, explicit = detect_format(raw.column_names, raw[0])
        if conversational and not self.tokenizer.chat_template:
            raise ValueError(
                f"Dataset {self.dataset_name!r} is conversational but the tokenizer has no chat template. Set "
                "data.init_args.chat_template to a Jinja template or a .jinja file, or use a tokenizer that has one."
            )
        tokenized = raw.map(
            tokenize_pair,
            fn_kwargs={"tokenizer": self.tokenizer, "conversational": conversational, "explicit": explicit},
            remove_columns=raw.column_names,
            num_proc=self.dataset_num_proc,
            desc=f"Tokenizing {split}",
        )
        return self._truncate_and_filter(tokenized, split)

    def _truncate_and_filter(self, tokenized: datasets.Dataset, split: str) -> datasets.Dataset:
        limits = (self.max_prompt_length, self.max_completion_length, self.max_length)
        prompt_lengths = [len(p) for p in tokenized["prompt_ids"]]
        before = [n + max(len(c), len(r)) for n, (_, c, r) in zip(prompt_lengths, _columns(tokenized))]
        if any(limit is not None for limit in limits):
            tokenized = tokenized.map(_truncate_row, fn_kwargs={"limits": limits}, desc=f"Truncating {split}")
        rows = list(_columns(tokenized))
        truncated = sum(len(p) + max(len(c), len(r)) < n for (p, c, r), n in zip(rows, before))
        if truncated:
            lost_prompt = sum(n > 0 and not p for (p, _, _), n in zip(rows, prompt_lengths))
            log.warning(
                f"{truncated} of {len(rows)} pairs of split {split!r} are truncated (longest before truncation "
                f"{max(before)} tokens, median {int(statistics.median(before))}; max_prompt_length="
                f"{self.max_prompt_length}, max_completion_length={self.max_completion_length}, max_length="
                f"{self.max_length})."
                + (
                    f" {lost_prompt} lost their whole prompt: set max_completion_length to keep room for it."
                    if lost_prompt
                    else ""
                )
            )
        # A completion token carries loss only when a token precedes it in its sequence (an empty prompt leaves the
        # completion's first token unpredicted); a pair needs such a token on both sides.
        keep = [i for i, (p, c, r) in enumerate(rows) if min(len(c), len(r)) > (0 if p else 1)]
        if not keep:
            raise ValueError(
                f"No pair of split {split!r} keeps a completion token that carries loss after truncation "
                f"(max_prompt_length={self.max_prompt_length}, max_completion_length={self.max_completion_length}, "
                f"max_length={self.max_length}; prompts as short as {min(len(p) for p, _, _ in rows)} tokens). "
                "Raise max_completion_length / max_length, or give the pairs a non-empty prompt."
            )
        if len(keep) < len(rows):
            log.warning(
                f"Dropped {len(rows) - len(keep)} pairs of split {split!r} with no loss token left after truncation."
            )
        distinct = [i for i in keep if rows[i][1] != rows[i][2]]
        if not distinct:
            raise ValueError(
                f"In every pair of split {split!r} the chosen and rejected tokens are identical (after truncation), "
                "so there is no preference to learn. Check that 'chosen' and 'rejected' are different columns, and "
                "if the completions differ only past the limit, raise max_completion_length / max_length."
            )
        if len(distinct) < len(keep):
            log.warning(
                f"Dropped {len(keep) - len(distinct)} of {len(rows)} pairs of split {split!r} whose chosen and "
                "rejected are identical (after truncation): they carry no preference signal."
            )
        kept = tokenized if len(distinct) == len(tokenized) else tokenized.select(distinct)
        # Row positions after filtering: ReferenceModel(mode="precompute") stores reference log-probs by this index.
        return kept.add_column("example_index", list(range(len(kept))))

    # -- loaders -------------------------------------------------------------------------------------------------

    def collate(self, examples: list[dict]) -> dict:
        return collate_preference(examples, self.tokenizer.pad_token_id, self.padding_free, self.pad_to_multiple_of)

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


def _columns(tokenized: datasets.Dataset):
    """``(prompt_ids, chosen_ids, rejected_ids)`` per row (reads the three columns once)."""
    return zip(tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"])


def _truncate_row(row: dict, limits: tuple[int | None, int | None, int | None]) -> dict[str, list[int]]:
    prompt, chosen, rejected = truncate_pair(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], *limits)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
