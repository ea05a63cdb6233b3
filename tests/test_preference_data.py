"""PreferenceDataModule and collate_preference: prompt extraction, truncation, the concatenated batch, input errors.

Everything runs offline on the embedded tokenizer (``ltpost:tiny-llama``, no BOS token, ``<|im_end|>`` is both
end-of-turn and EOS), the built-in ``ltpost:arithmetic-preference`` task and small files written to ``tmp_path``.
Datamodules are set up directly with ``setup("fit")``; no trainer is needed.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch

from ltpost.assets import make_rows
from ltpost.datamodules.preference import PreferenceDataModule, collate_preference, extract_prompt, truncate_pair
from ltpost.losses.logprobs import selective_log_softmax
from ltpost.losses.sft import IGNORE_INDEX

EOT = "<|im_end|>"
HEADER = "<|im_start|>assistant\n"  # the generation prompt of the embedded chat template
KEYS_PADDING_FREE = {
    "input_ids", "position_ids", "shift_labels", "sequence_ids", "sequence_ends",
    "num_pairs", "num_tokens", "chosen_lengths", "rejected_lengths",
}  # fmt: skip


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    """Local json files are converted to Arrow under HF_DATASETS_CACHE; keep that inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def setup_dm(dataset, **kwargs) -> PreferenceDataModule:
    kwargs.setdefault("tokenizer", "ltpost:tiny-llama")
    dm = PreferenceDataModule(dataset, **kwargs)
    dm.setup("fit")
    return dm


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def token_rows(dataset) -> list[tuple]:
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def preference_rows(num_rows: int = 6) -> list[dict]:
    return make_rows("arithmetic-preference", "train", num_rows=num_rows)


# -- tokenized rows ------------------------------------------------------------------------------------------------


def test_builtin_rows_are_prompt_with_generation_header_and_answer_turns(tokenizer):
    """Row i of ltpost:arithmetic-preference: the prompt renders the user turn plus '<|im_start|>assistant\\n';
    chosen is exactly the right answer + '<|im_end|>', rejected the wrong one + '<|im_end|>'."""
    dm = setup_dm("ltpost:arithmetic-preference", max_train_samples=8, max_eval_samples=3)
    assert len(dm.train_dataset) == 8 and len(dm.eval_dataset) == 3
    assert dm.train_dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids", "example_index"]
    assert dm.train_dataset["example_index"] == list(range(len(dm.train_dataset)))
    for row, source in zip(dm.train_dataset, preference_rows(8)):
        question = source["prompt"][0]["content"]
        assert tokenizer.decode(row["prompt_ids"]) == f"<|im_start|>user\n{question}{EOT}{HEADER}"
        assert tokenizer.decode(row["chosen_ids"]) == source["answer"] + EOT
        assert tokenizer.decode(row["rejected_ids"]) == source["rejected"][0]["content"] + EOT
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.eos_token_id


def test_conversational_implicit_prompt_gives_the_explicit_tokens(tmp_path):
    """The same pairs written with the prompt inside chosen/rejected (the shared leading messages) tokenize exactly
    like the explicit-prompt rows, also with a shared multi-turn history before the diverging answer."""
    rows = preference_rows(6)
    history = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")]
    explicit = [{"prompt": history + r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    implicit = [{"chosen": e["prompt"] + e["chosen"], "rejected": e["prompt"] + e["rejected"]} for e in explicit]
    a = setup_dm(write_jsonl(tmp_path / "explicit.jsonl", explicit), eval_split=None)
    b = setup_dm(write_jsonl(tmp_path / "implicit.jsonl", implicit), eval_split=None)
    assert token_rows(a.train_dataset) == token_rows(b.train_dataset)
    assert len(a.train_dataset) == 6
    prompt = a.tokenizer.decode(a.train_dataset[0]["prompt_ids"])
    assert prompt.startswith(
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|>"
    ) and prompt.endswith(HEADER)


def test_plain_text_implicit_prompt_gives_the_explicit_tokens(tmp_path, tokenizer):
    """Plain text: prompt ids (tokenizer's special tokens, none here), then each completion tokenized separately
    plus EOS. 'What is 40 + 41? 81' / '... 80' share the prompt 'What is 40 + 41?' and the completions are ' 81' /
    ' 80' (the whole diverging word with its leading space), exactly as in the explicit rows."""
    explicit = [
        {"prompt": "What is 40 + 41?", "chosen": " 81", "rejected": " 80"},
        {"prompt": "The sky is", "chosen": " blue", "rejected": " green today"},
    ]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    a = setup_dm(write_jsonl(tmp_path / "explicit.jsonl", explicit), eval_split=None)
    b = setup_dm(write_jsonl(tmp_path / "implicit.jsonl", implicit), eval_split=None)
    assert token_rows(a.train_dataset) == token_rows(b.train_dataset)
    eos = tokenizer.eos_token_id
    assert a.train_dataset[0]["prompt_ids"] == tokenizer("What is 40 + 41?").input_ids
    assert a.train_dataset[0]["chosen_ids"] == tokenizer(" 81", add_special_tokens=False).input_ids + [eos]
    assert a.train_dataset[0]["rejected_ids"] == tokenizer(" 80", add_special_tokens=False).input_ids + [eos]
    assert tokenizer.decode(a.train_dataset[1]["rejected_ids"]) == " green today" + EOT


def test_prompt_column_of_another_kind_is_ignored_and_the_prompt_extracted(tmp_path):
    """TRL's maybe_extract_prompt: a plain-text 'prompt' beside conversational chosen/rejected (which hold the whole
    conversation) is not the prompt; the shared leading messages are."""
    rows = preference_rows(3)
    explicit = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    mixed = [
        {
            "prompt": r["prompt"][0]["content"],
            "chosen": r["prompt"] + r["chosen"],
            "rejected": r["prompt"] + r["rejected"],
        }
        for r in rows
    ]
    a = setup_dm(write_jsonl(tmp_path / "explicit.jsonl", explicit), eval_split=None)
    b = setup_dm(write_jsonl(tmp_path / "mixed.jsonl", mixed), eval_split=None)
    assert token_rows(a.train_dataset) == token_rows(b.train_dataset)


def test_extract_prompt_rules():
    """TRL's rule (first difference; a shared prefix stops one element before the shorter side ends; the space before
    the divergence goes to the completions), plus: a divergence inside a word moves back to the word's start."""
    assert extract_prompt("The sky is blue", "The sky is green") == ("The sky is", " blue", " green")  # as TRL
    # TRL would cut inside the word: "The answer is 4" / "2." / "3.".
    assert extract_prompt("The answer is 42.", "The answer is 43.") == ("The answer is", " 42.", " 43.")
    assert extract_prompt("Q: 2+2?\n\nA: 4", "Q: 2+2?\n\nA: 5") == ("Q: 2+2?\n\nA:", " 4", " 5")
    assert extract_prompt("A:\n\nfour", "A:\n\nfive") == ("A:", "\n\nfour", "\n\nfive")
    assert extract_prompt("abc", "abd") == ("ab", "c", "d")  # no whitespace at all: TRL's cut
    assert extract_prompt("Yes", "No") == ("", "Yes", "No")
    conversation = [user("Hi"), assistant("Hello"), user("2+2?")]
    assert extract_prompt(conversation + [assistant("4")], conversation + [assistant("5")]) == (
        conversation,
        [assistant("4")],
        [assistant("5")],
    )
    # One side a prefix of the other: the prompt stops one message before the shorter side ends (TRL).
    assert extract_prompt(conversation, conversation + [assistant("4")]) == (
        conversation[:2],
        conversation[2:],
        conversation[2:] + [assistant("4")],
    )


# -- truncation ----------------------------------------------------------------------------------------------------

PROMPT = list(range(1, 11))  # 10 tokens
CHOSEN = list(range(11, 17))  # 6 tokens
REJECTED = [21, 22, 23]  # 3 tokens


def test_truncate_pair_by_hand():
    """prompt 10, chosen 6, rejected 3 tokens.
    - no limits: unchanged;
    - max_prompt_length=4: the prompt keeps its LAST 4 tokens [7..10];
    - max_completion_length=4: chosen keeps its FIRST 4 [11..14], rejected (3) is untouched;
    - max_length=12: 10 + 6 = 16 > 12, so 4 tokens leave the prompt's start: [5..10], completions untouched;
    - max_length=4: the whole prompt goes (excess 12 > 10), then completions keep their first 4 tokens;
    - all three: prompt -> [3..10] (8), chosen -> [11..14] (4), then 8 + 4 = 12 > 10 drops 2 more from the
      prompt's start -> [5..10]: 6 + 4 = 10."""
    assert truncate_pair(PROMPT, CHOSEN, REJECTED, None, None, None) == (PROMPT, CHOSEN, REJECTED)
    assert truncate_pair(PROMPT, CHOSEN, REJECTED, 4, None, None) == ([7, 8, 9, 10], CHOSEN, REJECTED)
    assert truncate_pair(PROMPT, CHOSEN, REJECTED, None, 4, None) == (PROMPT, [11, 12, 13, 14], REJECTED)
    assert truncate_pair(PROMPT, CHOSEN, REJECTED, None, None, 12) == (list(range(5, 11)), CHOSEN, REJECTED)
    assert truncate_pair(PROMPT, CHOSEN, REJECTED, None, None, 16) == (PROMPT, CHOSEN, REJECTED)
    assert truncate_pair(PROMPT, CHOSEN, REJECTED, None, None, 4) == ([], [11, 12, 13, 14], REJECTED)
    assert truncate_pair(PROMPT, CHOSEN, REJECTED, 8, 4, 10) == (list(range(5, 11)), [11, 12, 13, 14], REJECTED)
    assert truncate_pair(PROMPT, CHOSEN, REJECTED, 20, 20, 100) == (PROMPT, CHOSEN, REJECTED)


def test_prompt_truncation_keeps_the_end_of_a_conversational_prompt(tmp_path, tokenizer):
    """max_prompt_length=12: the prompt keeps its last 12 tokens, so it still ends with the question's end and the
    generation header (what the model answers after); completions are untouched."""
    question = "Please read all of this long preamble carefully and then tell me: what is 40 + 41?"
    row = {"prompt": [user(question)], "chosen": [assistant("81")], "rejected": [assistant("80")]}
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    full = setup_dm(path, eval_split=None).train_dataset[0]
    cut = setup_dm(path, eval_split=None, max_prompt_length=12).train_dataset[0]
    assert len(full["prompt_ids"]) > 12
    assert cut["prompt_ids"] == full["prompt_ids"][-12:]
    assert tokenizer.decode(cut["prompt_ids"]).endswith(f"41?{EOT}{HEADER}")
    assert (cut["chosen_ids"], cut["rejected_ids"]) == (full["chosen_ids"], full["rejected_ids"])
    assert tokenizer.decode(cut["chosen_ids"]) == "81" + EOT


def test_completion_truncation_keeps_the_start(tmp_path, tokenizer):
    """max_completion_length=3 keeps the first 3 tokens of each completion (so a long one loses its EOS); a
    completion within the limit keeps its EOS."""
    row = {"prompt": "Count:", "chosen": " one two three four", "rejected": " 1"}
    dm = setup_dm(write_jsonl(tmp_path / "c.jsonl", [row]), eval_split=None, max_completion_length=3)
    full_chosen = tokenizer(" one two three four", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    tokenized = dm.train_dataset[0]
    assert tokenized["chosen_ids"] == full_chosen[:3]
    assert tokenizer.decode(tokenized["rejected_ids"]) == " 1" + EOT
    assert tokenized["prompt_ids"] == tokenizer("Count:").input_ids


def test_max_length_trims_the_prompt_start_then_completions(tmp_path, tokenizer, caplog):
    """Builtin rows truncated to max_length=8 in the datamodule equal truncate_pair applied by hand: prompt plus
    the longer completion is at most 8 tokens, the prompt keeps its end (the generation header), the completions
    their start. With max_length=3 the prompts go entirely and the warning says so and names the fix."""
    full = setup_dm("ltpost:arithmetic-preference", max_train_samples=6, eval_split=None)
    cut = setup_dm("ltpost:arithmetic-preference", max_train_samples=6, eval_split=None, max_length=8)
    for a, b in zip(full.train_dataset, cut.train_dataset):
        expected = truncate_pair(a["prompt_ids"], a["chosen_ids"], a["rejected_ids"], None, None, 8)
        assert (b["prompt_ids"], b["chosen_ids"], b["rejected_ids"]) == expected
        assert len(b["prompt_ids"]) + max(len(b["chosen_ids"]), len(b["rejected_ids"])) == 8
        assert b["chosen_ids"] == a["chosen_ids"]  # the answers (<= 4 tokens) fit: only the prompt was cut
        assert tokenizer.decode(b["prompt_ids"]).endswith(HEADER)
    with caplog.at_level(logging.WARNING, logger="ltpost.datamodules.preference"):
        tiny = setup_dm("ltpost:arithmetic-preference", max_train_samples=6, eval_split=None, max_length=3)
    assert all(r["prompt_ids"] == [] and len(r["chosen_ids"]) <= 3 for r in tiny.train_dataset)
    assert "6 lost their whole prompt: set max_completion_length to keep room for it" in caplog.text


# -- collation -----------------------------------------------------------------------------------------------------

PAIRS = [
    {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]},
    {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8, 9]},
]


def test_collate_padding_free_hand_example():
    """Sequences in order chosen_0 [1 2 3 4], chosen_1 [6 7], rejected_0 [1 2 5], rejected_1 [6 8 9].
    shift_labels (target of each position: the next token when it is a completion token): chosen_0 [-, 3, 4, -],
    chosen_1 [7, -], rejected_0 [-, 5, -], rejected_1 [8, 9, -]. Last tokens at flat indices 3, 5, 8, 11."""
    batch = collate_preference(PAIRS, pad_token_id=0)
    x = IGNORE_INDEX
    assert set(batch) == KEYS_PADDING_FREE
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 6, 7, 1, 2, 5, 6, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2]]
    assert batch["shift_labels"].tolist() == [[x, 3, 4, x, 7, x, x, 5, x, 8, 9, x]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]]
    assert batch["sequence_ends"].tolist() == [3, 5, 8, 11]
    assert batch["num_pairs"] == 2 and type(batch["num_pairs"]) is int
    assert batch["num_tokens"] == 12 and type(batch["num_tokens"]) is int
    assert batch["chosen_lengths"].tolist() == [2, 1] and batch["rejected_lengths"].tolist() == [1, 2]
    assert batch["sequence_ends"].dtype == batch["sequence_ids"].dtype == batch["chosen_lengths"].dtype == torch.long


def test_collate_padded_hand_example():
    """Right-padded to width 4 (pad id 0): padding has attention 0, label -100, sequence id -1; sequence_ends are
    row * 4 + length - 1 = [3, 5, 10, 14]. pad_to_multiple_of=8 widens to 8: ends [3, 9, 18, 26]."""
    batch = collate_preference(PAIRS, pad_token_id=0, padding_free=False)
    x = IGNORE_INDEX
    assert set(batch) == KEYS_PADDING_FREE | {"attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0], [0, 1, 2, 0], [0, 1, 2, 0]]
    assert batch["shift_labels"].tolist() == [[x, 3, 4, x], [7, x, x, x], [x, 5, x, x], [8, 9, x, x]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0], [1, 1, -1, -1], [2, 2, 2, -1], [3, 3, 3, -1]]
    assert batch["sequence_ends"].tolist() == [3, 5, 10, 14]
    assert (batch["num_pairs"], batch["num_tokens"]) == (2, 12)
    wide = collate_preference(PAIRS, pad_token_id=7, padding_free=False, pad_to_multiple_of=8)
    assert wide["input_ids"].shape == (4, 8) and wide["input_ids"][1, 2:].eq(7).all()
    assert wide["sequence_ends"].tolist() == [3, 9, 18, 26]
    assert wide["num_tokens"] == 12


def test_collate_margin_only_when_rows_have_one():
    with_margin = [dict(pair, margin=m) for pair, m in zip(PAIRS, (0.5, 2.0))]
    batch = collate_preference(with_margin, pad_token_id=0)
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [0.5, 2.0]
    assert "margin" not in collate_preference(PAIRS, pad_token_id=0)


def test_shift_labels_are_exactly_the_completions_with_end_of_turn(tokenizer):
    """On builtin rows, the targets of sequence i decode to exactly its completion: chosen sequences to the right
    answer + '<|im_end|>' (e.g. '81<|im_end|>'), rejected ones to the wrong answer + '<|im_end|>'; no prompt token,
    no header, no padding is a target, in both layouts."""
    dm = setup_dm("ltpost:arithmetic-preference", max_train_samples=4, eval_split=None)
    rows = [dm.train_dataset[i] for i in range(4)]
    sources = preference_rows(4)
    expected = [s["answer"] + EOT for s in sources] + [s["rejected"][0]["content"] + EOT for s in sources]
    for padding_free in (True, False):
        batch = collate_preference(rows, tokenizer.pad_token_id, padding_free=padding_free)
        labels, sequence_ids = batch["shift_labels"].reshape(-1), batch["sequence_ids"].reshape(-1)
        targets = [labels[(sequence_ids == i) & (labels != IGNORE_INDEX)].tolist() for i in range(8)]
        assert [tokenizer.decode(t) for t in targets] == expected
        assert int((labels != IGNORE_INDEX).sum()) == int(
            batch["chosen_lengths"].sum() + batch["rejected_lengths"].sum()
        )
    prompt = [user("What is 40 + 41?")]
    one = {
        "prompt_ids": tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    }
    one["chosen_ids"] = tokenizer("81", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    one["rejected_ids"] = tokenizer("80", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    labels = collate_preference([one], tokenizer.pad_token_id)["shift_labels"][0]
    n = len(one["prompt_ids"]) + len(one["chosen_ids"])
    assert tokenizer.decode(labels[:n][labels[:n] != IGNORE_INDEX]) == "81<|im_end|>"


def test_padding_free_and_padded_layouts_agree(tokenizer):
    """Per sequence, both layouts hold the same tokens, targets, positions and sequence id, and sequence_ends points
    at each sequence's last token (its end-of-turn) in the flattened input_ids."""
    dm = setup_dm("ltpost:arithmetic-preference", max_train_samples=6, eval_split=None)
    rows = [dm.train_dataset[i] for i in range(6)]
    free = collate_preference(rows, tokenizer.pad_token_id, padding_free=True)
    padded = collate_preference(rows, tokenizer.pad_token_id, padding_free=False, pad_to_multiple_of=8)
    assert free["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 12
    assert len({len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows}) > 1  # padding is exercised
    mask = padded["attention_mask"].bool()
    for key in ("input_ids", "shift_labels", "position_ids", "sequence_ids"):
        assert torch.equal(padded[key][mask], free[key][0]), key
    assert padded["sequence_ids"][~mask].eq(-1).all() and padded["shift_labels"][~mask].eq(IGNORE_INDEX).all()
    for batch in (free, padded):
        flat_ids, flat_seq = batch["input_ids"].reshape(-1), batch["sequence_ids"].reshape(-1)
        ends = batch["sequence_ends"]
        assert flat_ids[ends].eq(tokenizer.eos_token_id).all()
        assert ends.tolist() == [int((flat_seq == i).nonzero().max()) for i in range(12)]
        for key in ("num_pairs", "num_tokens"):
            assert batch[key] == free[key]
        assert torch.equal(batch["chosen_lengths"], free["chosen_lengths"])
    assert free["num_tokens"] == int(mask.sum()) == free["input_ids"].shape[1]


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of completion-token log-probs per sequence, ``[2B]``, via index_add over sequence_ids."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    logits = model(**inputs, use_cache=False).logits  # [R, T, V]
    labels = batch["shift_labels"]  # [R, T]
    loss_mask = labels != IGNORE_INDEX  # [R, T]
    token_logps = selective_log_softmax(logits, labels.clamp(min=0)) * loss_mask  # [R, T]
    index = batch["sequence_ids"].clamp(min=0).reshape(-1)  # [R*T]; padding carries 0 (masked) anyway
    return torch.zeros(2 * batch["num_pairs"]).index_add(0, index, token_logps.reshape(-1))  # [2B]


def test_sequence_logps_padding_free_equal_padded_and_unbatched(tiny_model, tokenizer):
    """A real forward of the tiny model: per-sequence completion log-probs summed by sequence_ids are the same for
    the padding-free and the padded batch (<= 1e-4), and equal to scoring each sequence alone."""
    model = tiny_model.eval()
    dm = setup_dm("ltpost:arithmetic-preference", max_train_samples=4, eval_split=None)
    rows = [dm.train_dataset[i] for i in range(4)]
    free_batch = collate_preference(rows, tokenizer.pad_token_id, padding_free=True)
    # The same row read as ONE sequence (positions 0..N-1, no restarts): attention crosses sequences, so the
    # log-probs must differ, or the equalities below would prove nothing.
    leaked_batch = {**free_batch, "position_ids": torch.arange(free_batch["input_ids"].shape[1])[None]}
    with torch.no_grad():
        free = sequence_logps(model, free_batch)
        leaked = sequence_logps(model, leaked_batch)
        padded = sequence_logps(model, collate_preference(rows, tokenizer.pad_token_id, padding_free=False))
        alone = torch.stack(
            [
                sequence_logps(model, collate_preference([row], tokenizer.pad_token_id))[side]
                for side in (0, 1)
                for row in rows
            ]
        )
    assert free.shape == (8,)
    assert (free < 0).all()
    assert (free - padded).abs().max().item() <= 1e-4
    assert (free - alone).abs().max().item() <= 1e-4
    assert (free[:4] - free[4:]).abs().max().item() > 1e-3  # chosen and rejected are scored differently
    assert (free - leaked).abs().max().item() > 1e-2


# -- datamodule ----------------------------------------------------------------------------------------------------


def test_margin_column_is_passed_through(tmp_path, tokenizer):
    rows = [
        {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5", "margin": 1.5},
        {"prompt": "3 + 3 =", "chosen": " 6", "rejected": " 9", "margin": 3},
        {"prompt": "1 + 1 =", "chosen": " 2", "rejected": " 3", "margin": 0.25},
    ]
    dm = setup_dm(write_jsonl(tmp_path / "m.jsonl", rows), eval_split=None, batch_size=3)
    assert [r["margin"] for r in dm.train_dataset] == [1.5, 3.0, 0.25]
    batch = dm.collate(list(dm.train_dataset))
    assert batch["margin"].tolist() == [1.5, 3.0, 0.25] and batch["margin"].dtype == torch.float32
    assert (
        "margin"
        not in setup_dm("ltpost:arithmetic-preference", max_train_samples=2, eval_split=None).train_dataset.column_names
    )


def test_local_jsonl_folder_with_train_and_test(tmp_path, tokenizer):
    train = [
        {"prompt": "Say hi:", "chosen": " hello", "rejected": " bye"},
        {"prompt": "7 + 8 =", "chosen": " 15", "rejected": " 16"},
    ]
    test = [{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 22"}]
    write_jsonl(tmp_path / "data" / "train.jsonl", train)
    write_jsonl(tmp_path / "data" / "test.jsonl", test)
    dm = setup_dm(str(tmp_path / "data"))
    for dataset, source in ((dm.train_dataset, train), (dm.eval_dataset, test)):
        assert [
            (tokenizer.decode(r["prompt_ids"]), tokenizer.decode(r["chosen_ids"]), tokenizer.decode(r["rejected_ids"]))
            for r in dataset
        ] == [(s["prompt"], s["chosen"] + EOT, s["rejected"] + EOT) for s in source]


def test_dataloaders_batch_pairs(tokenizer):
    """10 pairs, batch_size 4: train batches of 4, 4, 2 pairs (8, 8, 4 sequences) covering every pair once; the
    validation loader uses eval_batch_size; padded layout when padding_free=False."""
    dm = setup_dm(
        "ltpost:arithmetic-preference", max_train_samples=10, max_eval_samples=5, batch_size=4, eval_batch_size=5
    )
    batches = list(dm.train_dataloader())
    assert [b["num_pairs"] for b in batches] == [4, 4, 2]
    assert [b["sequence_ends"].numel() for b in batches] == [8, 8, 4]
    assert sum(b["num_tokens"] for b in batches) == sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in dm.train_dataset
    )
    assert [b["num_pairs"] for b in dm.val_dataloader()] == [5]
    assert [b["num_pairs"] for b in dm.test_dataloader()] == [5]
    padded = setup_dm(
        "ltpost:arithmetic-preference", max_train_samples=4, eval_split=None, padding_free=False, batch_size=4
    )
    batch = next(iter(padded.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and "attention_mask" in batch
    assert padded.val_dataloader() == []


def test_tokenizer_defaults_to_the_module_model():
    dm = PreferenceDataModule("ltpost:arithmetic-preference", max_train_samples=2, eval_split=None)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(model_name="ltpost:tiny-llama"))
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and dm.tokenizer.eos_token == EOT
    with pytest.raises(ValueError, match="has no tokenizer: pass tokenizer=... or attach it to a trainer"):
        PreferenceDataModule(max_train_samples=2).setup("fit")


# -- input errors: each message names the problem and the fix ------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "hint"),
    [
        ({"prompt": "a", "completion": " b"}, r"looks like supervised data: use SFTDataModule"),
        ({"prompt": "a", "chosen": " b"}, r"needs both a 'chosen' and a 'rejected' column"),
        ({"question": "a", "response_a": " b", "response_b": " c"}, r"Rename the columns .*'response_a' -> 'chosen'"),
    ],
)
def test_missing_columns(tmp_path, row, hint):
    columns = re.escape(str(list(row)))
    message = rf"columns {columns} match no known format\. Expected 'prompt' \+ 'chosen' \+ 'rejected'.*{hint}"
    with pytest.raises(ValueError, match=message):
        setup_dm(write_jsonl(tmp_path / "bad.jsonl", [row]), eval_split=None)


def test_empty_split(tmp_path):
    message = r"Split 'train' of dataset .* is empty: it has no rows to train on\. Check the dataset path, the split"
    with pytest.raises(ValueError, match=message):
        setup_dm("ltpost:arithmetic-preference", max_train_samples=0, eval_split=None)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"Split 'train' of dataset .* is empty"):
        setup_dm(str(tmp_path / "empty.jsonl"), eval_split=None)


def test_no_completion_token_left_after_truncation(tmp_path, caplog):
    """'Yes' / 'No' share nothing, so the prompt is empty (this tokenizer adds no BOS) and the first completion token
    is predicted from nothing; with max_completion_length=1 nothing else is left, so no token carries loss. With a
    longer limit, a pair keeps its EOS target; mixed data drops only the pairs left with nothing."""
    rows = [{"chosen": "Yes", "rejected": "No"}, {"chosen": "Sure", "rejected": "Never"}]
    path = write_jsonl(tmp_path / "yn.jsonl", rows)
    assert extract_prompt("Yes", "No") == ("", "Yes", "No")
    message = (
        r"No pair of split 'train' keeps a completion token that carries loss after truncation "
        r"\(max_prompt_length=None, max_completion_length=1, max_length=1024; prompts as short as 0 tokens\)\. "
        r"Raise max_completion_length / max_length, or give the pairs a non-empty prompt"
    )
    with pytest.raises(ValueError, match=message):
        setup_dm(path, eval_split=None, max_completion_length=1)
    assert len(setup_dm(path, eval_split=None, max_completion_length=2).train_dataset) == 2
    explicit = [{"prompt": "", **row} for row in rows] + [{"prompt": "Ok?", "chosen": " yes", "rejected": " no"}]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", explicit)
    with caplog.at_level(logging.WARNING, logger="ltpost.datamodules.preference"):
        kept = setup_dm(mixed, eval_split=None, max_completion_length=1).train_dataset
    assert len(kept) == 1 and "Dropped 2 pairs of split 'train' with no loss token left" in caplog.text
    assert "lost their whole prompt" not in caplog.text  # the prompts were empty to begin with


def test_conversational_data_needs_a_chat_template(tmp_path, tokenizer):
    from ltpost.models import load_tokenizer

    folder = tmp_path / "plain-tokenizer"
    tokenizer.save_pretrained(str(folder))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(folder)).chat_template is None
    message = r"is conversational but the tokenizer has no chat template\. Set data\.init_args\.chat_template"
    with pytest.raises(ValueError, match=message):
        setup_dm("ltpost:arithmetic-preference", tokenizer=str(folder), max_train_samples=2, eval_split=None)
    fixed = setup_dm(
        "ltpost:arithmetic-preference", tokenizer=str(folder), chat_template=tokenizer.chat_template,
        max_train_samples=2, eval_split=None,
    )  # fmt: skip
    assert tokenizer.decode(fixed.train_dataset[0]["chosen_ids"]) == preference_rows(1)[0]["answer"] + EOT


def test_chat_template_whose_generation_prompt_is_not_a_prefix(tmp_path):
    """A template whose generation prompt ('<|im_start|>assistant\\n') differs from how it opens an assistant turn
    ('<|im_start|>bot\\n'): the completion cannot be located, and the error says why and what to change."""
    template = (
        "{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    message = r"does not render the prompt .* as a token prefix of prompt \+ chosen.*data\.init_args\.chat_template"
    with pytest.raises(ValueError, match=message):
        setup_dm("ltpost:arithmetic-preference", chat_template=template, max_train_samples=2, eval_split=None)


def test_identical_chosen_and_rejected(tmp_path, caplog):
    """All pairs identical: an error naming the problem and the fixes. Some identical: they are dropped with a
    warning. Pairs that differ only past max_completion_length become identical after truncation too."""
    same = [{"prompt": "Q:", "chosen": " a", "rejected": " a"}, {"prompt": "R:", "chosen": " b", "rejected": " b"}]
    message = (
        r"In every pair of split 'train' the chosen and rejected tokens are identical \(after truncation\), so there "
        r"is no preference to learn\. Check that 'chosen' and 'rejected' are different columns"
    )
    with pytest.raises(ValueError, match=message):
        setup_dm(write_jsonl(tmp_path / "same.jsonl", same), eval_split=None)
    late = [{"prompt": "Q:", "chosen": " one two three", "rejected": " one two four"}]
    with pytest.raises(ValueError, match=r"differ only past the limit, raise max_completion_length / max_length"):
        setup_dm(write_jsonl(tmp_path / "late.jsonl", late), eval_split=None, max_completion_length=2)
    mixed = same + [{"prompt": "S:", "chosen": " c", "rejected": " d"}]
    with caplog.at_level(logging.WARNING, logger="ltpost.datamodules.preference"):
        dm = setup_dm(write_jsonl(tmp_path / "mixed.jsonl", mixed), eval_split=None)
    assert len(dm.train_dataset) == 1 and dm.tokenizer.decode(dm.train_dataset[0]["chosen_ids"]) == " c" + EOT
    assert "Dropped 2 of 3 pairs of split 'train' whose chosen and rejected are identical" in caplog.text


def test_missing_margin_value(tmp_path):
    rows = [
        {"prompt": "Q:", "chosen": " a", "rejected": " b", "margin": 1.0},
        {"prompt": "Q:", "chosen": " a", "rejected": " c", "margin": None},
    ]
    with pytest.raises(
        ValueError, match=r"'margin' column has a missing value; fill it \(e\.g\. 0\.0\) or remove the column"
    ):
        setup_dm(write_jsonl(tmp_path / "m.jsonl", rows), eval_split=None)


def test_constructor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PreferenceDataModule(batch_size=0)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        PreferenceDataModule(max_length=1)
    with pytest.raises(ValueError, match="max_prompt_length must be >= 1"):
        PreferenceDataModule(max_prompt_length=0)
    with pytest.raises(ValueError, match="max_completion_length must be >= 1"):
        PreferenceDataModule(max_completion_length=0)
