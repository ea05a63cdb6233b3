"""DPOModule and the ReferenceModel callback on the tiny model: every reference mode, invariants, state."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from ltpost import DPOModule, PreferenceDataModule, ReferenceModel
from ltpost.callbacks.reference_model import resolve_mode
from tests.helpers import cpu_trainer


class FirstStep(Callback):
    """Records the metrics of the first training step, taken before any optimizer update."""

    def __init__(self):
        self.outputs = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.outputs is None:
            self.outputs = {k: float(v) for k, v in outputs.items()}


def data(**kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(**{"batch_size": 8, "max_train_samples": 32, "max_eval_samples": 16, **kwargs})


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["precompute", "copy", "sync", "adapter"])
def test_first_step_is_log2_and_policy_moves(tmp_path, mode):
    """At step 0 the policy equals the reference, so the sigmoid loss is exactly log 2 with zero margins, whatever
    the mode. After a few steps trainable weights have changed and the reference has not (except in sync mode)."""
    first = FirstStep()
    reference = ReferenceModel(mode=mode, sync_steps=100)
    module = DPOModule(learning_rate=1e-3, use_peft=mode == "adapter", lora_r=4, lora_alpha=8)
    trainer = cpu_trainer(tmp_path, max_steps=3, callbacks=[reference, first], limit_val_batches=0)
    module.configure_model()
    before = params(module.model)
    trainer.fit(module, datamodule=data())
    assert reference.resolved_mode == mode
    assert first.outputs["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first.outputs["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    after = params(module.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed
    if mode == "adapter":
        assert all("lora_" in k for k in changed)
    if mode in ("copy", "sync"):
        ref_now = params(reference.reference)
        assert all(torch.equal(ref_now[k], before[k]) for k in ref_now)  # no sync happened (sync_steps=100)


def test_auto_mode_picks_adapter_for_peft_and_precompute_otherwise(tmp_path):
    for use_peft, expected in ((True, "adapter"), (False, "precompute")):
        module = DPOModule(learning_rate=1e-3, use_peft=use_peft, lora_r=4, lora_alpha=8)
        trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
        trainer.fit(module, datamodule=data())
        [reference] = [c for c in trainer.callbacks if isinstance(c, ReferenceModel)]
        assert reference.resolved_mode == expected


def test_user_reference_callback_is_kept(tmp_path):
    mine = ReferenceModel(mode="copy")
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[mine])
    trainer.fit(DPOModule(learning_rate=1e-3), datamodule=data())
    assert [c for c in trainer.callbacks if isinstance(c, ReferenceModel)] == [mine]


def test_precomputed_table_equals_the_initial_policy(tmp_path):
    """The precomputed reference log-probs are the initial policy's, row by row (by example_index)."""
    reference = ReferenceModel(mode="precompute")
    module = DPOModule(learning_rate=1e-3)
    dm = data()
    dm.tokenizer = None
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[reference])
    module.configure_model()
    initial = params(module.model)
    trainer.fit(module, datamodule=dm)
    module.model.load_state_dict(initial)
    # The precompute pass batches rows 0-7 together (eval_batch_size 8); the same batch recomputed gives the same
    # values to <= 1e-6. (Another batch composition changes fp32 summation order: ~1e-7 relative, ~3e-6 absolute.)
    rows = [dm.train_dataset[i] for i in range(8)]
    with torch.no_grad():
        expected = module.reference_compute(module.model.eval(), dm.collate(rows))  # [8, 2]
    torch.testing.assert_close(reference.tables["train"][:8], expected, atol=1e-6, rtol=0)
    assert reference.tables["eval"].shape == (len(dm.eval_dataset), 2)
    assert torch.isfinite(reference.tables["train"]).all()


def test_precomputed_values_equal_on_the_fly_copy_values(tmp_path):
    """The precompute and copy modes serve the same reference log-probs for the same batch (<= 1e-6; see above
    for why the batch is the one the precompute pass used)."""
    modules, references = [], []
    for mode in ("precompute", "copy"):
        reference = ReferenceModel(mode=mode)
        module = DPOModule(learning_rate=1e-3)
        trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[reference])
        dm = data()
        trainer.fit(module, datamodule=dm)
        modules.append(module), references.append(reference)
    batch = dm.collate([dm.train_dataset[i] for i in range(8)])  # the composition of the first precompute batch
    precomputed = references[0].reference_values(modules[0], batch, modules[0].reference_compute, "train")
    on_the_fly = references[1].reference_values(modules[1], batch, modules[1].reference_compute, "train")
    torch.testing.assert_close(precomputed, on_the_fly, atol=1e-6, rtol=0)


def test_adapter_disabled_reference_equals_the_base_model(tmp_path):
    """After LoRA training moved the policy, the adapter-disabled reference still gives the base model's
    log-probs (a freshly loaded base), and differs from the trained policy's."""
    reference = ReferenceModel(mode="adapter")
    module = DPOModule(learning_rate=5e-2, use_peft=True, lora_r=4, lora_alpha=8)
    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[reference])
    dm = data()
    trainer.fit(module, datamodule=dm)
    batch = dm.collate([dm.train_dataset[i] for i in range(4)])
    served = reference.reference_values(module, batch, module.reference_compute, "train")
    base = module.build_reference_model(None).eval()
    with torch.no_grad():
        expected = module.reference_compute(base, batch)
        policy = module.reference_compute(module.model.eval(), batch)
    torch.testing.assert_close(served, expected, atol=1e-6, rtol=0)
    assert (policy - expected).abs().max() > 1e-3


def test_validate_in_a_new_trainer_rebuilds_the_reference_from_its_source(tmp_path):
    """A trained module validated by a fresh Trainer (no checkpoint state): the precomputed reference is the source
    checkpoint, not the trained policy, so the implicit rewards are not all zero."""
    module = DPOModule(learning_rate=5e-2)
    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=data())
    fresh = cpu_trainer(tmp_path)
    metrics = fresh.validate(module, datamodule=data(), verbose=False)[0]
    assert abs(metrics["eval/rewards/margins"]) > 1e-3
    base = module.build_reference_model(None).eval()
    [reference] = [c for c in fresh.callbacks if isinstance(c, ReferenceModel)]
    dm = fresh.datamodule
    with torch.no_grad():
        expected = module.reference_compute(base, dm.collate([dm.eval_dataset[i] for i in range(8)]))
    torch.testing.assert_close(reference.tables["eval"][:8], expected, atol=1e-6, rtol=0)


def test_sync_mode_mixes_policy_into_reference(tmp_path):
    """TR-DPO: after optimizer step 2 (sync_steps=2), ref = 0.6 * policy + 0.4 * ref_initial, exactly once."""

    class Capture(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2 and not hasattr(self, "policy"):
                self.policy = params(pl_module.model)

    reference = ReferenceModel(mode="sync", sync_steps=2, sync_alpha=0.6)
    capture = Capture()
    module = DPOModule(learning_rate=1e-2)
    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[capture, reference])
    module.configure_model()
    initial = params(module.model)
    trainer.fit(module, datamodule=data())
    assert reference.num_syncs == 1 and reference.last_synced_step == 2
    ref = params(reference.reference)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(ref[name], 0.6 * capture.policy[name] + 0.4 * initial[name])


def test_resume_reuses_the_precomputed_reference(tmp_path):
    """The reference table rides in the checkpoint: a resumed run does not recompute it (the policy has moved,
    so recomputing would silently change the reference)."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    reference = ReferenceModel(mode="precompute")
    trainer = cpu_trainer(
        tmp_path, max_steps=2, limit_val_batches=0, callbacks=[reference, checkpoint], enable_checkpointing=True
    )
    trainer.fit(DPOModule(learning_rate=1e-2), datamodule=data())
    table = reference.tables["train"].clone()

    resumed = ReferenceModel(mode="precompute")
    resumed._precompute = lambda *a, **k: pytest.fail("the reference was recomputed after resume")
    trainer = cpu_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[resumed], enable_checkpointing=True)
    trainer.fit(DPOModule(learning_rate=1e-2), datamodule=data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 4
    torch.testing.assert_close(resumed.tables["train"], table)


def test_metrics_under_trl_names(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, log_every_n_steps=1)
    trainer.fit(DPOModule(learning_rate=1e-3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), datamodule=data())
    names = [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
    ]
    for name in names:
        assert f"train/{name}" in trainer.callback_metrics and f"eval/{name}" in trainer.callback_metrics, name
    assert trainer.callback_metrics["train/num_tokens"] > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(loss_type="ipo"),
        dict(use_weighting=True),
        dict(ld_alpha=0.5, loss_type=["sigmoid", "sft"]),
        dict(f_divergence_type="js_divergence"),
        dict(loss_type="robust", label_smoothing=0.1),
    ],
)
def test_variants_train_and_stay_finite(tmp_path, kwargs):
    first = FirstStep()
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[first])
    trainer.fit(DPOModule(learning_rate=1e-3, **kwargs), datamodule=data())
    assert math.isfinite(first.outputs["loss"]) and math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_padded_and_padding_free_give_the_same_loss(tmp_path):
    losses = []
    for padding_free in (True, False):
        first = FirstStep()
        torch.manual_seed(0)
        trainer = cpu_trainer(
            tmp_path, max_steps=1, limit_val_batches=0, callbacks=[first, ReferenceModel(mode="copy")]
        )
        dm = data(padding_free=padding_free)
        dm.train_dataloader = lambda dm=dm: torch.utils.data.DataLoader(
            dm.train_dataset, batch_size=8, collate_fn=dm.collate
        )
        trainer.fit(DPOModule(learning_rate=1e-3, beta=1.0, loss_type="sft"), datamodule=dm)
        losses.append(first.outputs["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="Unknown loss_type"):
        DPOModule(loss_type="sigmod")
    with pytest.raises(ValueError, match="loss_weights"):
        DPOModule(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="beta"):
        DPOModule(beta=0.0)
    with pytest.raises(ValueError, match="needs a PEFT policy"):
        resolve_mode("adapter", policy_is_peft=False, has_separate_model=False)
    with pytest.raises(ValueError, match="sync_alpha"):
        ReferenceModel(mode="sync", sync_alpha=0.0)
