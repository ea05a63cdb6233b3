"""The offline methods learn on the embedded task: SFT, then DPO and a reward model starting from the SFT checkpoint
(GRPO and RLOO: tests/test_learning_online.py, a file of its own so pytest-xdist runs it beside this one).

One SFT run (about 1-2 minutes on 2 CPU cores) is shared by the module through a fixture: its export is the
starting point of the preference methods, as in configs/sft.yaml -> configs/dpo.yaml / configs/reward.yaml.
"""

from __future__ import annotations

import pytest
from lightning.pytorch import seed_everything

from ltpost import (
    DPOModule,
    HFExport,
    PreferenceDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
)
from tests.helpers import arithmetic_exact_match, cpu_trainer, health_findings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """SFT of the tiny model on arithmetic (the recipe of configs/sft.yaml), exported."""
    seed_everything(0)  # the data order depends on the global RNG: without a seed, results vary run to run
    root = tmp_path_factory.mktemp("sft")
    module = SFTModule(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.01)
    data = SFTDataModule(assistant_only_loss=True, batch_size=16, max_length=64, max_eval_samples=200)
    trainer = cpu_trainer(
        root,
        max_steps=1500,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        callbacks=[HFExport(dirpath=str(root / "hf"))],
    )
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    exact_before = arithmetic_exact_match(module.model, data.tokenizer)
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    exact_after = arithmetic_exact_match(module.model, data.tokenizer)
    return {
        "path": str(root / "hf"),
        "before": before,
        "after": after,
        "exact": (exact_before, exact_after),
        "health": health_findings(trainer),
    }


def test_sft_learns_arithmetic(sft_run):
    """Held-out loss falls and exact match on held-out sums rises (the test split shares no pair with train)."""
    before, after = sft_run["before"], sft_run["after"]
    exact_before, exact_after = sft_run["exact"]
    print(
        f"eval/loss {before['eval/loss']:.3f} -> {after['eval/loss']:.3f}; exact {exact_before:.3f} -> {exact_after:.3f}"
    )
    assert after["eval/loss"] < 0.5 * before["eval/loss"]
    assert after["eval/loss"] < 1.0  # measured 0.75-0.87
    assert after["eval/mean_token_accuracy"] > before["eval/mean_token_accuracy"] + 0.3
    assert exact_before == 0.0
    # Measured 0.67 (eval/loss 0.46) with this seed, with or without TrainingHealth and at any logging interval;
    # configs/sft.yaml, seeded through the CLI (another data order), gives 0.195; earlier code gave 0.07-0.15.
    assert exact_after >= 0.05
    assert sft_run["health"] == []


def test_dpo_learns_to_prefer_correct_answers(sft_run, tmp_path):
    """From the SFT checkpoint, held-out rewards/accuracies goes from 0 (policy == reference: all ties) to >= 0.9."""
    seed_everything(0)
    module = DPOModule(sft_run["path"], beta=0.3, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_ratio=0.05)
    data = PreferenceDataModule(batch_size=16, max_length=128, max_eval_samples=200)
    trainer = cpu_trainer(tmp_path, max_steps=200, gradient_clip_val=1.0, log_every_n_steps=10)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    print({k: (round(before[k], 3), round(after[k], 3)) for k in after})
    assert before["eval/rewards/accuracies"] == 0.0 and before["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert after["eval/rewards/accuracies"] >= 0.9  # measured 0.945 (beta 0.3); beta 0.1 gave 0.875-0.93
    assert after["eval/rewards/margins"] > 0.3
    assert after["eval/loss"] < before["eval/loss"] - 0.1
    assert health_findings(trainer) == []


def test_reward_model_ranks_held_out_pairs(sft_run, tmp_path):
    """From the SFT backbone (fresh score head, ~0.5 accuracy), held-out pairwise accuracy reaches >= 0.85."""
    seed_everything(0)
    module = RewardModule(
        sft_run["path"], learning_rate=3e-4, lr_scheduler_type="cosine", warmup_ratio=0.05, weight_decay=0.01
    )
    data = PreferenceDataModule(batch_size=16, max_length=128, max_eval_samples=200)
    trainer = cpu_trainer(tmp_path, max_steps=500, gradient_clip_val=1.0, log_every_n_steps=10)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    print({k: (round(before[k], 3), round(after[k], 3)) for k in after})
    assert before["eval/accuracy"] < 0.7
    # measured 0.90 (180 of 200 held-out pairs) after 500 steps with the resumable loaders' seeded shuffle, 0.925
    # with the global generator's shuffle before it: at this size the data order moves it by a few pairs
    assert after["eval/accuracy"] >= 0.85
    assert health_findings(trainer) == []
