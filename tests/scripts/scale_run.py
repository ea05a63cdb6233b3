"""Train ltpost methods for a few steps under a strategy, for tests/test_resume.py, test_scale.py and test_slurm.py.

Usage (one process, Lightning's own launcher, torchrun, or srun all work; the environment tells Lightning)::

    python tests/scripts/scale_run.py OUT_DIR --methods sft,grpo [--strategy ddp|fsdp2] [--devices N] [--num-nodes N]
        [--phase full|first|resume] [--max-steps 6] [--stop-at 3] [--export] [--step-sleep S] [--requeue]

Phases: ``full`` trains ``max_steps`` uninterrupted; ``first`` stops right after the checkpoint of step
``stop_at`` (an interruption); ``resume`` continues from that checkpoint. Several methods run one after another
in the same processes. Rank 0 writes ``OUT_DIR/<method>-<phase>.json``: every step's training loss on every
rank (all-gathered), and for ``--export`` an HFExport folder ``OUT_DIR/<method>-<phase>-hf`` and the weights a
vLLM engine would be sent, ``OUT_DIR/<method>-<phase>-pushed.safetensors`` (for LoRA also a merged export,
``<method>-<phase>-merged-hf``). Under SLURM with
``--requeue``, ``SLURMRequeue`` answers SIGUSR1 and the file is ``<method>-slurm-<restart count>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

import ltpost  # noqa: E402
from tests import cpu_shims  # noqa: E402


class RecordLosses(Callback):
    """Every rank's training loss of every step (all-gathered); optionally slows steps so a signal can land."""

    def __init__(self, progress: Path | None = None, step_sleep: float = 0.0) -> None:
        self.steps: list[dict] = []
        self.progress = progress
        self.step_sleep = step_sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        gathered = pl_module.all_gather(loss.detach().float())
        values = gathered.flatten().tolist() if gathered.dim() else [float(gathered)]
        self.steps.append({"step": trainer.global_step, "losses": values})
        if self.progress is not None and trainer.is_global_zero:
            self.progress.write_text(str(trainer.global_step))
        if self.step_sleep:
            time.sleep(self.step_sleep)


class StopAfter(Callback):
    """An interruption: stop the run right after the checkpoint of step ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def build(method: str):
    lora = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    if method == "sft":
        return ltpost.SFTModule(learning_rate=1e-3, warmup_ratio=0.0), ltpost.SFTDataModule(
            batch_size=4, max_train_samples=40
        )
    if method == "sft-lora":
        return ltpost.SFTModule(learning_rate=1e-3, warmup_ratio=0.0, **lora), ltpost.SFTDataModule(
            batch_size=4, max_train_samples=40
        )
    if method == "sft-qlora":
        module = ltpost.SFTModule(learning_rate=1e-3, warmup_ratio=0.0, load_in_4bit=True, **lora)
        return module, ltpost.SFTDataModule(batch_size=4, max_train_samples=40)
    if method == "dpo":  # the reference: precomputed by strided shards on every rank, all-gathered
        return ltpost.DPOModule(learning_rate=1e-3), ltpost.PreferenceDataModule(batch_size=4, max_train_samples=40)
    if method == "reward":
        return ltpost.RewardModule(learning_rate=1e-3), ltpost.PreferenceDataModule(batch_size=4, max_train_samples=40)
    if method in ("grpo", "rloo"):
        cls = ltpost.GRPOModule if method == "grpo" else ltpost.RLOOModule
        # steps_per_generation 2: a checkpoint at step 3 falls mid-round (the rollout buffer must come back);
        # beta > 0 adds a frozen reference copy (sharded too under FSDP2).
        module = cls(
            model="ltpost:tiny-llama-sft",
            learning_rate=1e-4,
            num_generations=4,
            max_completion_length=8,
            steps_per_generation=2,
            beta=0.05,
        )
        return module, ltpost.PromptDataModule(prompts_per_step=2, max_train_samples=64)
    raise ValueError(f"unknown method {method!r}")


def run(method: str, args: argparse.Namespace) -> None:
    out = Path(args.out_dir)
    L.seed_everything(0)
    module, data = build(method)
    slurm = args.requeue
    tag = f"slurm-{os.environ.get('SLURM_RESTART_COUNT', '0')}" if slurm else args.phase
    record = RecordLosses(out / f"{method}-progress.txt", args.step_sleep)
    callbacks: list[Callback] = [record]
    if args.phase == "first":
        callbacks.append(StopAfter(args.stop_at))
    if args.phase in ("first", "resume"):
        callbacks.append(
            ModelCheckpoint(dirpath=out / f"{method}-ckpt", every_n_train_steps=args.stop_at, save_top_k=-1)
        )
    if slurm:
        callbacks.append(ltpost.SLURMRequeue(check_every_n_steps=2))  # the signal lands at step 2 or 3
    if args.export:
        lora = method == "sft-lora"
        if not (lora and args.strategy.startswith("fsdp1")):  # FSDP1 refuses an adapter export (PEFT's names)
            callbacks.append(ltpost.HFExport(dirpath=str(out / f"{method}-{tag}-hf")))
        if lora:
            callbacks.append(ltpost.HFExport(dirpath=str(out / f"{method}-{tag}-merged-hf"), merge_lora=True))
        if method != "sft-qlora":  # a 4-bit base is not what a vLLM engine is sent
            callbacks.append(SavePushedWeights(out / f"{method}-{tag}-pushed.safetensors"))
    callbacks.append(WriteReport(record, out / f"{method}-{tag}.json", method, args.strategy, out / f"{method}-ckpt"))
    presets = {
        "fsdp2": lambda: ltpost.strategies.FSDP2Strategy(),
        "fsdp1": lambda: ltpost.strategies.FSDP1Strategy(),
        "fsdp1-ac": lambda: ltpost.strategies.FSDP1Strategy(activation_checkpointing=True),
        "zero2": lambda: cpu_shims.CPUDeepSpeedZeRO2Strategy(),
        "zero3-ac": lambda: cpu_shims.CPUDeepSpeedZeRO3Strategy(activation_checkpointing=True),
        # bf16 gathers and compute, fp32 reduction and master weights, activation checkpointing, no reshard
        "fsdp2-bf16": lambda: ltpost.strategies.FSDP2Strategy(
            mixed_precision="bf16", activation_checkpointing=True, reshard_after_forward=False
        ),
    }
    strategy = presets[args.strategy]() if args.strategy in presets else args.strategy
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.max_steps,
        default_root_dir=str(out / f"{method}-root"),
        logger=False,
        enable_checkpointing=args.phase in ("first", "resume"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    ckpt_path = None
    if args.phase == "resume":
        found = sorted((out / f"{method}-ckpt").glob(f"*step={args.stop_at}.ckpt"))
        assert found, f"no checkpoint of step {args.stop_at} in {out / f'{method}-ckpt'}"
        ckpt_path = str(found[0])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)


class SavePushedWeights(Callback):
    """What VLLMSync would push to a vLLM engine at the end of training (adapters merged, shards gathered, under the
    base model's names), saved by rank 0 to ``path``; every rank takes part in the gathers."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        from safetensors.torch import save_file

        from ltpost.rollout.weights import policy_weights

        with policy_weights(pl_module.model, trainer.strategy.model) as weights:
            pushed = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in weights}
        if trainer.is_global_zero:
            save_file(pushed, str(self.path))


class WriteReport(Callback):
    """Rank 0 writes the report at the end of training (before teardown, where SLURMRequeue ends the job)."""

    def __init__(self, record: RecordLosses, path: Path, method: str, strategy: str, checkpoints: Path) -> None:
        self.record, self.path, self.method, self.strategy, self.checkpoints = (
            record,
            path,
            method,
            strategy,
            checkpoints,
        )
        self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        # The model's trained parameter count: ZeRO-3 partitions know their full size (ds_numel); FSDP1's flat
        # shards add up over ranks (a collective, so before rank 0 goes its own way).
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in pl_module.parameters() if p.requires_grad)
        if ltpost.strategies.sharding_of(pl_module.model) == "fsdp1":
            trainable = int(trainer.strategy.reduce(torch.tensor(trainable), reduce_op="sum"))
        if not trainer.is_global_zero:
            return
        report = {
            "method": self.method,
            "strategy": self.strategy,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "global_step": trainer.global_step,
            "fit_s": time.perf_counter() - self.started,
            "steps": self.record.steps,
            "sharded_checkpoint": any(p.is_dir() for p in self.checkpoints.glob("*.ckpt")),
            "trainable_parameters": trainable,
            "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        }
        self.path.write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--methods", default="sft")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--phase", choices=["full", "first", "resume"], default="full")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--stop-at", type=int, default=3)
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--requeue", action="store_true")
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        run(method, args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
