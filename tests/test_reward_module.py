"""RewardModule on the tiny model: trains, scores padded and padding-free batches alike, exports and reloads."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from ltpost import HFExport, PreferenceDataModule, RewardModule
from ltpost.modules.reward import sequence_scores
from tests.helpers import cpu_trainer


def data(**kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(**{"batch_size": 8, "max_train_samples": 32, "max_eval_samples": 16, **kwargs})


def test_scores_agree_padded_and_padding_free_and_with_hf_pooling():
    """One scalar per sequence, read at its last token: the same for a padded batch, a padding-free row, and
    the classifier's own pooling on the padded batch (pad != eos here, so HF pools the same last token)."""
    module = RewardModule()
    module.configure_model()
    model = module.model.eval()
    free, padded = data(tokenizer="ltpost:tiny-llama"), data(tokenizer="ltpost:tiny-llama", padding_free=False)
    free.setup("fit"), padded.setup("fit")
    rows = [free.train_dataset[i] for i in range(4)]
    with torch.no_grad():
        a = sequence_scores(model, free.collate(rows))
        batch = padded.collate(rows)
        b = sequence_scores(model, batch)
        c = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    assert a.shape == (8,)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, c, atol=1e-5, rtol=0)


def test_trains_logs_and_exports_a_loadable_classifier(tmp_path):
    export = HFExport(dirpath=str(tmp_path / "rm"))
    module = RewardModule(learning_rate=1e-3, center_rewards_coefficient=0.01)
    trainer = cpu_trainer(
        tmp_path, max_steps=4, limit_val_batches=2, val_check_interval=4, callbacks=[export], log_every_n_steps=1
    )
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=data())
    for name in ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert f"train/{name}" in trainer.callback_metrics and f"eval/{name}" in trainer.callback_metrics, name
    assert not torch.equal(before["score.weight"], module.model.state_dict()["score.weight"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert reloaded.config.num_labels == 1
    dm = trainer.datamodule
    batch = dm.collate([dm.eval_dataset[i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_scores(reloaded, batch), sequence_scores(module.model.eval(), batch), atol=1e-5, rtol=0
        )


def test_lora_reward_model_trains_adapters_and_head_only(tmp_path):
    module = RewardModule(learning_rate=1e-3, use_peft=True, lora_r=4, lora_alpha=8)
    trainer = cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    module.configure_model()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer.fit(module, datamodule=data())
    after = module.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_" in k for k in changed) and any("score" in k for k in changed)
    assert all("lora_" in k or "score" in k for k in changed), sorted(changed)
