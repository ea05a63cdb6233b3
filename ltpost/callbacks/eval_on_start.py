"""EvalOnStart: log the validation run Lightning does before training (its sanity check) at step 0.

Lightning runs ``num_sanity_val_steps`` validation batches before the first training step and then discards what
was logged. For post-training that first evaluation is the baseline every curve should start from (transformers
calls it ``eval_on_start``): the held-out reward of the starting checkpoint is the number an RL run must beat.
This callback keeps it: at the end of the sanity check it reads the logged validation metrics (already reduced
over the epoch and, with ``sync_dist``, over ranks) and writes them to every logger at step 0.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class EvalOnStart(Callback):
    """Log the sanity-check validation metrics at step 0, so evaluation curves start at the initial model.

    Use it with ``trainer.num_sanity_val_steps: -1`` (the whole validation set; the default 2 batches would be a
    partial evaluation, which this callback warns about).

    Args:
        prefix: only metrics whose name starts with this are logged (``""``: all logged validation metrics).
    """

    def __init__(self, prefix: str = "eval/") -> None:
        super().__init__()
        self.prefix = prefix
        self.initial_metrics: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.num_sanity_val_steps not in (-1, float("inf")):
            rank_zero_warn(
                f"EvalOnStart logs Lightning's sanity check, which covers only num_sanity_val_steps="
                f"{trainer.num_sanity_val_steps} validation batches; set trainer.num_sanity_val_steps: -1 to evaluate "
                "the whole validation set before training."
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            return
        self.initial_metrics = {
            name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith(self.prefix)
        }
        if not self.initial_metrics:
            return
        for logger in trainer.loggers:  # loggers write on rank zero only
            logger.log_metrics(self.initial_metrics, step=0)
        summary = ", ".join(f"{name}={value:.4g}" for name, value in sorted(self.initial_metrics.items()))
        rank_zero_info(f"[ltpost] before training: {summary}")
