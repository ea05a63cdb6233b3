"""When to compute and log diagnostics.

``self.log`` costs about 0.4 ms per call on CPU (Lightning copies its bookkeeping on every call; measured in
``bench/``), and diagnostics such as the entropy over the vocabulary cost a pass over the logits. Modules log the
loss every step and the rest only on the steps the logger writes, so no work is done for values nobody reads.
"""

from __future__ import annotations

import lightning.pytorch as pl


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


def reduce_fx(name: str) -> str:
    """How a step metric is reduced across ranks and micro-steps: extremes by min / max (``clip_ratio/low_min``,
    ``sampling/importance_sampling_ratio/max`` ...), everything else by the mean."""
    if name.endswith(("_min", "/min")):
        return "min"
    return "max" if name.endswith(("_max", "/max")) else "mean"
