"""Regenerate the embedded tokenizer in ``ltpost/assets/tokenizer/`` (run: ``python -m ltpost.assets.build_tokenizer``).

A byte-level BPE (so any text round-trips) trained in a few seconds on the synthetic tasks plus a short English
corpus, wrapped in ``PreTrainedTokenizerFast`` with a ChatML-style chat template. The assistant turn, end-of-turn
token included, sits inside ``{% generation %}`` so ``return_assistant_tokens_mask`` yields assistant-only loss
masks. No whitespace is emitted between turns, so a rendered prompt (with the generation prompt) is an exact token
prefix of the rendered prompt + completion. Digits are single tokens. The output is committed; this script
documents how it was made.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ltpost.assets.tasks import QUESTION_TEMPLATES, make_rows

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

ENGLISH = """\
You are a helpful assistant. Answer the question with a single number. Think step by step before you answer.
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones before it.
Supervised fine-tuning teaches a model to follow instructions; preference optimization teaches it which of two
answers people prefer; reinforcement learning with verifiable rewards teaches it to be right. Training runs can
be healthy or sick: the loss falls, the reward rises, the entropy should not collapse. <think> </think>
<answer> </answer> user assistant system\nuser\nassistant\nsystem\n Let me think. The answer is. First, second, third. Yes, no, maybe. Hello, world!
"""


def training_corpus() -> list[str]:
    texts = [ENGLISH] * 20 + [t.format(a=a, b=b) for t in QUESTION_TEMPLATES for a in range(0, 200, 7) for b in (3, 50)]
    texts += [str(n) for n in range(1000)] * 5
    for task in ("arithmetic-text", "arithmetic-completion"):
        for row in make_rows(task, "train", num_rows=2000):
            texts.append(row.get("text") or row["prompt"] + row["completion"])
    return texts


def build() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    # Digits are split one per token (as Llama and Qwen do): with whole numbers as single tokens, held-out sums
    # are a grokking problem the tiny model does not solve in a CPU-sized run (measured: 1% exact after 600 steps).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token=None,
        model_max_length=2048,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    return wrapped


if __name__ == "__main__":
    built = build()
    built.save_pretrained(TOKENIZER_DIR)
    print(f"saved {len(built)} tokens to {TOKENIZER_DIR}")
