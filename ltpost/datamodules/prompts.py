"""PromptDataModule: prompts for online methods (GRPO, RLOO), tokenized once, served in generation rounds.

A row has a ``prompt`` column, a plain string or a conversational message list (TRL's prompt-only formats);
every other column (``answer``, ``solution``, test cases ...) rides along untouched and reaches the reward
functions as a keyword argument. Prompts are tokenized in ``setup()`` (the chat template with the generation
prompt for conversational rows) and checked against ``max_prompt_length``.

Training batches are *generation rounds*. An online module generates completions for ``prompts_per_step *
steps_per_generation`` prompts at once and trains on them for ``steps_per_generation * num_iterations``
micro-steps (one slice of ``prompts_per_step`` prompts per micro-step, the whole round ``num_iterations``
times). So the train loader yields each round's prompts that many times, tagged with ``round_step`` (0 for the
step that generates); ``steps_per_generation`` and ``num_iterations`` are read from the module. The loader is an
``IterableDataset`` that shards rounds across ranks itself, so every rank's round has whole prompt groups and
Lightning's distributed sampler (which would scatter the repeats) is not involved.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from ltpost.datamodules.data import load_split
from ltpost.datamodules.resumable import ResumableDataLoader
from ltpost.models import load_tokenizer

log = logging.getLogger(__name__)


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def tokenize_prompt(row: dict, *, tokenizer, prompt_column: str) -> dict[str, list[int]]:
    """``prompt_ids`` for one row: the chat template with the generation prompt, or the plain text's tokens."""
    prompt = row[prompt_column]
    if is_conversational(prompt):
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        return {"prompt_ids": list(ids["input_ids"])}
    if isinstance(prompt, str):
        return {"prompt_ids": tokenizer(prompt).input_ids}
    raise ValueError(
        f"A {prompt_column!r} value must be a string or a list of chat messages ({{'role', 'content'}} dicts); got "
        f"{type(prompt).__name__}: {prompt!r:.80}"
    )


def to_conversation(prompt: Any, system_prompt: str | None, as_chat: bool) -> Any:
    """The prompt to use: a string becomes a user turn when ``as_chat``; a conversation gets ``system_prompt`` as its
    first turn unless it already starts with a system turn."""
    if isinstance(prompt, str) and as_chat:
        prompt = [{"role": "user", "content": prompt}]
    if system_prompt is not None and is_conversational(prompt) and (not prompt or prompt[0]["role"] != "system"):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def collate_prompt_rows(rows: list[dict], prompt_column: str = "prompt") -> dict[str, Any]:
    """A batch of prompt rows as Python lists (pure): what an online module needs to generate and to reward.

    Returns:
        ``prompt_ids`` (token-id lists), ``prompts`` (the original prompts, for the reward functions),
        ``columns`` (every other dataset column, one list each) and ``example_index``.
    """
    skip = {"prompt_ids", prompt_column, "example_index"}
    return {
        "prompt_ids": [row["prompt_ids"] for row in rows],
        "prompts": [row[prompt_column] for row in rows],
        "columns": {key: [row[key] for row in rows] for key in rows[0] if key not in skip},
        "example_index": [row["example_index"] for row in rows],
    }


class GenerationRounds(IterableDataset):
    """Yields each generation round's prompts ``repeats`` times, tagged ``round_step`` 0 .. repeats-1.

    Every epoch shuffles the rows with ``seed + epoch`` (the same permutation on every rank), cuts them into rounds
    of ``round_size`` prompts per rank, and gives rank ``r`` of ``W`` the ``r``-th slice of each global round. A
    tail too small for a whole global round is left for the next epoch's shuffle.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        round_size: int,
        repeats: int,
        collate,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        epoch_fn=None,
    ) -> None:
        self.dataset = dataset
        self.round_size = round_size
        self.repeats = repeats
        self.collate = collate
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch_fn = epoch_fn or (lambda: 0)
        self.num_rounds = len(dataset) // (round_size * world_size)
        self._start = 0

    def __len__(self) -> int:
        return self.num_rounds * self.repeats

    def start_at(self, batches: int) -> None:
        """Begin the next epoch ``batches`` items in (a resumed run; ``ResumableDataLoader`` calls this)."""
        self._start = batches

    def __iter__(self):
        start, self._start = self._start, 0
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch_fn())
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
        else:
            order = list(range(len(self.dataset)))
        per_round = self.round_size * self.world_size
        for round_index in range(start // self.repeats, self.num_rounds):
            first = round_index * per_round + self.rank * self.round_size
            batch = self.collate(self.dataset.select(order[first : first + self.round_size]).to_list())
            for round_step in range(self.repeats):
                if round_index * self.repeats + round_step >= start:
                    yield {**batch, "round_step": round_step}


class PromptDataModule(LightningDataModule):
    """Prompts for online RL, with every other column passed through to the reward functions.

    Args:
        dataset: a built-in task (``ltpost:arithmetic-prompts``), a local file or folder (json, jsonl, parquet, csv,
            ``save_to_disk``), or a Hugging Face hub id.
        tokenizer: tokenizer name or path; defaults to the module's model.
        dataset_config: the hub dataset's configuration name, if it has several.
        train_split: split the prompts are drawn from.
        eval_split: split used for validation (generation and reward on held-out prompts); None for none.
        prompt_column: the column holding the prompt (string or message list).
        chat_template: a Jinja template (or a path to a ``.jinja`` file) replacing the tokenizer's.
        as_chat: turn plain-string prompts into a user turn, so a chat model sees its chat template (e.g. GSM8K's
            ``question`` column for an instruct model).
        system_prompt: a system turn put first in every conversational prompt that has none.
        max_prompt_length: longest prompt in tokens (None: no limit).
        long_prompts: what to do with prompts over ``max_prompt_length``: ``error`` (default; the message says
            how many and how long), ``drop`` them with a warning, or ``truncate`` them to their last
            ``max_prompt_length`` tokens (TRL's behaviour; the start of the prompt is lost).
        prompts_per_step: prompts per device per micro-step; each gets ``num_generations`` completions.
        eval_batch_size: prompts per device per validation step.
        shuffle: reshuffle the training prompts every epoch.
        seed: seed of the shuffle (plus the epoch number).
        max_train_samples: use only the first N training rows.
        max_eval_samples: use only the first N evaluation rows.
        dataset_num_proc: processes for tokenization.
    """

    def __init__(
        self,
        dataset: str = "ltpost:arithmetic-prompts",
        tokenizer: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        eval_split: str | None = "test",
        prompt_column: str = "prompt",
        chat_template: str | None = None,
        as_chat: bool = False,
        system_prompt: str | None = None,
        max_prompt_length: int | None = 512,
        long_prompts: Literal["error", "drop", "truncate"] = "error",
        prompts_per_step: int = 8,
        eval_batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        dataset_num_proc: int | None = None,
    ) -> None:
        super().__init__()
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}.")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}.")
        if max_prompt_length is not None and max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 token (or None for no limit), got {max_prompt_length}.")
        if long_prompts not in ("error", "drop", "truncate"):
            raise ValueError(f"long_prompts must be 'error', 'drop' or 'truncate', got {long_prompts!r}.")
        self.save_hyperparameters()
        self.dataset_name = dataset
        self.tokenizer_name = tokenizer
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.eval_split = eval_split
        self.prompt_column = prompt_column
        self.chat_template = chat_template
        self.as_chat = as_chat
        self.system_prompt = system_prompt
        self.max_prompt_length = max_prompt_length
        self.long_prompts = long_prompts
        self.prompts_per_step = prompts_per_step
        self.eval_batch_size = eval_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
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
        if stage in ("fit", "validate", "test", "predict") and self.eval_split and self.eval_dataset is None:
            self.eval_dataset = self._prepare(self.eval_split, self.max_eval_samples)

    def _tokenizer_source(self) -> str:
        if self.tokenizer_name is not None:
            return self.tokenizer_name
        module = self.trainer.lightning_module if self.trainer is not None else None
        name = getattr(module, "model_name", None)
        if name is None:
            raise ValueError(
                "PromptDataModule has no tokenizer: pass tokenizer=... or attach it to a trainer with a module."
            )
        return name

    def _prepare(self, split: str, max_rows: int | None) -> datasets.Dataset:
        raw = load_split(self.dataset_name, split, self.dataset_config, max_rows)
        if len(raw) == 0:
            raise ValueError(f"Split {split!r} of dataset {self.dataset_name!r} is empty: it has no prompts.")
        if self.prompt_column not in raw.column_names:
            hint = ""
            if "messages" in raw.column_names:
                hint = (
                    " The dataset has 'messages': map it to a 'prompt' column holding the turns before the answer, "
                    "e.g. dataset.map(lambda r: {'prompt': r['messages'][:-1]})."
                )
            raise ValueError(
                f"Dataset {self.dataset_name!r} ({split}) has no {self.prompt_column!r} column; its columns are "
                f"{raw.column_names}. Set prompt_column to the column holding the prompts.{hint}"
            )
        if self.as_chat or self.system_prompt is not None:
            column = self.prompt_column
            raw = raw.map(
                lambda row: {column: to_conversation(row[column], self.system_prompt, self.as_chat)},
                desc=f"Formatting {split} prompts",
            )
        if is_conversational(raw[0][self.prompt_column]) and not self.tokenizer.chat_template:
            raise ValueError(
                f"Dataset {self.dataset_name!r} has conversational prompts but the tokenizer has no chat template. "
                "Set data.init_args.chat_template to a Jinja template or a .jinja file."
            )
        for reserved in ("prompts", "completions", "completion_ids"):
            if reserved in raw.column_names:
                raise ValueError(
                    f"Column {reserved!r} would shadow an argument the reward functions receive; rename it "
                    f"(dataset.rename_column({reserved!r}, ...))."
                )
        tokenized = raw.map(
            tokenize_prompt,
            fn_kwargs=dict(tokenizer=self.tokenizer, prompt_column=self.prompt_column),
            num_proc=self.dataset_num_proc,
            desc=f"Tokenizing {split} prompts",
        )
        tokenized = self._check_lengths(tokenized, split)
        return tokenized.add_column("example_index", list(range(len(tokenized))))

    def _check_lengths(self, tokenized: datasets.Dataset, split: str) -> datasets.Dataset:
        limit = self.max_prompt_length
        if limit is None:
            return tokenized
        lengths = [len(ids) for ids in tokenized["prompt_ids"]]
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if not too_long:
            return tokenized
        summary = (
            f"{len(too_long)} of {len(lengths)} prompts of split {split!r} are longer than max_prompt_length={limit} "
            f"tokens (longest {max(lengths)}, e.g. row {too_long[0]})"
        )
        if self.long_prompts == "error":
            raise ValueError(
                f"{summary}. Raise max_prompt_length, or set long_prompts='drop' to skip them or 'truncate' to keep "
                "their last max_prompt_length tokens."
            )
        if self.long_prompts == "drop":
            if len(too_long) == len(lengths):
                raise ValueError(f"{summary}: dropping them leaves nothing. Raise max_prompt_length.")
            log.warning(f"{summary}; dropping them (long_prompts='drop').")
            keep = sorted(set(range(len(lengths))) - set(too_long))
            return tokenized.select(keep)
        log.warning(f"{summary}; keeping their last {limit} tokens (long_prompts='truncate').")
        return tokenized.map(lambda row: {"prompt_ids": row["prompt_ids"][-limit:]}, desc="Truncating prompts")

    # -- loaders -------------------------------------------------------------------------------------------------

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        return collate_prompt_rows(rows, self.prompt_column)

    def rounds(self, steps_per_generation: int = 1, num_iterations: int = 1) -> GenerationRounds:
        """The training rounds for this rank: ``prompts_per_step * steps_per_generation`` prompts each, repeated
        ``steps_per_generation * num_iterations`` times."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        round_size = self.prompts_per_step * steps_per_generation
        if len(self.train_dataset) < round_size * world:
            raise ValueError(
                f"The train split has {len(self.train_dataset)} prompts, fewer than one generation round: "
                f"prompts_per_step ({self.prompts_per_step}) x steps_per_generation ({steps_per_generation}) x devices "
                f"({world}) = {round_size * world}. Lower prompts_per_step or steps_per_generation, or add prompts."
            )
        return GenerationRounds(
            self.train_dataset,
            round_size=round_size,
            repeats=steps_per_generation * num_iterations,
            collate=self.collate,
            seed=self.seed,
            rank=rank,
            world_size=world,
            shuffle=self.shuffle,
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
        )

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        steps = getattr(module, "steps_per_generation", 1)
        iterations = getattr(module, "num_iterations", 1)
        # batch_size=None: each item of the iterable is already a whole batch (one round's prompts). The loader has
        # no workers, so Lightning's warning that __len__ may be wrong with several workers does not apply.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        return ResumableDataLoader(self.rounds(steps, iterations), batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        if self.eval_dataset is None:
            return []
        return DataLoader(self.eval_dataset, batch_size=self.eval_batch_size, collate_fn=self.collate)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
