"""AdamW with transformers' warmup schedules, shared by every module's ``configure_optimizers``."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import get_scheduler


def configure_adamw(
    model: torch.nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    adam_beta1: float,
    adam_beta2: float,
    adam_epsilon: float,
    lr_scheduler_type: str,
    warmup_steps: int,
    warmup_ratio: float,
    total_steps: int | float,
) -> dict[str, Any]:
    """Lightning's optimizer dict: AdamW (no decay on biases and norms) and a per-step warmup schedule.

    ``warmup_steps`` wins over ``warmup_ratio`` when positive; ``total_steps`` is the trainer's
    ``estimated_stepping_batches``.
    """
    # Biases and norm weights are told apart by name and module class, not by ``param.ndim < 2``: a sharded
    # parameter's local shape is not its shape (FSDP1's flat views and ZeRO-3's partitions are all 1-D), and a
    # shape rule would silently move every weight out of weight decay there.
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_norm or name == "bias" or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (LoRA trains no norm): DeepSpeed drops empty groups, and the scheduler then has one too many.
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=learning_rate,
        betas=(adam_beta1, adam_beta2),
        eps=adam_epsilon,
    )
    warmup = warmup_steps or math.ceil(warmup_ratio * total_steps)
    scheduler = get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adamw_from_hparams(model: torch.nn.Module, hp, total_steps: int | float) -> dict[str, Any]:
    """``configure_adamw`` from a module's hyperparameters; every module names these arguments the same way."""
    return configure_adamw(
        model,
        learning_rate=hp.learning_rate,
        weight_decay=hp.weight_decay,
        adam_beta1=hp.adam_beta1,
        adam_beta2=hp.adam_beta2,
        adam_epsilon=hp.adam_epsilon,
        lr_scheduler_type=hp.lr_scheduler_type,
        warmup_steps=hp.warmup_steps,
        warmup_ratio=hp.warmup_ratio,
        total_steps=total_steps,
    )
