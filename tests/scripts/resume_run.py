"""Train a method for a few steps, optionally stopping after a checkpoint and resuming, for tests/test_resume.py.

Usage: python tests/scripts/resume_run.py METHOD PHASE OUT_DIR [--devices N] [--strategy S]
PHASE: ``full`` (uninterrupted), ``first`` (stops right after the checkpoint at STOP_AT), ``resume`` (continues
from that checkpoint). Rank 0 appends every optimizer step's loss, as seen by each rank, to OUT_DIR/PHASE.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

import ltpost  # noqa: E402

MAX_STEPS = 6
STOP_AT = 3


class RecordLosses(Callback):
    """Every rank's training loss of every step (all-gathered), plus whether the step ran in this process."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        gathered = pl_module.all_gather(loss.detach().float())
        values = gathered.flatten().tolist() if gathered.dim() else [float(gathered)]
        self.steps.append({"step": trainer.global_step, "losses": values})


class StopAfter(Callback):
    """Simulates an interruption: stop the run right after the checkpoint of step ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def build(method: str):
    if method == "sft":
        module = ltpost.SFTModule(learning_rate=1e-3, warmup_ratio=0.0)
        data = ltpost.SFTDataModule(batch_size=4, max_train_samples=40)
        callbacks = []
    elif method == "dpo":
        module = ltpost.DPOModule(learning_rate=1e-3)
        data = ltpost.PreferenceDataModule(batch_size=4, max_train_samples=40)
        callbacks = []
    elif method == "reward":
        module = ltpost.RewardModule(learning_rate=1e-3)
        data = ltpost.PreferenceDataModule(batch_size=4, max_train_samples=40)
        callbacks = []
    elif method in ("grpo", "rloo"):
        cls = ltpost.GRPOModule if method == "grpo" else ltpost.RLOOModule
        # steps_per_generation 2: checkpoints fall mid-round, so the rollout buffer must be restored; beta > 0
        # adds the reference copy.
        module = cls(
            model="ltpost:tiny-llama-sft",
            learning_rate=1e-4,
            num_generations=4,
            max_completion_length=8,
            steps_per_generation=2,
            beta=0.05,
        )
        data = ltpost.PromptDataModule(prompts_per_step=2, max_train_samples=64)
        callbacks = []
    else:
        raise ValueError(method)
    return module, data, callbacks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("phase", choices=["full", "first", "resume"])
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    args = parser.parse_args()
    out = Path(args.out_dir)
    L.seed_everything(0)
    module, data, callbacks = build(args.method)
    record = RecordLosses()
    ckpt_dir = out / ("ckpt-full" if args.phase == "full" else "ckpt")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=STOP_AT, save_top_k=-1, save_last=False)
    callbacks += [record, checkpoint]
    if args.phase == "first":
        callbacks.append(StopAfter(STOP_AT))
    strategy = ltpost.strategies.FSDP2Strategy() if args.strategy == "fsdp2" else args.strategy
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=MAX_STEPS,
        logger=False,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    ckpt_path = None
    if args.phase == "resume":
        found = sorted((out / "ckpt").glob(f"*step={STOP_AT}*"))
        assert found, f"no checkpoint of step {STOP_AT} in {out / 'ckpt'}"
        ckpt_path = str(found[0])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        report = {"world_size": trainer.world_size, "global_step": trainer.global_step, "steps": record.steps}
        (out / f"{args.phase}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
