"""The policy's weights as a Hugging Face checkpoint would name them: what a vLLM engine loads.

``hf_weights(model)`` yields ``(name, tensor)`` for every parameter of the policy under the base model's names,
full (unsharded) tensors:

- LoRA (PEFT): inside ``merged_adapters(model)`` the base weights hold ``W + scale * B A``; the PEFT prefixes
  (``base_model.model.``, ``.base_layer``, ``.modules_to_save.default``) are stripped and the adapter matrices
  skipped, so the names are the base model's. ``merged_adapters`` unmerges on exit, errors included.
- FSDP2: a ``DTensor`` is gathered with ``full_tensor()`` (a collective: every rank must iterate, in the same order).
- FSDP1: the root's ``summon_full_params`` around the whole iteration (``ltpost.strategies.gathered_fsdp1``).
- DeepSpeed ZeRO-3: partitioned parameters (those with a ``ds_id``) are gathered with
  ``deepspeed.zero.GatheredParameters`` around the whole iteration (``gathered_zero3``), imported only then.

Tied parameters are yielded once, under their first name (``named_parameters`` removes duplicates), which is the
name the engine loads them by (``model.embed_tokens.weight`` for a tied Llama/Qwen head).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from ltpost.strategies import base_model, gathered_fsdp1

PEFT_PREFIX = "base_model.model."


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "merge_adapter") and hasattr(model, "peft_config")


def hf_name(name: str) -> str | None:
    """The base model's name for a (PEFT) parameter name, or None for a parameter the base model does not have
    (LoRA matrices, DoRA magnitudes, the frozen originals of ``modules_to_save``)."""
    if "lora_" in name or ".original_module." in name:
        return None
    name = name.replace("_fsdp_wrapped_module.", "").removeprefix(PEFT_PREFIX)  # FSDP1 wraps each layer
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


@contextmanager
def merged_adapters(model: torch.nn.Module):
    """The LoRA adapters merged into the base weights for the duration of the block, unmerged afterwards (also on
    error). A no-op for a model without adapters. Merging and unmerging round in floating point: the base weights
    come back equal to about 1e-7 relative, not bit for bit (measured and tested)."""
    if not is_peft_model(model):
        yield model
        return
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()


def _zero3_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextmanager
def gathered_zero3(model: torch.nn.Module):
    """DeepSpeed ZeRO-3: every partitioned parameter gathered (read-only) for the duration of the block; nothing
    without ZeRO-3. Costs a full copy of the model on each rank while it lasts, as merging adapters needs the
    base and adapter weights together."""
    params = _zero3_params(model)
    if not params:
        yield
        return
    import deepspeed  # only a ZeRO-3 run gets here, and it has deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def full_tensor(tensor: Tensor) -> Tensor:
    """An FSDP2 ``DTensor`` gathered into a plain tensor (a collective); any other tensor unchanged."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` for every parameter, named as in the base model's checkpoint, full and detached.

    Use it inside ``merged_adapters(model)`` (and ``gathered_zero3(model)`` under ZeRO-3) so adapters are folded in.
    Under FSDP2 every rank must consume the iterator (each ``full_tensor`` is an all-gather).
    """
    for name, param in model.named_parameters():
        target = hf_name(name)
        if target is not None:
            yield target, full_tensor(param.detach())


@contextmanager
def policy_weights(model: torch.nn.Module, root: torch.nn.Module | None = None):
    """``hf_weights(model)`` with the adapters merged and ZeRO-3 parameters gathered while the block runs; under
    FSDP1 pass its root (``trainer.strategy.model``), whose parameters are then all gathered (a full copy per rank
    while the block lasts)."""
    with gathered_fsdp1(root), gathered_zero3(model), merged_adapters(model):
        yield hf_weights(model)


def save_safetensors(weights: Iterator[tuple[str, Tensor]], folder: str | Path) -> Path:
    """Write ``weights`` to ``folder/model.safetensors`` (CPU, contiguous copies), for an engine in another process.
    Returns the file. The file is written beside and renamed into place, so a reader never sees half of it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in weights}
    target = folder / "model.safetensors"
    staging = folder / ".model.safetensors.tmp"
    save_file(tensors, str(staging), metadata={"format": "pt"})
    staging.replace(target)
    return target


def save_engine_folder(model: torch.nn.Module, tokenizer, folder: str | Path) -> Path:
    """A Hugging Face folder vLLM can start from: the base model's config and generation config, the tokenizer, and
    the policy's current weights (adapters merged) under their checkpoint names.

    Written from the policy itself rather than copied from where it was loaded: the engine then starts from exactly
    the trainer's weights, and a checkpoint whose tied embedding is stored under the head's name (as
    ``safetensors.torch.save_model`` writes it, e.g. the shipped ``ltpost:tiny-llama-sft``) does not reach vLLM,
    which would load it without its input embedding.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_model(model)
    base.config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with policy_weights(model) as weights:
        save_safetensors(weights, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)  # the engine gets the merged weights in the policy's dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


__all__ = [
    "base_model",
    "full_tensor",
    "gathered_zero3",
    "hf_name",
    "hf_weights",
    "is_peft_model",
    "merged_adapters",
    "policy_weights",
    "save_engine_folder",
    "save_safetensors",
]
