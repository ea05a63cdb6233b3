"""PromptDataModule and GenerationRounds: prompt tokenization, pass-through columns, length limits, generation rounds
(repeats, sharding, epochs) and input errors.

Everything runs offline on the embedded tokenizer (``ltpost:tiny-llama``, ChatML template), the built-in
``ltpost:arithmetic-prompts`` task (conversational ``prompt`` plus ``answer``) and small jsonl files written to
``tmp_path``. Datamodules are set up directly with ``setup("fit")``; no trainer is needed (``dm.trainer`` is None).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest

from ltpost.assets import make_rows
from ltpost.datamodules.prompts import GenerationRounds, PromptDataModule, collate_prompt_rows

HEADER = "<|im_start|>assistant\n"  # the generation prompt of the embedded chat template


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    """Local json files are converted to Arrow under HF_DATASETS_CACHE; keep that inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def setup_dm(dataset="ltpost:arithmetic-prompts", **kwargs) -> PromptDataModule:
    kwargs.setdefault("tokenizer", "ltpost:tiny-llama")
    dm = PromptDataModule(dataset, **kwargs)
    dm.setup("fit")
    return dm


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def chat_ids(tokenizer, prompt) -> list[int]:
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def items(dataset) -> list[dict]:
    return list(iter(dataset))


# -- tokenization and columns --------------------------------------------------------------------------------------


def test_conversational_prompts_use_the_chat_template_with_generation_prompt(tokenizer):
    """Each row's prompt_ids are apply_chat_template(prompt, add_generation_prompt=True) (so they end with the
    assistant header); the answer column is kept; example_index is the row number; the eval split is prepared too."""
    dm = setup_dm(max_train_samples=12, max_eval_samples=5)
    rows = make_rows("arithmetic-prompts", "train", num_rows=12)
    assert len(dm.train_dataset) == 12 and len(dm.eval_dataset) == 5
    assert set(dm.train_dataset.column_names) == {"prompt", "answer", "prompt_ids", "example_index"}
    for tokenized, source in zip(dm.train_dataset, rows):
        assert tokenized["prompt_ids"] == chat_ids(tokenizer, source["prompt"])
        assert tokenizer.decode(tokenized["prompt_ids"]).endswith(f"{source['prompt'][0]['content']}<|im_end|>{HEADER}")
        assert tokenized["prompt"] == source["prompt"] and tokenized["answer"] == source["answer"]
    assert dm.train_dataset["example_index"] == list(range(12))
    test_rows = make_rows("arithmetic-prompts", "test", num_rows=5)
    assert dm.eval_dataset["prompt_ids"] == [chat_ids(tokenizer, r["prompt"]) for r in test_rows]


def test_round_batches_carry_prompts_columns_and_example_index():
    """A training batch holds the prompt ids, the original (conversational) prompts for the reward functions, every
    other column under 'columns' (here answer), example_index, and round_step; all aligned row by row."""
    dm = setup_dm(max_train_samples=8, eval_split=None, prompts_per_step=4)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt_ids", "prompts", "columns", "example_index", "round_step"}
    assert batch["round_step"] == 0
    assert set(batch["columns"]) == {"answer"}
    assert len(batch["prompt_ids"]) == len(batch["prompts"]) == len(batch["columns"]["answer"]) == 4
    for i, index in enumerate(batch["example_index"]):
        row = dm.train_dataset[index]
        assert batch["prompt_ids"][i] == row["prompt_ids"]
        assert batch["prompts"][i] == row["prompt"] and isinstance(row["prompt"], list)
        assert batch["columns"]["answer"][i] == row["answer"]


def test_plain_string_prompts_are_tokenized_as_text_and_columns_pass_through(tmp_path, tokenizer):
    """String prompts are tokenized as text (no chat template); the extra columns answer and source reach the batch
    untouched (with their types), under a custom prompt_column name too."""
    rows = [{"question": f"{a} + {a} =", "answer": 2 * a, "source": f"s{a}"} for a in range(6)]
    dm = setup_dm(
        write_jsonl(tmp_path / "p.jsonl", rows), eval_split=None, prompt_column="question", prompts_per_step=6
    )
    assert [r["prompt_ids"] for r in dm.train_dataset] == [tokenizer(r["question"]).input_ids for r in rows]
    assert "<|im_start|>" not in tokenizer.decode(dm.train_dataset[0]["prompt_ids"])
    batch = next(iter(dm.rounds()))
    assert set(batch["columns"]) == {"answer", "source"}
    by_index = {i: rows[i] for i in batch["example_index"]}
    assert batch["prompts"] == [by_index[i]["question"] for i in batch["example_index"]]
    assert batch["columns"]["answer"] == [by_index[i]["answer"] for i in batch["example_index"]]
    assert batch["columns"]["source"] == [by_index[i]["source"] for i in batch["example_index"]]
    assert sorted(batch["example_index"]) == list(range(6))


def test_collate_prompt_rows_by_hand():
    """collate_prompt_rows: prompt_ids, prompts and example_index lifted out, every other key into columns."""
    rows = [
        {"q": "a", "prompt_ids": [1, 2], "example_index": 4, "answer": "x", "k": 1},
        {"q": "b", "prompt_ids": [3], "example_index": 0, "answer": "y", "k": 2},
    ]
    assert collate_prompt_rows(rows, prompt_column="q") == {
        "prompt_ids": [[1, 2], [3]],
        "prompts": ["a", "b"],
        "columns": {"answer": ["x", "y"], "k": [1, 2]},
        "example_index": [4, 0],
    }


# -- input errors --------------------------------------------------------------------------------------------------


def test_missing_prompt_column_names_the_columns_and_the_setting(tmp_path):
    """No 'prompt' column: the error lists the dataset's columns and says to set prompt_column."""
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "2 + 2 =", "answer": "4"}])
    with pytest.raises(ValueError, match="has no 'prompt' column") as error:
        setup_dm(path, eval_split=None)
    assert "['question', 'answer']" in str(error.value) and "Set prompt_column" in str(error.value)
    assert "messages" not in str(error.value)


def test_messages_dataset_gets_the_hint():
    """An SFT-style dataset (ltpost:arithmetic has 'messages', no 'prompt'): the error says how to map it."""
    with pytest.raises(ValueError, match="has no 'prompt' column") as error:
        setup_dm("ltpost:arithmetic", max_train_samples=4, eval_split=None)
    assert "The dataset has 'messages'" in str(error.value)
    assert "r['messages'][:-1]" in str(error.value)


@pytest.mark.parametrize("reserved", ["completions", "prompts", "completion_ids"])
def test_reserved_column_names_are_rejected(tmp_path, reserved):
    """A column that would shadow a reward-function argument is rejected, naming it and the rename."""
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "1 + 1 =", reserved: "x"}])
    with pytest.raises(ValueError, match=f"Column '{reserved}' would shadow") as error:
        setup_dm(path, eval_split=None)
    assert f"rename_column('{reserved}'" in str(error.value)


def test_prompt_of_another_type_is_rejected(tmp_path):
    """A prompt that is neither a string nor a message list: the error names the column and the type."""
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": 42}])
    with pytest.raises(ValueError, match="A 'prompt' value must be a string or a list of chat messages.*int: 42"):
        setup_dm(path, eval_split=None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompts_per_step": 0}, "prompts_per_step must be >= 1, got 0"),
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1, got 0"),
        ({"max_prompt_length": 0}, "max_prompt_length must be >= 1 token"),
        ({"long_prompts": "skip"}, "long_prompts must be 'error', 'drop' or 'truncate', got 'skip'"),
    ],
)
def test_constructor_validation(kwargs, message):
    """Invalid settings fail at construction, before any data is read."""
    with pytest.raises(ValueError, match=message):
        PromptDataModule(tokenizer="ltpost:tiny-llama", **kwargs)


def test_no_tokenizer_without_a_trainer():
    """Without tokenizer= and without a trainer whose module names a model, setup says what to pass."""
    dm = PromptDataModule()
    assert dm.trainer is None
    with pytest.raises(ValueError, match="PromptDataModule has no tokenizer: pass tokenizer="):
        dm.setup("fit")


# -- max_prompt_length ---------------------------------------------------------------------------------------------

# The first 16 built-in training prompts are 15 to 22 tokens long; 4 of them are longer than 17.
LIMIT = 17


def full_lengths() -> list[int]:
    dm = setup_dm(max_train_samples=16, eval_split=None, max_prompt_length=None)
    return [len(ids) for ids in dm.train_dataset["prompt_ids"]]


def test_long_prompts_error_counts_them_and_names_the_fixes():
    """long_prompts='error' (the default): the message counts the long prompts, gives the longest and an example row,
    and names the three fixes."""
    lengths = full_lengths()
    too_long = [i for i, n in enumerate(lengths) if n > LIMIT]
    assert 0 < len(too_long) < 16
    with pytest.raises(ValueError) as error:
        setup_dm(max_train_samples=16, eval_split=None, max_prompt_length=LIMIT)
    message = str(error.value)
    assert f"{len(too_long)} of 16 prompts of split 'train' are longer than max_prompt_length={LIMIT}" in message
    assert f"longest {max(lengths)}, e.g. row {too_long[0]}" in message
    assert "Raise max_prompt_length" in message and "long_prompts='drop'" in message and "'truncate'" in message


def test_long_prompts_drop_keeps_the_short_ones_in_order(caplog):
    """long_prompts='drop' keeps exactly the prompts within the limit, in order, renumbers example_index, and warns;
    a limit that no prompt meets raises instead of leaving an empty dataset."""
    full = setup_dm(max_train_samples=16, eval_split=None, max_prompt_length=None).train_dataset
    with caplog.at_level(logging.WARNING, logger="ltpost.datamodules.prompts"):
        dm = setup_dm(max_train_samples=16, eval_split=None, max_prompt_length=LIMIT, long_prompts="drop")
    kept = [ids for ids in full["prompt_ids"] if len(ids) <= LIMIT]
    assert dm.train_dataset["prompt_ids"] == kept and len(kept) < 16
    assert dm.train_dataset["answer"] == [r["answer"] for r in full if len(r["prompt_ids"]) <= LIMIT]
    assert dm.train_dataset["example_index"] == list(range(len(kept)))
    assert "dropping them" in caplog.text
    with pytest.raises(ValueError, match="dropping them leaves nothing. Raise max_prompt_length"):
        setup_dm(max_train_samples=16, eval_split=None, max_prompt_length=3, long_prompts="drop")


def test_long_prompts_truncate_keeps_the_last_tokens(tokenizer):
    """long_prompts='truncate' keeps the last max_prompt_length tokens of long prompts (so they still end with the
    generation header) and leaves the others unchanged; the eval split obeys the same limit."""
    full = setup_dm(max_train_samples=16, max_eval_samples=8, max_prompt_length=None)
    cut = setup_dm(max_train_samples=16, max_eval_samples=8, max_prompt_length=LIMIT, long_prompts="truncate")
    assert len(cut.train_dataset) == 16
    for a, b in zip(full.train_dataset["prompt_ids"], cut.train_dataset["prompt_ids"]):
        assert b == (a[-LIMIT:] if len(a) > LIMIT else a)
        assert tokenizer.decode(b).endswith(HEADER)
    assert any(len(a) > LIMIT for a in full.train_dataset["prompt_ids"])
    assert all(len(b) <= LIMIT for b in cut.eval_dataset["prompt_ids"])


# -- generation rounds ---------------------------------------------------------------------------------------------


def test_rounds_repeat_each_round_with_round_steps():
    """20 prompts, prompts_per_step=2, steps_per_generation=3, num_iterations=2: rounds of 6 prompts, each yielded
    6 times (round_step 0..5) with identical prompts; 20 // 6 = 3 disjoint rounds per epoch; len() = 18 items."""
    dm = setup_dm(max_train_samples=20, eval_split=None, prompts_per_step=2)
    rounds = dm.rounds(steps_per_generation=3, num_iterations=2)
    yielded = items(rounds)
    assert len(rounds) == len(yielded) == 18
    seen = []
    for r in range(3):
        group = yielded[6 * r : 6 * r + 6]
        assert [b["round_step"] for b in group] == [0, 1, 2, 3, 4, 5]
        first = {k: v for k, v in group[0].items() if k != "round_step"}
        assert all({k: v for k, v in b.items() if k != "round_step"} == first for b in group)
        assert len(first["prompt_ids"]) == 6 and len(set(first["example_index"])) == 6
        seen += first["example_index"]
    assert len(set(seen)) == 18  # rounds do not overlap within an epoch


def test_train_dataloader_without_trainer_is_one_round_per_step():
    """With no trainer (rank 0 of 1, steps_per_generation = num_iterations = 1), the train loader yields rounds of
    prompts_per_step prompts, each once (round_step 0), covering 10 // 3 = 3 rounds."""
    dm = setup_dm(max_train_samples=10, eval_split=None, prompts_per_step=3)
    assert dm.trainer is None
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [b["round_step"] for b in batches] == [0, 0, 0]
    assert all(len(b["prompt_ids"]) == 3 for b in batches)
    assert len({i for b in batches for i in b["example_index"]}) == 9


def test_ranks_get_disjoint_halves_of_each_global_round():
    """world_size 2, round_size 3 per rank: rank 0 and rank 1 get disjoint rounds whose union, in order, is the
    global round a single process with round_size 6 gets (the same seeded permutation on every rank)."""
    dm = setup_dm(max_train_samples=20, eval_split=None)
    common = {"collate": dm.collate, "seed": 5, "repeats": 2}
    ranks = [GenerationRounds(dm.train_dataset, round_size=3, rank=r, world_size=2, **common) for r in (0, 1)]
    whole = GenerationRounds(dm.train_dataset, round_size=6, **common)
    assert len(ranks[0]) == len(ranks[1]) == len(whole) == 6  # 20 // 6 = 3 rounds, 2 repeats
    rank0, rank1, single = items(ranks[0]), items(ranks[1]), items(whole)
    for a, b, c in zip(rank0, rank1, single):
        assert a["round_step"] == b["round_step"] == c["round_step"]
        assert not set(a["example_index"]) & set(b["example_index"])
        assert a["example_index"] + b["example_index"] == c["example_index"]
        assert a["prompt_ids"] + b["prompt_ids"] == c["prompt_ids"]


def test_epochs_reshuffle_and_the_same_epoch_repeats():
    """epoch_fn selects the shuffle: the same epoch gives the same order twice, another epoch another order;
    shuffle=False follows the dataset order."""
    dm = setup_dm(max_train_samples=20, eval_split=None)
    epoch = [0]
    rounds = GenerationRounds(dm.train_dataset, round_size=4, repeats=1, collate=dm.collate, epoch_fn=lambda: epoch[0])

    def order():
        return [i for b in items(rounds) for i in b["example_index"]]

    first, again = order(), order()
    epoch[0] = 1
    second = order()
    assert first == again and len(first) == 20
    assert first != second and sorted(first) == sorted(second) == list(range(20))
    plain = GenerationRounds(dm.train_dataset, round_size=4, repeats=1, collate=dm.collate, shuffle=False)
    assert [i for b in items(plain) for i in b["example_index"]] == list(range(20))


def test_too_few_prompts_for_a_round_says_what_to_lower():
    """5 prompts fill one round of 2 x 2 = 4 but not one of prompts_per_step 2 x steps_per_generation 3 = 6: the
    error gives the product and says to lower prompts_per_step or steps_per_generation."""
    dm = setup_dm(max_train_samples=5, eval_split=None, prompts_per_step=2)
    fits = items(dm.rounds(steps_per_generation=2))  # 4 prompts: one round, yielded twice
    assert [b["round_step"] for b in fits] == [0, 1] and len(fits[0]["prompt_ids"]) == 4
    with pytest.raises(ValueError) as error:
        dm.rounds(steps_per_generation=3)
    message = str(error.value)
    assert "The train split has 5 prompts, fewer than one generation round" in message
    assert "prompts_per_step (2) x steps_per_generation (3) x devices (1) = 6" in message
    assert "Lower prompts_per_step or steps_per_generation" in message


# -- validation loader ---------------------------------------------------------------------------------------------


def test_val_dataloader_yields_plain_batches_of_eval_batch_size():
    """8 eval prompts, eval_batch_size 3: batches of 3, 3, 2 in dataset order, without round_step; no eval split
    gives no loader."""
    dm = setup_dm(max_train_samples=4, max_eval_samples=8, eval_batch_size=3)
    batches = list(dm.val_dataloader())
    assert [len(b["prompt_ids"]) for b in batches] == [3, 3, 2]
    assert all(set(b) == {"prompt_ids", "prompts", "columns", "example_index"} for b in batches)
    assert [i for b in batches for i in b["example_index"]] == list(range(8))
    assert [a for b in batches for a in b["columns"]["answer"]] == dm.eval_dataset["answer"]
    assert setup_dm(max_train_samples=4, eval_split=None).val_dataloader() == []
