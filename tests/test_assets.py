"""The embedded default: synthetic tasks, the byte-level tokenizer with its chat template, the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ltpost import assets
from ltpost.assets import TASKS, load_task, make_rows, materialize_builtin_model
from ltpost.assets.tasks import DEFAULT_ROWS

EOT = "<|im_end|>"


def text_pairs(split: str) -> list[tuple[int, int, int]]:
    """(a, b, c) from every 'a + b = c' row of the arithmetic-text split."""
    triples = []
    for row in make_rows("arithmetic-text", split):
        match = re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", row["text"])
        assert match, row["text"]
        triples.append(tuple(int(g) for g in match.groups()))
    return triples


# -- tasks -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_tasks_are_deterministic(task, split):
    """Same task, split and seed: the same rows, as plain dicts and as a datasets.Dataset; another seed differs."""
    first = make_rows(task, split, num_rows=50)
    assert len(first) == 50
    assert make_rows(task, split, num_rows=50) == first
    assert load_task(task, split, num_rows=50).to_list() == first
    assert make_rows(task, split, num_rows=50, seed=1) != first


def test_default_split_sizes_and_columns():
    sizes = {split: len(load_task("arithmetic", split)) for split in ("train", "test")}
    assert sizes == DEFAULT_ROWS == {"train": 4000, "test": 200}
    columns = {task: sorted(load_task(task, "test", num_rows=2).column_names) for task in TASKS}
    assert columns == {
        "arithmetic": ["answer", "messages"],
        "arithmetic-completion": ["completion", "prompt"],
        "arithmetic-text": ["text"],
        "arithmetic-preference": ["answer", "chosen", "prompt", "rejected"],
        "arithmetic-prompts": ["answer", "prompt"],
    }


def test_train_and_test_share_no_pair_and_sums_are_right():
    """Parsed from 'a + b = c': c = a + b on every row; no (a, b) is in both splits; the 200 test rows are 200
    distinct pairs (the held-out pool, ~10% of 100 x 100, is not exhausted)."""
    train, test = text_pairs("train"), text_pairs("test")
    assert len(train) == 4000 and len(test) == 200
    assert all(c == a + b and 0 <= a <= 99 and 0 <= b <= 99 for a, b, c in train + test)
    train_pairs, test_pairs = {(a, b) for a, b, _ in train}, {(a, b) for a, b, _ in test}
    assert train_pairs.isdisjoint(test_pairs)
    assert len(test_pairs) == 200
    assert len(train_pairs) == 4000


def test_all_tasks_use_the_same_pairs():
    """For a split and seed every task is built from the same (a, b) sequence: the completion prompt and the
    text row agree, and the conversational answer is their sum."""
    text = text_pairs("test")[:30]
    completion = make_rows("arithmetic-completion", "test", num_rows=30)
    chat = make_rows("arithmetic", "test", num_rows=30)
    for (a, b, c), pc, conversation in zip(text, completion, chat):
        assert pc == {"prompt": f"{a} + {b} =", "completion": f" {c}"}
        assert conversation["answer"] == conversation["messages"][1]["content"] == str(c)
        assert [int(n) for n in re.findall(r"\d+", conversation["messages"][0]["content"])] == [a, b]


@pytest.mark.parametrize("split", ["train", "test"])
def test_preference_rows(split):
    """chosen is the correct sum of the two numbers in the question, rejected a clearly wrong one: an integer in
    [0, 198] (the range of sums) at least 5 away from the correct sum."""
    rows = make_rows("arithmetic-preference", split, num_rows=300)
    for row in rows:
        a, b = (int(n) for n in re.findall(r"\d+", row["prompt"][0]["content"]))
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"] == [{"role": "assistant", "content": str(a + b)}]
        assert row["answer"] == str(a + b)
        rejected = row["rejected"][0]["content"]
        assert row["rejected"][0]["role"] == "assistant"
        assert rejected != row["chosen"][0]["content"]
        assert 0 <= int(rejected) <= 198 and abs(int(rejected) - (a + b)) >= 5


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="Unknown built-in task 'nope'. Available: arithmetic, "):
        make_rows("nope", "train")
    message = "Unknown split 'validation' for built-in task 'arithmetic'. Available: train, test"
    with pytest.raises(ValueError, match=message):
        make_rows("arithmetic", "validation")


# -- tokenizer ---------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<|pad|>", "<|endoftext|>", "<|im_start|>", EOT]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.eos_token) == (0, 3, EOT)
    assert tokenizer.bos_token_id is None
    # no BOS prepended, no EOS appended: special tokens appear only where a template writes them
    assert tokenizer("1 + 2 =").input_ids == tokenizer("1 + 2 =", add_special_tokens=False).input_ids


@pytest.mark.parametrize(
    "text",
    [
        "What is 40 + 41?",
        "12345 + 67890 = 80235",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\n\n",
        "Unicode: héllo wörld ✓ 你好 🙂",
        "<|im_start|>user\nhi<|im_end|>",
        "",
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    """Byte-level BPE: decode(encode(s)) == s for any string, special tokens included."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_special_tokens_are_single_ids(tokenizer):
    assert tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids[0] == 2
    assert tokenizer("<|im_start|>user\nhi<|im_end|>").input_ids[-1] == tokenizer.eos_token_id


def test_rendered_prompt_is_a_token_prefix_of_prompt_plus_answer(tokenizer):
    """Rendering the user turn with add_generation_prompt=True gives exactly the first tokens of the rendered
    user + assistant conversation; the rest is the answer and the end-of-turn token."""
    for row in make_rows("arithmetic", "train", num_rows=40):
        prompt = tokenizer.apply_chat_template(
            row["messages"][:1], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert full[: len(prompt)] == prompt
        assert tokenizer.decode(full[len(prompt) :]) == row["answer"] + EOT
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>system\nS<|im_end|><|im_start|>user\nU<|im_end|><|im_start|>assistant\nA<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>system\nS<|im_end|><|im_start|>user\nU<|im_end|><|im_start|>assistant\n"


# -- tiny model --------------------------------------------------------------------------------------------------

# vocab 565 x hidden 256 embedding (tied with lm_head)      =   144,640
# per layer: q 256x256 + k, v 256x128 (2 KV heads of 64) + o 256x256 = 196,608
#            MLP gate, up, down 3 x 256 x 704               =   540,672
#            two RMSNorms 2 x 256                           =       512
# 4 layers x 737,792 = 2,951,168; final norm 256; total     = 3,096,064
TINY_LLAMA_PARAMETERS = 3_096_064


def test_materialize_builtin_model_creates_a_loadable_folder(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("LTPOST_CACHE", str(tmp_path / "cache"))
    folder = materialize_builtin_model("ltpost:tiny-llama")
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("tiny-llama-seed0-")
    assert (folder / "config.json").exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == TINY_LLAMA_PARAMETERS
    assert 3.0e6 < n_params < 3.2e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tokenizer) == 565
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    saved_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert saved_tokenizer.chat_template == tokenizer.chat_template
    assert saved_tokenizer("7 + 8 = 15").input_ids == tokenizer("7 + 8 = 15").input_ids

    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("1 + 2 =").input_ids])).logits
    assert logits.shape == (1, 5, 565) and torch.isfinite(logits).all()  # "1", " +", " ", "2", " ="


def test_materialize_is_cached_and_seeded(tmp_path, monkeypatch):
    """A second call reuses the folder untouched; another cache gets bit-identical weights (seeded init);
    another seed gets different weights."""
    monkeypatch.setenv("LTPOST_CACHE", str(tmp_path / "a"))
    folder_a = materialize_builtin_model("ltpost:tiny-llama")
    weights = next(folder_a.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert materialize_builtin_model("ltpost:tiny-llama") == folder_a
    assert weights.stat().st_mtime_ns == stamp

    monkeypatch.setenv("LTPOST_CACHE", str(tmp_path / "b"))
    folder_b = materialize_builtin_model("ltpost:tiny-llama")
    folder_seed1 = materialize_builtin_model("ltpost:tiny-llama", seed=1)
    assert folder_seed1.name.startswith("tiny-llama-seed1-")
    state_a = AutoModelForCausalLM.from_pretrained(folder_a).state_dict()
    state_b = AutoModelForCausalLM.from_pretrained(folder_b).state_dict()
    state_1 = AutoModelForCausalLM.from_pretrained(folder_seed1).state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["model.embed_tokens.weight"], state_1["model.embed_tokens.weight"])


def test_a_changed_config_never_reuses_a_stale_folder(tmp_path, monkeypatch):
    """The folder name carries a digest of config + tokenizer: a different config materializes a new folder."""
    monkeypatch.setenv("LTPOST_CACHE", str(tmp_path))
    original = materialize_builtin_model("ltpost:tiny-llama")
    make_config, model_class = assets.BUILTIN_MODELS["tiny-llama"]

    def wider(tokenizer):
        config = make_config(tokenizer)
        config.intermediate_size = 512
        return config

    monkeypatch.setitem(assets.BUILTIN_MODELS, "tiny-llama", (wider, model_class))
    changed = materialize_builtin_model("ltpost:tiny-llama")
    assert changed != original
    assert AutoModelForCausalLM.from_pretrained(changed).config.intermediate_size == 512


def test_materialize_does_not_disturb_the_global_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("LTPOST_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    materialize_builtin_model("ltpost:tiny-llama")
    assert torch.equal(torch.rand(3), expected)


def test_unknown_builtin_model():
    with pytest.raises(ValueError, match=r"Unknown built-in model 'ltpost:tiny-gpt'\. Available: ltpost:tiny-llama"):
        materialize_builtin_model("ltpost:tiny-gpt")
    assert assets.is_builtin("ltpost:tiny-llama") and not assets.is_builtin("meta-llama/Llama-3.2-1B")


def test_shipped_sft_checkpoint_half_knows_the_task(tokenizer):
    """ltpost:tiny-llama-sft is shipped inside the package (no materialization), loads like any Hugging Face folder
    and answers a fraction of held-out sums: above a random model's 0 and far from solved (measured 0.195), the
    starting point online RL needs."""
    from ltpost.assets.evaluation import arithmetic_exact_match
    from ltpost.models import load_model

    path = materialize_builtin_model("ltpost:tiny-llama-sft")
    assert Path(path).is_relative_to(Path(assets.__file__).parent)
    assert (Path(path) / "model.safetensors").stat().st_size < 8_000_000  # float16: a few MB of package data
    exact = arithmetic_exact_match(load_model("ltpost:tiny-llama-sft"), tokenizer)
    assert 0.12 <= exact <= 0.3, exact


def test_ship_checkpoint_writes_a_float16_folder_that_loads_back(tmp_path, monkeypatch):
    """ship() from an SFT export: weights in float16 on disk, loaded back in float32 with the same greedy answers as
    the source up to the cast, and the tokenizer (chat template included) beside them."""
    import safetensors.torch

    from ltpost.assets import ship_checkpoint
    from ltpost.models import load_model

    source = tmp_path / "export"
    load_model("ltpost:tiny-llama").save_pretrained(source)
    monkeypatch.setattr(ship_checkpoint, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    target = ship_checkpoint.ship(str(source), name="shipped-test")
    assert target == tmp_path / "checkpoints" / "shipped-test"
    weights = safetensors.torch.load_file(target / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float16}
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor.half().float())
    assert AutoTokenizer.from_pretrained(target).chat_template
