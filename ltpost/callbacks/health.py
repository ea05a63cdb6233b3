"""TrainingHealth: a run that explains itself, to people and to programs.

On the steps the logger writes, the callback reads what the module logged (``trainer.callback_metrics``, TRL's
names) and what ``training_step`` returned, adds what it measures itself (step time, time spent waiting for data,
the learning rate, GPU memory), and runs the pure checks of ``ltpost.health.checks`` over the recent history.
Each state change of a check is said twice over: one human-readable line on the ``ltpost.health`` logger, e.g.

    [ltpost] WARNING reward-std-collapse: group reward std is 0.004 over the last 10 logged steps (...). Make the
    reward denser (partial credit) or raise temperature/num_generations so completions of a prompt differ.

and one JSON record appended to ``health.jsonl`` in the run's log dir (code, status, severity, step, evidence,
action), which ``python -m ltpost.doctor LOG_DIR`` turns into a report. ``health/findings`` and
``health/active`` are logged with the other metrics.

One guard runs on every optimizer step: a non-finite loss. Before the optimizer applies the step, the loss summed
over the accumulated micro-batches is checked (one scalar device-to-host sync per optimizer step, and under DDP one
boolean all-reduce so every rank agrees); if it is NaN or infinite the gradients are dropped so the weights stay
as they were, a checkpoint is written, and the run stops. Resume it with ``--ckpt_path`` after fixing the cause.

Every module adds this callback through ``configure_callbacks()`` (``training_health: false`` turns it off);
configure one yourself to change thresholds::

    trainer:
      callbacks:
        - class_path: ltpost.TrainingHealth
          init_args:
            thresholds: {reward-std-collapse: {frac_zero_std: 0.95}}
            disable: [plateau]
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ltpost.health.checks import Finding, RunInfo
from ltpost.health.monitor import Event, HealthMonitor
from ltpost.metrics import logs_at_step

log = logging.getLogger("ltpost.health")

SETTINGS = (
    "beta",
    "max_completion_length",
    "num_generations",
    "temperature",
    "use_vllm",
    "vllm_importance_sampling_correction",
    "loss_type",
)


class TrainingHealth(Callback):
    """Watch a run's metrics and report what looks wrong, with the evidence and what to do.

    Args:
        thresholds: per check code, overrides of the check's keyword defaults, e.g.
            ``{"kl-blowup": {"kl": 1.0}}`` (see ``ltpost.health.checks``).
        disable: check codes not to run, e.g. ``["plateau"]``.
        check_every_n_steps: run the checks every N optimizer steps (default: the trainer's
            ``log_every_n_steps``, the steps whose metrics modules compute and log).
        stop_on_nonfinite_loss: on a NaN/Inf loss, skip the update, write a checkpoint and stop the run.
        dirpath: where ``health.jsonl`` goes (default: the trainer's log dir).
        filename: the JSON-lines file name.
        verbose: write the human-readable lines to the ``ltpost.health`` logger.
    """

    def __init__(
        self,
        thresholds: dict[str, dict[str, float]] | None = None,
        disable: list[str] | None = None,
        check_every_n_steps: int | None = None,
        stop_on_nonfinite_loss: bool = True,
        dirpath: str | None = None,
        filename: str = "health.jsonl",
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1 (or None), got {check_every_n_steps}.")
        self.monitor = HealthMonitor(thresholds, disable)  # validates the check codes
        self.check_every_n_steps = check_every_n_steps
        self.stop_on_nonfinite_loss = stop_on_nonfinite_loss
        self.dirpath = dirpath
        self.filename = filename
        self.verbose = verbose
        self.records: list[dict[str, Any]] = []  # this session's records, for programs holding the callback
        self.last_checkpoint: str | None = None
        self._peak_lr = 0.0
        self._loss_sum: torch.Tensor | None = None
        self._skipped_step: int | None = None
        self._batch_start: float | None = None
        self._batch_end: float | None = None
        self._timings: dict[str, list[float]] = {"timing/step_s": [], "timing/data_wait_s": []}
        self._last_checked: int | None = None

    @property
    def path(self) -> str | None:
        return os.path.join(self.dirpath, self.filename) if self.dirpath else None

    # -- setup -----------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            root = trainer.log_dir if trainer.logger is not None else trainer.default_root_dir
            self.dirpath = root or "."
        if self.check_every_n_steps is None:
            self.check_every_n_steps = trainer.log_every_n_steps or 1
        if self.verbose and not log.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)

    # -- the per-step guard: a non-finite loss ---------------------------------------------------------------------

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.stop_on_nonfinite_loss:
            loss = loss.detach()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss  # summed over micro-batches

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.stop_on_nonfinite_loss or self._loss_sum is None:
            return
        nonfinite = not bool(torch.isfinite(self._loss_sum))  # host-device sync: once per optimizer step
        self._loss_sum = None
        nonfinite = trainer.strategy.reduce_boolean_decision(nonfinite, all=False)  # any rank: every rank stops
        if nonfinite:
            # No gradient, no update: AdamW skips parameters whose .grad is None, so the weights the checkpoint
            # keeps are the last finite ones.
            optimizer.zero_grad(set_to_none=True)
            self._skipped_step = trainer.global_step

    # -- timing and the checks -------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        now = time.perf_counter()
        if self._batch_end is not None:
            self._timings["timing/data_wait_s"].append(now - self._batch_end)
        self._batch_start = now

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._batch_start is not None:
            self._timings["timing/step_s"].append(now - self._batch_start)
        if self._skipped_step is not None:
            self._stop_on_nonfinite_loss(trainer, pl_module)
        step = trainer.global_step - 1  # the optimizer step that just ran (global_step counts finished ones)
        if step >= 0 and step != self._last_checked and logs_at_step(step, self.check_every_n_steps):
            self._last_checked = step
            self._check(trainer, pl_module, step, outputs)
        self._batch_end = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only validations inside fit speak to the run's health (a standalone `validate` has no training to judge).
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        metrics = _floats(trainer.callback_metrics, prefix="eval/")
        if metrics:
            events = self.monitor.update(trainer.global_step, metrics, self._info(trainer, pl_module))
            self._emit(events)

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, outputs: Any) -> None:
        if not trainer.is_global_zero:
            return
        metrics = _floats(trainer.callback_metrics, prefix="train/")
        if isinstance(outputs, dict):  # what training_step returned and did not log under train/
            for name, value in outputs.items():
                if f"train/{name}" not in metrics and isinstance(value, torch.Tensor) and value.numel() == 1:
                    metrics[f"train/{name}"] = float(value)
        for name, values in self._timings.items():
            if values:
                metrics[name] = sum(values) / len(values)
                values.clear()
        lr = _learning_rate(trainer)
        if lr is not None:
            metrics["lr"] = lr
            self._peak_lr = max(self._peak_lr, lr)
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            total = torch.cuda.get_device_properties(pl_module.device).total_memory
            metrics["system/gpu_memory_fraction"] = torch.cuda.max_memory_reserved(pl_module.device) / total
        events = self.monitor.update(step, metrics, self._info(trainer, pl_module))
        self._emit(events)
        for name in ("timing/step_s", "timing/data_wait_s"):  # so the report can speak to throughput
            if name in metrics:
                pl_module.log(name, metrics[name], batch_size=1, rank_zero_only=True)
        pl_module.log("health/findings", float(self.monitor.num_raised), batch_size=1, rank_zero_only=True)
        pl_module.log("health/active", float(len(self.monitor.active)), batch_size=1, rank_zero_only=True)

    def _info(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RunInfo:
        lr = _learning_rate(trainer)
        hparams = getattr(pl_module, "hparams", {}) or {}
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is None and trainer.state.fn == "fit":  # it loads the train dataloader: fit only
            estimated = trainer.estimated_stepping_batches
            max_steps = int(estimated) if math.isfinite(estimated) else None
        return RunInfo(
            step=trainer.global_step,
            max_steps=max_steps,
            lr_ratio=(lr / self._peak_lr) if lr is not None and self._peak_lr > 0 else 1.0,
            gradient_clip_val=trainer.gradient_clip_val or None,
            accelerator=pl_module.device.type,
            settings={name: hparams[name] for name in SETTINGS if name in hparams},
        )

    # -- non-finite loss: checkpoint and stop ----------------------------------------------------------------------

    def _stop_on_nonfinite_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step, self._skipped_step = self._skipped_step, None
        callback = trainer.checkpoint_callback
        folder = (
            callback.dirpath if callback is not None and callback.dirpath else os.path.join(self.dirpath, "checkpoints")
        )
        path = os.path.join(folder, f"before-nonfinite-loss-step={step}.ckpt")
        finding = Finding(
            "nonfinite-loss",
            "critical",
            "stability",
            f"the loss was NaN or infinite at optimizer step {step}; the update was skipped, the weights before it "
            f"were saved to {path} and the run stopped",
            "Lower the learning rate, enable gradient clipping (trainer.gradient_clip_val: 1.0) or check the batch "
            f"of this step; then resume with --ckpt_path {path}.",
            {"step": float(step)},
        )
        if trainer.is_global_zero:
            # Raised before the checkpoint is written, so a resumed run knows it and says once that it recovered.
            self._emit([self.monitor.raise_now(step, finding)])
        trainer.save_checkpoint(path)  # every rank calls it; the strategy decides who writes
        self.last_checkpoint = path
        trainer.should_stop = True

    # -- output ----------------------------------------------------------------------------------------------------

    def _emit(self, events: list[Event]) -> None:
        if not events:
            return
        records = [event.record() for event in events]
        self.records.extend(records)
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a") as stream:
                for record in records:
                    stream.write(json.dumps(record) + "\n")
        if self.verbose:
            for event in events:
                level = logging.INFO if event.status == "recovered" else logging.WARNING
                log.log(level, event.line())

    # -- state -----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "peak_lr": self._peak_lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict["monitor"])
        self._peak_lr = state_dict.get("peak_lr", 0.0)


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scalar metrics under ``prefix`` as floats (one host transfer each: only on checking steps)."""
    out = {}
    for name, value in metrics.items():
        if name.startswith(prefix) and (not isinstance(value, torch.Tensor) or value.numel() == 1):
            out[name] = float(value)
    return out


def _learning_rate(trainer: pl.Trainer) -> float | None:
    optimizers = trainer.optimizers
    if not optimizers or not optimizers[0].param_groups:
        return None
    return float(optimizers[0].param_groups[0]["lr"])
