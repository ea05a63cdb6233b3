"""Rebuild the shipped ``ltpost:tiny-llama-sft`` checkpoint from the embedded SFT run.

    python -m ltpost fit --config configs/sft.yaml                 # exports outputs/sft-arithmetic
    python -m ltpost.assets.ship_checkpoint outputs/sft-arithmetic

The SFT run (a few minutes on CPU) leaves a model that half-knows the task: it writes the tens and hundreds of a
sum right (95% of held-out sums) but mostly guesses the units digit, so it answers 19.5% of held-out sums exactly
(greedy), samples the right answer 10% of the time at temperature 1, and has it among 8 samples for 56% of the
prompts. That leaves online RL a reward to find and something to learn (configs/grpo.yaml takes it to about 50%).
The second command copies the export (a Hugging Face folder, or a Lightning ``.ckpt`` of an ``SFTModule`` on
``ltpost:tiny-llama``) into ``ltpost/assets/checkpoints/tiny-llama-sft`` with the weights in float16 (6 MB
instead of 12; loading casts them back to float32) and prints the held-out exact match before and after the cast.
Float results depend on the machine (thread count, BLAS), so a rebuilt checkpoint is close to, not bit-equal with,
the shipped one.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM

from ltpost.assets import CHECKPOINTS_DIR, load_builtin_tokenizer, materialize_builtin_model
from ltpost.assets.evaluation import arithmetic_exact_match


def load_source(source: str) -> torch.nn.Module:
    """The causal LM in ``source``: a Lightning ``.ckpt`` of an ``SFTModule`` on ``ltpost:tiny-llama``, or a Hugging
    Face folder."""
    if not source.endswith(".ckpt"):
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(materialize_builtin_model("ltpost:tiny-llama"), dtype=torch.float32)
    state = torch.load(source, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=False)  # tied lm_head may be absent from the state dict
    missing = set(model.state_dict()) - set(weights) - {"lm_head.weight"}
    if missing:
        raise ValueError(f"{source} is not a checkpoint of ltpost:tiny-llama: it lacks {sorted(missing)[:3]}...")
    return model


def ship(source: str, name: str = "tiny-llama-sft") -> Path:
    tokenizer = load_builtin_tokenizer()
    model = load_source(source)
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
    parser.add_argument(
        "source", help="a Lightning .ckpt of the SFT run, or a Hugging Face folder (HFExport's dirpath)"
    )
    parser.add_argument("--name", default="tiny-llama-sft")
    args = parser.parse_args()
    ship(args.source, args.name)
