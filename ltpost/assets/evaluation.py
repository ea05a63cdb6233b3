"""Held-out exact match on the embedded arithmetic task: the number the embedded default's runs are judged by."""

from __future__ import annotations

import torch

from ltpost.assets.tasks import make_rows


@torch.no_grad()
def arithmetic_exact_match(model, tokenizer, num_rows: int = 200, seed: int = 0) -> float:
    """Fraction of the first ``num_rows`` held-out sums (test split) the model answers exactly, greedy decoding."""
    rows = make_rows("arithmetic", "test", num_rows=num_rows, seed=seed)
    prompts = [
        tokenizer.apply_chat_template(r["messages"][:1], tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        for r in rows
    ]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
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
