"""Small helpers shared by tests: a quiet CPU trainer and held-out exact match on the arithmetic task."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer

from ltpost.assets import make_rows


def cpu_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    return Trainer(**{**defaults, **kwargs})


@torch.no_grad()
def arithmetic_exact_match(model, tokenizer, num_rows: int = 200) -> float:
    """Fraction of held-out sums the model answers exactly with greedy decoding."""
    rows = make_rows("arithmetic", "test", num_rows=num_rows)
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:1], tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for r in rows
    ]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return sum(text.strip() == row["answer"] for text, row in zip(texts, rows)) / len(rows)
