"""SLURMRequeue: on the preemption signal, write a checkpoint at the next step boundary and requeue the job.

SLURM warns a job before it ends (``#SBATCH --signal=USR1@90``: SIGUSR1 90 s before the time limit, or when
``scancel --signal=USR1`` preempts it). Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves
the checkpoint inside the signal handler, at whatever point each rank happens to be; with several ranks their
checkpoint collectives can interleave with a collective of the step in flight. This callback only notes the
signal, and every ``check_every_n_steps`` optimizer steps all ranks agree on it (one scalar all-reduce, a host
sync, which is why it is not every step; ranks receive signals at different moments), save ``hpc_ckpt_<n>.ckpt``
in ``default_root_dir`` together, and the run stops; at teardown (loggers flushed, end-of-fit callbacks done) rank 0 runs ``scontrol requeue``,
which ends the job's processes at once: code after ``trainer.fit`` may not run. Lightning resumes from the newest ``hpc_ckpt_*`` by
itself when the requeued job starts on SLURM (``fit`` without ``ckpt_path``), and with ltpost's resumable
state the run continues exactly.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def next_hpc_checkpoint_path(folder: str) -> str:
    """``folder/hpc_ckpt_<n>.ckpt`` with ``n`` one above the newest there (Lightning's naming, which it resumes)."""
    os.makedirs(folder, exist_ok=True)
    names = os.listdir(folder)
    numbers = [int(m.group(1)) for name in names if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", name))]
    return os.path.join(folder, f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


class SLURMRequeue(Callback):
    """Checkpoint and requeue a SLURM job when it receives ``signum`` (SIGUSR1 by default).

    Args:
        signum: the signal SLURM sends ahead of the end (match ``#SBATCH --signal=USR1@90``).
        requeue: run ``scontrol requeue $SLURM_JOB_ID`` after the checkpoint (off: only checkpoint and stop).
        check_every_n_steps: how often ranks agree on the signal (a scalar all-reduce and host sync each time).
            The checkpoint starts within this many optimizer steps of the signal: keep their duration, plus the
            checkpoint's, well inside the warning time (``--signal=USR1@120`` in ltpost's templates).
    """

    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True, check_every_n_steps: int = 5) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be at least 1, got {check_every_n_steps}.")
        self.signum = signal.Signals(signum)
        self.requeue = requeue
        self.check_every_n_steps = check_every_n_steps
        self.received = False
        self.checkpoint_path: str | None = None
        self._previous_handler = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's signal connector, so this handler (not Lightning's) answers the signal.
        self._previous_handler = signal.signal(self.signum, self._note)

    def _note(self, signum, frame) -> None:
        self.received = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches and not trainer.is_last_batch:
            return  # mid-accumulation: a checkpoint now would drop the accumulated gradients
        if trainer.global_step % self.check_every_n_steps and not trainer.is_last_batch:
            return
        received = self.received
        if trainer.world_size > 1:
            flag = torch.tensor(float(received), device=pl_module.device)
            received = bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)
        if not received:
            return
        # Only rank 0 lists the folder; every rank must save to the same path.
        path = trainer.strategy.broadcast(
            next_hpc_checkpoint_path(trainer.default_root_dir) if trainer.is_global_zero else None
        )
        log.warning(f"SLURMRequeue: {self.signum.name} received; saving {path} at step {trainer.global_step}")
        trainer.save_checkpoint(path)
        self.checkpoint_path = path
        trainer.should_stop = True  # the run ends normally (loggers flushed, end-of-fit callbacks run) ...

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._previous_handler is not None:
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # ... and only then is the job requeued: `scontrol requeue` ends the running job's processes at once.
        if self.checkpoint_path is None or not self.requeue or not trainer.is_global_zero:
            return
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            log.warning("SLURMRequeue: not inside a SLURM job (no SLURM_JOB_ID); the checkpoint is written, no requeue")
            return
        if array_job := os.environ.get("SLURM_ARRAY_JOB_ID"):
            job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        log.warning(f"SLURMRequeue: requeueing job {job_id}; it resumes from {self.checkpoint_path}")
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            log.error(f"SLURMRequeue: `scontrol requeue {job_id}` failed: {result.stderr.strip()}")
