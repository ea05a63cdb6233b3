"""The embedded default: a tiny tokenizer, tiny model configs and synthetic tasks, all usable offline.

Built-in names start with ``ltpost:`` (a colon never appears in a Hugging Face hub id, so the names cannot
collide): ``ltpost:tiny-llama`` for a model, ``ltpost:arithmetic`` (and friends, see ``tasks.TASKS``) for a
dataset. A built-in model is materialized once into a local folder (config, seeded random weights, tokenizer)
under ``$LTPOST_CACHE`` (default ``~/.cache/ltpost``) and then loaded with ``from_pretrained`` like any other
local checkpoint, so the real loading code is the only loading code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from ltpost.assets.tasks import TASKS, load_task, make_rows

BUILTIN_PREFIX = "ltpost:"
TOKENIZER_DIR = Path(__file__).parent / "tokenizer"


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """About 3.1M parameters: hidden 256, 4 layers, 4 heads (2 KV heads), tied embeddings, 565-token vocabulary."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


BUILTIN_MODELS = {"tiny-llama": (tiny_llama_config, LlamaForCausalLM)}

# Trained checkpoints shipped inside the package (complete Hugging Face folders, weights stored in float16).
# ``tiny-llama-sft``: what configs/sft.yaml exports (``tiny-llama`` after 1,500 SFT steps on ``ltpost:arithmetic``,
# 19.5% held-out exact match), the starting point of configs/grpo.yaml and configs/rloo.yaml; rebuilt by
# ``python -m ltpost.assets.ship_checkpoint`` (its docstring has the commands).
CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
SHIPPED_CHECKPOINTS = ("tiny-llama-sft",)


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_name(name: str) -> str:
    return name[len(BUILTIN_PREFIX) :]


def load_builtin_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def cache_dir() -> Path:
    return Path(os.environ.get("LTPOST_CACHE", Path.home() / ".cache" / "ltpost"))


def materialize_builtin_model(name: str, seed: int = 0) -> Path:
    """The local folder holding built-in model ``name`` (e.g. ``ltpost:tiny-llama``), created on first use.

    A shipped checkpoint (``ltpost:tiny-llama-sft``) is already a folder inside the package and is returned as is.

    Weights are a seeded random init, so every machine materializes the same checkpoint. Creation writes to a
    temporary folder and renames it into place, so concurrent ranks never see a half-written folder.
    """
    short = builtin_name(name)
    if short in SHIPPED_CHECKPOINTS:
        return CHECKPOINTS_DIR / short
    if short not in BUILTIN_MODELS:
        available = [*BUILTIN_MODELS, *SHIPPED_CHECKPOINTS]
        raise ValueError(
            f"Unknown built-in model {name!r}. Available: {', '.join(BUILTIN_PREFIX + n for n in available)}."
        )
    make_config, model_class = BUILTIN_MODELS[short]
    tokenizer = load_builtin_tokenizer()
    config = make_config(tokenizer)
    # The folder name carries a digest of the config and tokenizer, so changing either (a new ltpost version)
    # never silently loads a stale checkpoint whose vocabulary no longer matches.
    digest = hashlib.sha256(config.to_json_string().encode() + (TOKENIZER_DIR / "tokenizer.json").read_bytes())
    target = cache_dir() / "models" / f"{short}-seed{seed}-{digest.hexdigest()[:10]}"
    if (target / "config.json").exists():
        return target
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{short}-", dir=target.parent))
    # Not model.save_pretrained: under an initialized process group transformers writes only on global rank 0,
    # and ranks of another node (with a node-local cache) would wait forever. Every rank can write its own copy.
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})  # dedupes the tied weights
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = [
    "BUILTIN_PREFIX",
    "TASKS",
    "is_builtin",
    "load_builtin_tokenizer",
    "load_task",
    "make_rows",
    "materialize_builtin_model",
    "tiny_llama_config",
]
