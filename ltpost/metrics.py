"""When to compute and log diagnostics.

``self.log`` costs about 0.4 ms per call on CPU (Lightning copies its bookkeeping on every call; measured in
``bench/``), and diagnostics such as the entropy over the vocabulary cost a pass over the logits. Modules log the
loss every step and the rest only on the steps the logger writes, so no work is done for values nobody reads.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor


def logs_at_step(global_step: int, log_every_n_steps: int) -> bool:
    """The rule itself: step 0, and the steps after which the logger writes (every ``log_every_n_steps``)."""
    return (global_step + 1) % (log_every_n_steps or 1) == 0 or global_step == 0


def is_logging_step(module: pl.LightningModule) -> bool:
    """True on the optimizer steps the logger writes (every ``log_every_n_steps``), and without a trainer."""
    try:
        trainer = module.trainer
    except RuntimeError:  # called outside a Trainer (a unit test, a notebook): compute everything
        return True
    return logs_at_step(trainer.global_step, trainer.log_every_n_steps)


def log_grad_norm(module: pl.LightningModule) -> None:
    """Log ``train/grad_norm`` (TRL's name: the total 2-norm of the gradients, before clipping) on logging steps.

    Call it from ``on_before_optimizer_step``, where Lightning has unscaled the gradients (mixed precision) and not
    yet clipped them. Costs one pass over the gradients on the steps the logger writes, none on the others.
    """
    if not is_logging_step(module):
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # FSDP2: the norm of sharded gradients is itself sharded
        norm = norm.full_tensor()
    module.log("train/grad_norm", norm, batch_size=1)


def padding_fraction(batch: dict) -> float | None:
    """The share of ``input_ids`` slots that are padding, from host ints the collate functions count (no sync)."""
    slots = batch["input_ids"].numel()
    return 1.0 - batch["num_tokens"] / slots if slots and "num_tokens" in batch else None


def log_padding_fraction(module: pl.LightningModule, batch: dict) -> None:
    """Log ``train/padding_fraction`` on logging steps (what ``TrainingHealth`` reads to suggest padding-free)."""
    fraction = padding_fraction(batch)
    if fraction is not None and is_logging_step(module):
        module.log("train/padding_fraction", fraction, batch_size=1)


def health_callbacks(module: pl.LightningModule) -> list:
    """The callbacks every ltpost module adds in ``configure_callbacks``: ``ResumeState`` (exact resume) and
    ``TrainingHealth`` unless the module's ``training_health`` is off; none the trainer already has (Lightning
    would replace the user's with ours)."""
    from ltpost.callbacks.health import TrainingHealth
    from ltpost.callbacks.resume_state import ResumeState

    given = module.trainer.callbacks
    callbacks = [] if any(isinstance(c, ResumeState) for c in given) else [ResumeState()]
    if module.hparams.get("training_health", True) and not any(isinstance(c, TrainingHealth) for c in given):
        callbacks.append(TrainingHealth())
    return callbacks


def reduce_fx(name: str) -> str:
    """How a step metric is reduced across ranks and micro-steps: extremes by min / max (``clip_ratio/low_min``,
    ``sampling/importance_sampling_ratio/max`` ...), everything else by the mean."""
    if name.endswith(("_min", "/min")):
        return "min"
    return "max" if name.endswith(("_max", "/max")) else "mean"
