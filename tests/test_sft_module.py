"""SFTModule on the tiny model: it learns, LoRA/QLoRA touch only adapters, metrics and schedules are right."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from ltpost import SFTDataModule, SFTModule
from ltpost.losses.sft import nll_loss
from tests.helpers import cpu_trainer


class RecordMetrics(Callback):
    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def snapshot(module: SFTModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_metrics_under_trl_names_and_token_count(tmp_path):
    recorder = RecordMetrics()
    module = SFTModule(learning_rate=1e-3)
    data = SFTDataModule(batch_size=4, max_train_samples=64, max_eval_samples=8)
    trainer = cpu_trainer(
        tmp_path, max_steps=3, limit_val_batches=2, val_check_interval=3, callbacks=[recorder], log_every_n_steps=1
    )
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for name in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        assert f"train/{name}" in metrics, sorted(metrics)
    for name in ("loss", "entropy", "mean_token_accuracy"):
        assert f"eval/{name}" in metrics, sorted(metrics)
    # num_tokens is cumulative: each step adds exactly that batch's non-padding tokens.
    counts = [s["train/num_tokens"] for s in recorder.steps]
    assert counts == sorted(counts) and counts[0] > 0
    assert module.num_tokens == counts[-1]
    assert 0.0 <= float(metrics["train/mean_token_accuracy"]) <= 1.0
    assert float(metrics["train/entropy"]) > 0.0


def test_diagnostics_are_computed_only_on_logging_steps(tmp_path):
    """With log_every_n_steps=3, entropy/accuracy exist in the step outputs at steps 0 and 2 (the logged ones) only;
    the loss is there on every step."""

    class Outputs(Callback):
        def __init__(self):
            self.keys = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.keys.append(sorted(outputs))

    outputs = Outputs()
    trainer = cpu_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[outputs], log_every_n_steps=3)
    trainer.fit(
        SFTModule(learning_rate=1e-3), datamodule=SFTDataModule(batch_size=2, max_train_samples=16, eval_split=None)
    )
    full, loss_only = ["entropy", "loss", "mean_token_accuracy"], ["loss"]
    assert outputs.keys == [full, loss_only, full, loss_only]


def test_training_step_loss_equals_pure_loss_on_the_batch(tmp_path):
    """The module adds nothing to the loss: its training_step loss is nll_loss of the model's logits."""
    module = SFTModule()
    data = SFTDataModule(tokenizer="ltpost:tiny-llama", batch_size=4, max_train_samples=8)
    data.setup("fit")
    module.configure_model()
    batch = data.collate([data.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        expected, _ = nll_loss(logits, batch["shift_labels"])
        module.log = lambda *a, **k: None  # no trainer attached: logging is not what is tested here
        got = module.training_step(batch, 0)["loss"]
    torch.testing.assert_close(got, expected)


def test_warmup_then_cosine_schedule(tmp_path):
    monitor = LearningRateMonitor(logging_interval="step")
    module = SFTModule(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=2)
    data = SFTDataModule(batch_size=2, max_train_samples=32, eval_split=None)
    logger = CSVLogger(tmp_path)
    trainer = cpu_trainer(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1, callbacks=[monitor])
    trainer.fit(module, datamodule=data)
    lrs = [v for v in monitor.lrs.values()][0]
    # transformers' cosine with warmup: step s < 2 -> s/2 * peak; then 0.5 * (1 + cos(pi * (s-2)/4)) * peak.
    expected = [0.0, 0.5e-3, 1e-3, 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()) * 1e-3, 0.5e-3]
    assert lrs[:5] == pytest.approx(expected, abs=1e-9)


def test_lora_trains_only_the_adapters(tmp_path):
    module = SFTModule(learning_rate=1e-2, use_peft=True, lora_r=4, lora_alpha=8)
    data = SFTDataModule(batch_size=4, max_train_samples=32, eval_split=None)
    trainer = cpu_trainer(tmp_path, max_steps=3)
    trainer.strategy.connect(module)
    module.configure_model()
    before = snapshot(module)
    trainer.fit(module, datamodule=data)
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed)
    assert not any("lora_" not in k for k in changed)


def test_qlora_trains_only_the_adapters_on_4bit_weights(tmp_path):
    import bitsandbytes as bnb

    module = SFTModule(learning_rate=1e-2, load_in_4bit=True, lora_r=4, lora_alpha=8)
    data = SFTDataModule(batch_size=4, max_train_samples=32, eval_split=None)
    trainer = cpu_trainer(tmp_path, max_steps=3)
    module.configure_model()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    before = snapshot(module)
    trainer.fit(module, datamodule=data)
    after = snapshot(module)
    changed = {k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    quantized = [k for k in before if not before[k].dtype.is_floating_point and "weight" in k]
    assert quantized and all(torch.equal(before[k], after[k]) for k in quantized)


def test_dft_loss_trains(tmp_path):
    module = SFTModule(loss_type="dft", learning_rate=2e-3)
    data = SFTDataModule(batch_size=8, max_train_samples=64, max_eval_samples=16)
    trainer = cpu_trainer(tmp_path, max_steps=16)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["eval/loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["eval/loss"]
    assert after < before


def test_subclass_can_change_the_loss(tmp_path):
    """The README's subclassing example: research code overrides one method, everything else is inherited."""

    class LabelSmoothedSFT(SFTModule):
        def training_step(self, batch, batch_idx):
            logits = self(batch)
            labels = batch["shift_labels"]
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.1
            )
            self.log("train/loss", loss)
            return loss

    module = LabelSmoothedSFT(learning_rate=1e-3)
    data = SFTDataModule(batch_size=4, max_train_samples=16, eval_split=None)
    trainer = cpu_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=data)
    assert "train/loss" in trainer.callback_metrics


def test_bad_module_arguments_are_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        SFTModule(loss_type="mse")
    with pytest.raises(ValueError, match="warmup_ratio"):
        SFTModule(warmup_ratio=1.5)
