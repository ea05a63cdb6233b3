"""SFTDataModule and collate_sft: loss masks, batching, packing, file loading and input errors.

Everything runs offline on the embedded tokenizer (``ltpost:tiny-llama``), the built-in arithmetic tasks and small
files written to ``tmp_path``. Datamodules are set up directly with ``setup("fit")``; no trainer is needed.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch

from ltpost.assets import load_task
from ltpost.datamodules.sft import SFTDataModule, collate_sft, pack_best_fit_decreasing
from ltpost.losses.sft import IGNORE_INDEX

EOT = "<|im_end|>"  # end-of-turn token of the embedded tokenizer, also its eos_token


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    """Local json/csv/parquet files are converted to Arrow under HF_DATASETS_CACHE; keep that inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def setup_dm(dataset, **kwargs) -> SFTDataModule:
    kwargs.setdefault("tokenizer", "ltpost:tiny-llama")
    dm = SFTDataModule(dataset, **kwargs)
    dm.setup("fit")
    return dm


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the format named by the file suffix (json array, jsonl, csv or parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("\n".join(str(row) for row in rows))
    return path


def masked_ids(row: dict) -> list[int]:
    return [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]


def mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of ones in ``mask``."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


USER_ASSISTANT = [{"role": "user", "content": "What is 40 + 41?"}, {"role": "assistant", "content": "81"}]


# -- loss masks --------------------------------------------------------------------------------------------------


def test_assistant_only_mask_is_exactly_the_answer_and_end_of_turn(tmp_path, tokenizer):
    """User: 'What is 40 + 41?' / assistant: '81'. The rendered conversation is
    '<|im_start|>user\\nWhat is 40 + 41?<|im_end|><|im_start|>assistant\\n81<|im_end|>'; the assistant-only mask
    must select exactly '81<|im_end|>': the answer and the end-of-turn token the model must learn to emit, but
    not the '<|im_start|>assistant\\n' header."""
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": USER_ASSISTANT}])
    dm = setup_dm(str(path), eval_split=None, assistant_only_loss=True)
    row = dm.train_dataset[0]
    assert tokenizer.decode(row["input_ids"]) == (
        "<|im_start|>user\nWhat is 40 + 41?<|im_end|><|im_start|>assistant\n81<|im_end|>"
    )
    assert tokenizer.decode(masked_ids(row)) == "81" + EOT
    assert masked_ids(row)[-1] == tokenizer.eos_token_id
    start = len(row["input_ids"]) - len(masked_ids(row))
    assert row["completion_mask"] == [0] * start + [1] * (len(row["input_ids"]) - start)
    assert row["seq_lengths"] == [len(row["input_ids"])]


def test_assistant_only_mask_on_builtin_task(tokenizer):
    """For every row of ltpost:arithmetic the mask is one contiguous run at the end that decodes to answer + EOT,
    and everything before it decodes to the user turn plus the assistant header."""
    dm = setup_dm("ltpost:arithmetic", eval_split=None, assistant_only_loss=True, max_train_samples=16)
    raw = load_task("arithmetic", "train", num_rows=16)
    assert len(dm.train_dataset) == 16
    for row, source in zip(dm.train_dataset, raw):
        runs = mask_runs(row["completion_mask"])
        assert runs == [(runs[0][0], len(row["input_ids"]))]
        start = runs[0][0]
        assert tokenizer.decode(row["input_ids"][start:]) == source["answer"] + EOT
        question = source["messages"][0]["content"]
        assert tokenizer.decode(row["input_ids"][:start]) == f"<|im_start|>user\n{question}{EOT}<|im_start|>assistant\n"


def test_assistant_only_mask_covers_every_assistant_turn(tmp_path, tokenizer):
    """System, user, assistant 'A1', user, assistant 'A2 done': two separate runs of loss tokens, 'A1<|im_end|>'
    and 'A2 done<|im_end|>'; the system and user turns and both assistant headers carry no loss."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "And?"},
        {"role": "assistant", "content": "A2 done"},
    ]
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": messages}])
    row = setup_dm(str(path), eval_split=None, assistant_only_loss=True).train_dataset[0]
    runs = mask_runs(row["completion_mask"])
    assert [tokenizer.decode(row["input_ids"][a:b]) for a, b in runs] == ["A1" + EOT, "A2 done" + EOT]


def test_without_assistant_only_loss_every_token_carries_loss(tmp_path, tokenizer):
    """assistant_only_loss=False (the default): the mask is all ones, header and user turn included."""
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": USER_ASSISTANT}])
    row = setup_dm(str(path), eval_split=None).train_dataset[0]
    assert row["completion_mask"] == [1] * len(row["input_ids"])
    assert tokenizer.decode(masked_ids(row)) == (
        "<|im_start|>user\nWhat is 40 + 41?<|im_end|><|im_start|>assistant\n81<|im_end|>"
    )


@pytest.mark.parametrize("completion_only_loss", [None, True])
def test_completion_only_mask_is_exactly_the_completion_and_eos(tmp_path, tokenizer, completion_only_loss):
    """prompt '40 + 41 =' / completion ' 81': ids = tokens('40 + 41 =') + tokens(' 81') + [eos]; the mask (on by
    default for prompt-completion data) selects exactly ' 81<|im_end|>'."""
    path = write_rows(tmp_path / "pc.jsonl", [{"prompt": "40 + 41 =", "completion": " 81"}])
    row = setup_dm(str(path), eval_split=None, completion_only_loss=completion_only_loss).train_dataset[0]
    prompt_ids = tokenizer("40 + 41 =").input_ids
    completion_ids = tokenizer(" 81", add_special_tokens=False).input_ids
    assert row["input_ids"] == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
    assert tokenizer.decode(masked_ids(row)) == " 81" + EOT


def test_completion_only_loss_false_covers_everything(tmp_path, tokenizer):
    path = write_rows(tmp_path / "pc.jsonl", [{"prompt": "40 + 41 =", "completion": " 81"}])
    row = setup_dm(str(path), eval_split=None, completion_only_loss=False).train_dataset[0]
    assert row["completion_mask"] == [1] * len(row["input_ids"])
    assert tokenizer.decode(masked_ids(row)) == "40 + 41 = 81" + EOT


def test_completion_only_mask_on_builtin_task(tokenizer):
    """Every row of ltpost:arithmetic-completion: prompt tokens unmasked, then completion + EOT masked."""
    dm = setup_dm("ltpost:arithmetic-completion", max_train_samples=16, max_eval_samples=4)
    raw = load_task("arithmetic-completion", "train", num_rows=16)
    for row, source in zip(dm.train_dataset, raw):
        n_prompt = len(tokenizer(source["prompt"]).input_ids)
        assert row["completion_mask"] == [0] * n_prompt + [1] * (len(row["input_ids"]) - n_prompt)
        assert tokenizer.decode(row["input_ids"][:n_prompt]) == source["prompt"]
        assert tokenizer.decode(masked_ids(row)) == source["completion"] + EOT
    assert len(dm.eval_dataset) == 4


def test_conversational_prompt_completion_mask(tmp_path, tokenizer):
    """Conversational prompt [user] / completion [assistant '81']: the prompt is rendered with the generation
    prompt '<|im_start|>assistant\\n', so the completion part is exactly '81<|im_end|>'."""
    row = {"prompt": USER_ASSISTANT[:1], "completion": USER_ASSISTANT[1:]}
    path = write_rows(tmp_path / "cpc.jsonl", [row])
    tokenized = setup_dm(str(path), eval_split=None).train_dataset[0]
    assert tokenizer.decode(masked_ids(tokenized)) == "81" + EOT
    assert tokenizer.decode(tokenized["input_ids"]) == (
        "<|im_start|>user\nWhat is 40 + 41?<|im_end|><|im_start|>assistant\n81<|im_end|>"
    )
    everything = setup_dm(str(path), eval_split=None, completion_only_loss=False).train_dataset[0]
    assert everything["completion_mask"] == [1] * len(everything["input_ids"])


def test_text_rows_carry_loss_everywhere_and_end_with_eos(tokenizer):
    dm = setup_dm("ltpost:arithmetic-text", max_train_samples=8, eval_split=None)
    raw = load_task("arithmetic-text", "train", num_rows=8)
    for row, source in zip(dm.train_dataset, raw):
        assert tokenizer.decode(row["input_ids"]) == source["text"] + EOT
        assert row["completion_mask"] == [1] * len(row["input_ids"])


# -- collate -----------------------------------------------------------------------------------------------------

TWO_EXAMPLES = [
    {"input_ids": [10, 11, 12], "completion_mask": [0, 1, 1]},
    {"input_ids": [20, 21], "completion_mask": [1, 1]},
]


def test_collate_padding_free_hand_example():
    """Labels are the ids where the mask is 1: [-100, 11, 12] and [20, 21]. Shifted per sequence (target of t is
    label t+1, and -100 at each sequence's last position): [11, 12, -100] and [21, -100]. Concatenated into one
    row: shift_labels [11, 12, -100, 21, -100], position_ids [0, 1, 2, 0, 1], 5 tokens, 3 loss tokens.
    Position 2 (token 12) must not predict 20, the first token of the next sequence."""
    batch = collate_sft(TWO_EXAMPLES, pad_token_id=0, padding_free=True)
    assert set(batch) == {"input_ids", "position_ids", "shift_labels", "num_tokens", "num_loss_tokens"}
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["shift_labels"].tolist() == [[11, 12, IGNORE_INDEX, 21, IGNORE_INDEX]]
    assert batch["num_tokens"] == 5 and type(batch["num_tokens"]) is int
    assert batch["num_loss_tokens"] == 3 and type(batch["num_loss_tokens"]) is int


def test_collate_padded_hand_example():
    """Right-padded to width 3 (pad id 0): the pad position has attention_mask 0 and label -100; with
    pad_to_multiple_of=4 the width rounds up from 3 to 4. num_tokens counts real tokens only (5)."""
    batch = collate_sft(TWO_EXAMPLES, pad_token_id=0, padding_free=False)
    assert batch["input_ids"].tolist() == [[10, 11, 12], [20, 21, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert batch["shift_labels"].tolist() == [[11, 12, IGNORE_INDEX], [21, IGNORE_INDEX, IGNORE_INDEX]]
    assert (batch["num_tokens"], batch["num_loss_tokens"]) == (5, 3)

    wide = collate_sft(TWO_EXAMPLES, pad_token_id=7, padding_free=False, pad_to_multiple_of=4)
    assert wide["input_ids"].tolist() == [[10, 11, 12, 7], [20, 21, 7, 7]]
    assert wide["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert wide["shift_labels"][:, 2:].tolist() == [[IGNORE_INDEX] * 2] * 2
    assert (wide["num_tokens"], wide["num_loss_tokens"]) == (5, 3)


def test_collate_packed_row_restarts_positions_at_each_sequence():
    """One packed row holding sequences of lengths 3 and 2 collates exactly like the two rows padding-free."""
    packed = [{"input_ids": [10, 11, 12, 20, 21], "completion_mask": [0, 1, 1, 1, 1], "seq_lengths": [3, 2]}]
    batch = collate_sft(packed, pad_token_id=0)
    reference = collate_sft(TWO_EXAMPLES, pad_token_id=0)
    for key in ("input_ids", "position_ids", "shift_labels"):
        assert torch.equal(batch[key], reference[key])
    assert (batch["num_tokens"], batch["num_loss_tokens"]) == (5, 3)


def check_batch_targets(batch, rows):
    """Every loss target is the next token of the same sequence; each sequence's last position is -100;
    positions restart at 0 per sequence; the counts are the real token and loss-token numbers."""
    lengths = [n for row in rows for n in row["seq_lengths"]]
    ids = batch["input_ids"].reshape(-1)
    labels = batch["shift_labels"].reshape(-1)
    positions = batch["position_ids"].reshape(-1)
    assert positions.tolist() == [p for n in lengths for p in range(n)]
    ends = set(torch.tensor(lengths).cumsum(0).sub(1).tolist())
    masks = [m for row in rows for m in row["completion_mask"]]
    for t in range(len(ids)):
        if t in ends:
            assert labels[t] == IGNORE_INDEX
        elif masks[t + 1]:
            assert labels[t] == ids[t + 1]
            assert positions[t + 1] == positions[t] + 1
        else:
            assert labels[t] == IGNORE_INDEX
    expected_loss = sum(masks[t + 1] for t in range(len(masks)) if t not in ends)
    assert expected_loss > 0
    assert batch["num_loss_tokens"] == expected_loss == int((labels != IGNORE_INDEX).sum())
    assert batch["num_tokens"] == sum(lengths) == len(ids)


def test_collate_real_rows_padding_free_and_padded():
    dm = setup_dm("ltpost:arithmetic", max_train_samples=6, eval_split=None, assistant_only_loss=True)
    rows = [dm.train_dataset[i] for i in range(6)]
    batch = dm.collate(rows)
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert "attention_mask" not in batch
    check_batch_targets(batch, rows)

    padded = collate_sft(rows, dm.tokenizer.pad_token_id, padding_free=False)
    width = max(len(r["input_ids"]) for r in rows)
    assert padded["input_ids"].shape == (6, width)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert padded["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert padded["input_ids"][i, n:].eq(dm.tokenizer.pad_token_id).all()
        assert padded["shift_labels"][i, n - 1 :].eq(IGNORE_INDEX).all()
    assert torch.equal(padded["shift_labels"][padded["attention_mask"].bool()], batch["shift_labels"][0])
    assert (padded["num_tokens"], padded["num_loss_tokens"]) == (batch["num_tokens"], batch["num_loss_tokens"])


def test_train_dataloader_batches_are_collated():
    dm = setup_dm("ltpost:arithmetic-completion", max_train_samples=10, eval_split=None, batch_size=4)
    batches = list(dm.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [1, 1, 1]
    assert sum(b["num_tokens"] for b in batches) == sum(len(r["input_ids"]) for r in dm.train_dataset)
    assert dm.val_dataloader() == []


# -- padding-free logits equal padded logits -----------------------------------------------------------------------


def _logits_padded_vs_padding_free(model, rows):
    padding_free = collate_sft(rows, pad_token_id=0, padding_free=True)
    padded = collate_sft(rows, pad_token_id=0, padding_free=False)
    with torch.no_grad():
        packed_logits = model(
            input_ids=padding_free["input_ids"], position_ids=padding_free["position_ids"], use_cache=False
        ).logits[0]  # [N, V]
        padded_logits = model(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            position_ids=padded["position_ids"],
            use_cache=False,
        ).logits  # [B, T, V]
        # The same concatenated row read as ONE sequence (positions 0..N-1): what attention would see without
        # the per-sequence restarts. It must differ, or the comparison above proves nothing.
        flat_positions = torch.arange(padding_free["input_ids"].shape[1])[None]
        leaked_logits = model(input_ids=padding_free["input_ids"], position_ids=flat_positions, use_cache=False).logits[
            0
        ]
    return packed_logits, padded_logits[padded["attention_mask"].bool()], leaked_logits


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_free_logits_equal_padded_logits(attn_implementation):
    from ltpost.models import load_model

    model = load_model("ltpost:tiny-llama", attn_implementation=attn_implementation).eval()
    assert model.config._attn_implementation == attn_implementation
    dm = setup_dm("ltpost:arithmetic", max_train_samples=5, eval_split=None)
    rows = [dm.train_dataset[i] for i in range(5)]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # different lengths, so padding is exercised
    packed, padded, leaked = _logits_padded_vs_padding_free(model, rows)
    assert packed.shape == padded.shape == (sum(len(r["input_ids"]) for r in rows), model.config.vocab_size)
    assert (packed - padded).abs().max().item() <= 1e-5
    first = len(rows[0]["input_ids"])
    assert (leaked[first:] - padded[first:]).abs().max().item() > 1e-2


def test_module_forward_padding_free_equals_padded(tiny_model):
    """SFTModule.forward (the training path) must give the same logits for both batch layouts."""
    from ltpost.modules.sft import SFTModule

    module = SFTModule()
    module.model = tiny_model.eval()
    dm = setup_dm("ltpost:arithmetic", max_train_samples=4, eval_split=None)
    rows = [dm.train_dataset[i] for i in range(4)]
    padding_free = collate_sft(rows, 0, padding_free=True)
    padded = collate_sft(rows, 0, padding_free=False)
    with torch.no_grad():
        packed_logits = module(padding_free)[0]
        padded_logits = module(padded)[padded["attention_mask"].bool()]
    assert (packed_logits - padded_logits).abs().max().item() <= 1e-5


# -- packing -----------------------------------------------------------------------------------------------------


def test_best_fit_decreasing_is_tight_on_a_hand_example():
    """Lengths [5, 4, 3, 3, 2, 2, 1], capacity 10, total 20, so at least 2 bins. Longest first:
    5 -> new bin A (5 left); 4 -> A (1 left); 3 -> fits nowhere, new bin B (7 left); 3 -> B (4 left);
    2 -> B (2 left); 2 -> B (0 left); 1 -> A (0 left). Bins {0, 1, 6} and {2, 3, 4, 5}, both exactly full."""
    lengths = [5, 4, 3, 3, 2, 2, 1]
    bins = pack_best_fit_decreasing(lengths, 10)
    assert sorted(sorted(b) for b in bins) == [[0, 1, 6], [2, 3, 4, 5]]
    assert [sum(lengths[i] for i in b) for b in bins] == [10, 10]


def test_best_fit_picks_the_tightest_bin_not_the_first():
    """Lengths [8, 6, 3, 1], capacity 10: 8 -> A (2 left); 6 -> B (4 left); 3 -> B (1 left); then 1 fits both
    A (2 left) and B (1 left): best fit takes B, the tighter one (first fit would take A). Bins {0}, {1, 2, 3}."""
    assert sorted(sorted(b) for b in pack_best_fit_decreasing([8, 6, 3, 1], 10)) == [[0], [1, 2, 3]]


def test_best_fit_decreasing_invariants_on_random_lengths():
    """Each index in exactly one bin, no bin over capacity, and (true of every any-fit packing) at most one bin
    at most half full: a second such bin's items would have fit in the first when it was opened."""
    rng = random.Random(0)
    for capacity in (16, 64, 100):
        lengths = [rng.randint(1, capacity) for _ in range(300)]
        bins = pack_best_fit_decreasing(lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(300))
        loads = [sum(lengths[i] for i in b) for b in bins]
        assert max(loads) <= capacity
        assert sum(load <= capacity / 2 for load in loads) <= 1
        assert len(bins) >= math.ceil(sum(lengths) / capacity)
    assert pack_best_fit_decreasing([], 10) == []
    assert pack_best_fit_decreasing([10, 10], 10) == [[0], [1]]


def test_bfd_packing_datamodule_keeps_every_sequence_whole():
    """Packed rows: seq_lengths sum to the row length, rows fit max_length, and splitting the rows at seq_lengths
    gives back exactly the unpacked rows (same multiset of (ids, mask) sequences). Eval data is not packed."""
    kwargs = dict(max_train_samples=64, max_eval_samples=8, max_length=64)
    packed = setup_dm("ltpost:arithmetic", packing=True, **kwargs)
    plain = setup_dm("ltpost:arithmetic", **kwargs)
    assert len(packed.train_dataset) < len(plain.train_dataset) == 64
    pieces = []
    for row in packed.train_dataset:
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) <= 64
        start = 0
        for n in row["seq_lengths"]:
            piece = slice(start, start + n)
            pieces.append((tuple(row["input_ids"][piece]), tuple(row["completion_mask"][piece])))
            start += n
    originals = [(tuple(r["input_ids"]), tuple(r["completion_mask"])) for r in plain.train_dataset]
    assert Counter(pieces) == Counter(originals)
    assert all(len(r["seq_lengths"]) == 1 for r in packed.eval_dataset)
    rows = [packed.train_dataset[i] for i in range(2)]
    check_batch_targets(packed.collate(rows), rows)


def test_wrapped_packing_cuts_the_corpus_into_max_length_blocks():
    """The tokenized corpus (20 rows of "a + b = c" with one token per digit: 229 tokens) cut into blocks of 16:
    14 full blocks (224 tokens) and one of 5; concatenating the blocks gives the corpus back in order."""
    corpus_dm = setup_dm("ltpost:arithmetic-text", max_train_samples=20, eval_split=None)
    corpus = [t for r in corpus_dm.train_dataset for t in r["input_ids"]]
    assert len(corpus) == 229
    dm = setup_dm(
        "ltpost:arithmetic-text",
        max_train_samples=20,
        eval_split=None,
        max_length=16,
        packing=True,
        packing_strategy="wrapped",
    )
    lengths = [len(r["input_ids"]) for r in dm.train_dataset]
    assert lengths == [16] * 14 + [5]
    assert [r["seq_lengths"] for r in dm.train_dataset] == [[n] for n in lengths]
    assert [t for r in dm.train_dataset for t in r["input_ids"]] == corpus


def test_wrapped_packing_allows_padding_and_bfd_requires_padding_free():
    dm = setup_dm(
        "ltpost:arithmetic-text",
        max_train_samples=4,
        eval_split=None,
        max_length=8,
        packing=True,
        packing_strategy="wrapped",
        padding_free=False,
    )
    batch = dm.collate([dm.train_dataset[i] for i in range(3)])
    assert batch["attention_mask"].tolist() == [[1] * 8] * 3
    with pytest.raises(ValueError, match="padding_free=True"):
        SFTDataModule("ltpost:arithmetic", tokenizer="ltpost:tiny-llama", packing=True, padding_free=False)
    with pytest.raises(ValueError, match="packing needs max_length.*Set max_length"):
        SFTDataModule("ltpost:arithmetic", tokenizer="ltpost:tiny-llama", packing=True, max_length=None)


# -- local files ---------------------------------------------------------------------------------------------------

TRAIN_ROWS = [
    {"prompt": "Say hi:", "completion": " hello"},
    {"prompt": "7 + 8 =", "completion": " 15"},
    {"prompt": "Name a color:", "completion": " blue"},
]
TEST_ROWS = [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "Say bye:", "completion": " bye"}]


def check_prompt_completion_rows(dataset, rows, tokenizer):
    assert len(dataset) == len(rows)
    for tokenized, source in zip(dataset, rows):
        assert tokenizer.decode(tokenized["input_ids"]) == source["prompt"] + source["completion"] + EOT
        assert tokenizer.decode(masked_ids(tokenized)) == source["completion"] + EOT


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_load_folder_with_train_and_test_files(tmp_path, tokenizer, suffix):
    write_rows(tmp_path / "data" / f"train{suffix}", TRAIN_ROWS)
    write_rows(tmp_path / "data" / f"test{suffix}", TEST_ROWS)
    dm = setup_dm(str(tmp_path / "data"))
    check_prompt_completion_rows(dm.train_dataset, TRAIN_ROWS, tokenizer)
    check_prompt_completion_rows(dm.eval_dataset, TEST_ROWS, tokenizer)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_load_single_file_as_train_split(tmp_path, tokenizer, suffix):
    path = write_rows(tmp_path / f"mydata{suffix}", TRAIN_ROWS)
    dm = setup_dm(str(path), eval_split=None)
    check_prompt_completion_rows(dm.train_dataset, TRAIN_ROWS, tokenizer)
    assert dm.eval_dataset is None


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_load_conversational_file(tmp_path, tokenizer, suffix):
    path = write_rows(tmp_path / f"chat{suffix}", [{"messages": USER_ASSISTANT}] * 2)
    dm = setup_dm(str(path), eval_split=None, assistant_only_loss=True)
    assert [tokenizer.decode(masked_ids(r)) for r in dm.train_dataset] == ["81" + EOT] * 2


def test_load_dataset_saved_to_disk(tmp_path, tokenizer):
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(TRAIN_ROWS), "test": datasets.Dataset.from_list(TEST_ROWS)}
    ).save_to_disk(str(tmp_path / "saved"))
    dm = setup_dm(str(tmp_path / "saved"))
    check_prompt_completion_rows(dm.train_dataset, TRAIN_ROWS, tokenizer)
    check_prompt_completion_rows(dm.eval_dataset, TEST_ROWS, tokenizer)


def test_text_in_another_column_with_dataset_text_field(tmp_path, tokenizer):
    path = write_rows(tmp_path / "c.jsonl", [{"content": "hello world"}])
    row = setup_dm(str(path), eval_split=None, dataset_text_field="content").train_dataset[0]
    assert tokenizer.decode(row["input_ids"]) == "hello world" + EOT


# -- pre-tokenized data ------------------------------------------------------------------------------------------


def test_pretokenized_rows_with_completion_mask(tmp_path):
    rows = [
        {"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]},
        {"input_ids": [9, 10, 11], "completion_mask": [0, 1, 1]},
    ]
    dm = setup_dm(str(write_rows(tmp_path / "tok.jsonl", rows)), eval_split=None)
    assert [(r["input_ids"], r["completion_mask"], r["seq_lengths"]) for r in dm.train_dataset] == [
        ([5, 6, 7, 8], [0, 0, 1, 1], [4]),
        ([9, 10, 11], [0, 1, 1], [3]),
    ]
    batch = dm.collate(list(dm.train_dataset))
    assert batch["shift_labels"].tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, 11, IGNORE_INDEX]]


def test_pretokenized_rows_without_mask_train_on_every_token(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}]
    dm = setup_dm(str(write_rows(tmp_path / "tok.parquet", rows)), eval_split=None)
    assert [(r["input_ids"], r["completion_mask"]) for r in dm.train_dataset] == [
        ([5, 6, 7, 8], [1, 1, 1, 1]),
        ([9, 10], [1, 1]),
    ]


def test_pretokenized_rows_with_assistant_masks(tmp_path):
    rows = [{"input_ids": [5, 6, 7], "assistant_masks": [0, 1, 1]}]
    dm = setup_dm(str(write_rows(tmp_path / "tok.jsonl", rows)), eval_split=None)
    assert dm.train_dataset[0]["completion_mask"] == [0, 1, 1]


# -- truncation --------------------------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["word"] * 20)  # 59 tokens with the embedded tokenizer


def test_truncation_keeps_rows_with_loss_tokens_and_drops_the_others(tmp_path, tokenizer):
    """max_length 12. Row 0: short prompt, long completion -> truncated to 12 tokens, still has loss tokens, kept.
    Row 1: the prompt alone is longer than 12 -> no loss token survives, dropped. Row 2: short, untouched."""
    rows = [
        {"prompt": "Say:", "completion": LONG_PROMPT},
        {"prompt": LONG_PROMPT, "completion": " ok"},
        {"prompt": "7 + 8 =", "completion": " 15"},
    ]
    dm = setup_dm(str(write_rows(tmp_path / "pc.jsonl", rows)), eval_split=None, max_length=12)
    assert len(dm.train_dataset) == 2
    first, last = dm.train_dataset[0], dm.train_dataset[1]
    n_prompt = len(tokenizer("Say:").input_ids)
    assert len(first["input_ids"]) == 12 and first["seq_lengths"] == [12]
    assert first["completion_mask"] == [0] * n_prompt + [1] * (12 - n_prompt)
    assert tokenizer.decode(last["input_ids"]) == "7 + 8 = 15" + EOT


# -- input errors: each message names the problem and the fix ----------------------------------------------------


def test_conversations_column_asks_for_messages(tmp_path):
    path = write_rows(tmp_path / "conv.jsonl", [{"conversations": USER_ASSISTANT}])
    message = r"\['conversations'\] match no known format.*Rename the conversation column to 'messages'"
    with pytest.raises(ValueError, match=message):
        setup_dm(str(path), eval_split=None)


def test_unknown_text_column_points_to_dataset_text_field(tmp_path):
    path = write_rows(tmp_path / "content.jsonl", [{"content": "hello"}])
    with pytest.raises(ValueError, match=r"\['content'\] match no known format.*set dataset_text_field \(now 'text'\)"):
        setup_dm(str(path), eval_split=None)


def test_prompt_without_completion_column(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "hi", "response": "there"}])
    with pytest.raises(ValueError, match="needs both a 'prompt' and a 'completion' column"):
        setup_dm(str(path), eval_split=None)


def _empty_builtin(tmp_path):
    return dict(dataset="ltpost:arithmetic", max_train_samples=0)


def _empty_csv(tmp_path):
    (tmp_path / "empty.csv").write_text("text\n")  # a header, no rows
    return dict(dataset=str(tmp_path / "empty.csv"))


def _empty_jsonl(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    return dict(dataset=str(tmp_path / "empty.jsonl"))


@pytest.mark.parametrize(
    "make", [_empty_builtin, _empty_csv, _empty_jsonl], ids=["builtin-0-rows", "csv-header-only", "jsonl-0-bytes"]
)
def test_empty_dataset(tmp_path, make):
    """An empty training split is reported as empty, whatever its source."""
    with pytest.raises(ValueError, match=r"Split 'train' of dataset .* is empty: it has no rows to train on"):
        setup_dm(eval_split=None, **make(tmp_path))


def test_unknown_file_type(tmp_path):
    path = write_rows(tmp_path / "data.txt", [{"text": "hello"}])
    with pytest.raises(ValueError, match=r"unknown file type '\.txt'\. Use one of \.json, \.jsonl, \.parquet, \.csv"):
        setup_dm(str(path), eval_split=None)
    write_rows(tmp_path / "folder" / "train.txt", [{"text": "hello"}])
    with pytest.raises(ValueError, match=r"holds no \.json/\.jsonl/\.parquet/\.csv/\.arrow files"):
        setup_dm(str(tmp_path / "folder"), eval_split=None)


def test_mixed_file_types_in_a_folder(tmp_path):
    write_rows(tmp_path / "data" / "train.jsonl", TRAIN_ROWS)
    write_rows(tmp_path / "data" / "test.csv", TEST_ROWS)
    with pytest.raises(ValueError, match=r"mixes file types \['csv', 'json'\]; keep one type per dataset folder"):
        setup_dm(str(tmp_path / "data"))


def test_every_row_longer_than_max_length():
    """Each arithmetic-text row is 6 tokens; with max_length=3 all of them would be truncated."""
    message = r"Every one of the 8 rows of split 'train' is longer than max_length=3 tokens.*Raise max_length"
    with pytest.raises(ValueError, match=message):
        setup_dm("ltpost:arithmetic-text", max_train_samples=8, eval_split=None, max_length=3)


def test_prompts_filling_max_length(tmp_path):
    """Prompt-completion rows whose prompt alone (59 tokens) exceeds max_length=16: after truncation no completion
    token is left anywhere, so nothing can be learned. The error must say the prompts fill max_length (the problem)
    and how to fix it (raise max_length or shorten the prompts), not only that rows are long."""
    rows = [{"prompt": LONG_PROMPT, "completion": " ok"}] * 3
    path = write_rows(tmp_path / "pc.jsonl", rows)
    message = r"max_length=16.*prompts fill the whole length.*Raise max_length or shorten the prompts"
    with pytest.raises(ValueError, match=message):
        setup_dm(str(path), eval_split=None, max_length=16)


def _tokenizer_without_chat_template(tokenizer, folder: Path) -> str:
    tokenizer.save_pretrained(str(folder))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return str(folder)


def test_conversational_data_needs_a_chat_template(tmp_path, tokenizer):
    from ltpost.models import load_tokenizer

    plain = _tokenizer_without_chat_template(tokenizer, tmp_path / "plain-tokenizer")
    assert load_tokenizer(plain).chat_template is None
    message = r"is conversational but the tokenizer has no chat template\. Set data\.init_args\.chat_template"
    with pytest.raises(ValueError, match=message):
        setup_dm("ltpost:arithmetic", tokenizer=plain, max_train_samples=4, eval_split=None)
    # The fix the message names works: pass the template.
    fixed = setup_dm(
        "ltpost:arithmetic",
        tokenizer=plain,
        chat_template=tokenizer.chat_template,
        max_train_samples=4,
        eval_split=None,
        assistant_only_loss=True,
    )
    answer = load_task("arithmetic", "train", 1)[0]["answer"]
    assert tokenizer.decode(masked_ids(fixed.train_dataset[0])) == answer + EOT


def test_chat_template_file_path(tmp_path, tokenizer):
    template = tmp_path / "template.jinja"
    template.write_text(tokenizer.chat_template)
    dm = setup_dm(
        "ltpost:arithmetic", chat_template=str(template), max_train_samples=2, eval_split=None, assistant_only_loss=True
    )
    assert dm.tokenizer.chat_template == tokenizer.chat_template


def test_assistant_only_loss_needs_generation_markers():
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    message = r"assistant_only_loss found no assistant tokens.*\{% generation %\}.*chat_template"
    with pytest.raises(ValueError, match=message):
        setup_dm(
            "ltpost:arithmetic", chat_template=template, assistant_only_loss=True, max_train_samples=4, eval_split=None
        )


def test_assistant_only_loss_on_non_conversational_data():
    message = "assistant_only_loss applies to conversational 'messages' data; this dataset is prompt-completion"
    with pytest.raises(ValueError, match=message):
        setup_dm("ltpost:arithmetic-completion", assistant_only_loss=True, max_train_samples=4, eval_split=None)


def test_unknown_builtin_dataset():
    message = r"Unknown built-in dataset 'ltpost:arithmatic'\. Available: ltpost:arithmetic, "
    with pytest.raises(ValueError, match=message):
        setup_dm("ltpost:arithmatic")


def test_missing_split_in_local_folder(tmp_path):
    write_rows(tmp_path / "data" / "train.jsonl", TRAIN_ROWS)
    message = r"has no split 'test'; it has \['train'\].*put a 'test' file beside it or set the eval split to None"
    with pytest.raises(ValueError, match=message):
        setup_dm(str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"has no split 'validation'; it has \['train'\]"):
        setup_dm(str(tmp_path / "data" / "train.jsonl"), eval_split="validation")
    assert len(setup_dm(str(tmp_path / "data"), eval_split=None).train_dataset) == 3


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SFTDataModule(batch_size=0)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        SFTDataModule(max_length=1)
