"""Rebuild the shipped ``ltpost:tiny-llama-sft`` checkpoint from an SFT export.

    python -m ltpost fit --config configs/sft.yaml --trainer.max_steps=800
    python -m ltpost.assets.ship_checkpoint outputs/sft-arithmetic

The first command is the embedded SFT run stopped early (its cosine schedule shortened to 800 steps), which leaves
a model that half-knows the task; the second copies its export into ``ltpost/assets/checkpoints/tiny-llama-sft``
with the weights in float16 (6 MB instead of 12; loading casts them back to float32) and prints the held-out exact
match before and after the cast. Runs on CPU in about two minutes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM

from ltpost.assets import CHECKPOINTS_DIR, load_builtin_tokenizer
from ltpost.assets.evaluation import arithmetic_exact_match


def ship(source: str, name: str = "tiny-llama-sft") -> Path:
    tokenizer = load_builtin_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    before = arithmetic_exact_match(model, tokenizer)
    target = CHECKPOINTS_DIR / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CHECKPOINTS_DIR.parent))
    model.to(torch.float16)
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(target)
    after = arithmetic_exact_match(AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32), tokenizer)
    print(f"held-out exact match: {before:.3f} in float32, {after:.3f} shipped (float16) -> {target}")
    return target


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="an SFT export folder (HFExport's dirpath), e.g. outputs/sft-arithmetic")
    parser.add_argument("--name", default="tiny-llama-sft")
    args = parser.parse_args()
    ship(args.source, args.name)
