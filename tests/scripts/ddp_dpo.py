"""DPO under Lightning DDP on CPU (2 processes, gloo), for tests/test_distributed.py.

Usage: python tests/scripts/ddp_dpo.py MODE OUT_JSON. Trains a few steps with ReferenceModel(mode=MODE); rank 0
then checks the reference values against the initial policy computed in one process and writes a JSON report.
"""

import json
import sys

import torch

torch.set_num_threads(1)

import lightning as L  # noqa: E402

import ltpost  # noqa: E402


def main(mode: str, out: str) -> None:
    L.seed_everything(0)
    reference = ltpost.ReferenceModel(mode=mode)
    module = ltpost.DPOModule(learning_rate=1e-3, use_peft=mode == "adapter", lora_r=4, lora_alpha=8)
    data = ltpost.PreferenceDataModule(batch_size=4, max_train_samples=24, max_eval_samples=8)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=3,
        callbacks=[reference],
    )
    trainer.fit(module, datamodule=data)
    report = {
        "world_size": trainer.world_size,
        "mode": reference.resolved_mode,
        "global_step": trainer.global_step,
        "loss": float(trainer.callback_metrics["train/loss"]),
        "eval_accuracy": float(trainer.callback_metrics["eval/rewards/accuracies"]),
    }
    if mode == "precompute":
        # Every row of the gathered table equals the initial policy's log-probs computed here in one process.
        initial = module.build_reference_model(None).eval()
        rows = [data.train_dataset[i] for i in range(len(data.train_dataset))]
        with torch.no_grad():
            expected = module.reference_compute(initial, data.collate(rows))
        table = reference.tables["train"]
        report["table_rows"] = int(table.shape[0])
        report["table_finite"] = bool(torch.isfinite(table).all())
        report["table_max_abs_diff"] = float((table - expected).abs().max())
    if trainer.is_global_zero:
        with open(out, "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
