"""The methods learn on the embedded task: SFT, then DPO and a reward model starting from the SFT checkpoint, and
GRPO and RLOO from the shipped SFT checkpoint.

One SFT run (about 1-2 minutes on 2 CPU cores) is shared by the module through a fixture: its export is the
starting point of the preference methods, as in configs/sft.yaml -> configs/dpo.yaml / configs/reward.yaml. The
online methods start from ``ltpost:tiny-llama-sft`` (what configs/sft.yaml exports, shipped in the package), as
configs/grpo.yaml and configs/rloo.yaml do.
"""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback, seed_everything

from ltpost import (
    DPOModule,
    GRPOModule,
    HFExport,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    RLOOModule,
    SFTDataModule,
    SFTModule,
    TrainingHealth,
)
from tests.helpers import arithmetic_exact_match, cpu_trainer

pytestmark = pytest.mark.slow


def health_findings(trainer) -> list[str]:
    """What the TrainingHealth callback each module adds said during the run: these are the shipped configs'
    recipes, logged as often as the configs log, so any finding here is a false positive."""
    (callback,) = [c for c in trainer.callbacks if isinstance(c, TrainingHealth)]
    return [f"{r['code']} at step {r['step']}: {r['message']}" for r in callback.records]


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
    """From the SFT backbone (fresh score head, ~0.5 accuracy), held-out pairwise accuracy reaches >= 0.9."""
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
    assert after["eval/accuracy"] >= 0.9  # measured 0.925 at step 300 and 0.96 at 600 (lr 3e-4, cosine over 600)
    assert health_findings(trainer) == []


class RoundRewards(Callback):
    """The mean reward of each generation round (one per step here), as the module computed it."""

    def __init__(self):
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rewards.append(float(pl_module._round_metrics["reward"]))


def online_run(module, steps: int, tmp_path, gradient_clip_val: float | None = None) -> dict:
    """``steps`` of ``module`` on the embedded prompts (the settings of configs/grpo.yaml and configs/rloo.yaml),
    with held-out greedy exact match before and after."""
    seed_everything(0)
    module.configure_model()
    exact_before = arithmetic_exact_match(module.model, module.tokenizer)
    rewards = RoundRewards()
    trainer = cpu_trainer(
        tmp_path,
        max_steps=steps,
        callbacks=[rewards],
        limit_val_batches=0,
        log_every_n_steps=5,
        gradient_clip_val=gradient_clip_val,
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts_per_step=16, max_prompt_length=64, eval_split=None))
    exact_after = arithmetic_exact_match(module.model, module.tokenizer)
    first, last = rewards.rewards[:50], rewards.rewards[-50:]
    result = {
        "reward": (sum(first) / len(first), sum(last) / len(last)),
        "exact": (exact_before, exact_after),
        "health": health_findings(trainer),
    }
    print(result)
    return result


ONLINE = {
    "model": "ltpost:tiny-llama-sft",
    "reward_funcs": ["ltpost.rewards.integer_accuracy"],
    "num_generations": 16,
    "max_completion_length": 8,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "packing_row_tokens": 512,
}


def test_grpo_raises_the_arithmetic_reward(tmp_path):
    """From the shipped SFT checkpoint (19.5% held-out exact match), 200 GRPO steps on the exact-sum reward raise the
    reward of sampled answers (mean over the first 50 rounds vs the last 50; measured 0.11 -> 0.23 with one thread)
    and held-out greedy exact match (measured 0.195 -> 0.345)."""
    result = online_run(GRPOModule(**ONLINE), 200, tmp_path)
    (first, last), (exact_before, exact_after) = result["reward"], result["exact"]
    assert last > first + 0.06
    assert exact_after > exact_before + 0.05
    assert result["health"] == []


def test_rloo_raises_the_arithmetic_reward(tmp_path):
    """The same with RLOO (configs/rloo.yaml: no KL, advantages normalized over the batch), 300 steps: RLOO learns
    more slowly at first than GRPO with its group-scaled advantages (measured reward 0.10 -> 0.20 with one thread,
    exact 0.195 -> 0.245)."""
    result = online_run(RLOOModule(**ONLINE, beta=0.0, normalize_advantages=True), 300, tmp_path)
    (first, last), (exact_before, exact_after) = result["reward"], result["exact"]
    assert last > first + 0.05
    assert exact_after > exact_before
    # RLOO's unclipped steps have rare real gradient spikes (a norm of 103 at step 164, 11x the median), which
    # TrainingHealth rightly reports; clipping them at 50 changed the trajectory and slowed learning (reward
    # 0.10 -> 0.15 in 300 steps). Nothing else may fire.
    assert {finding.split(" ")[0] for finding in result["health"]} <= {"grad-norm-spike"}, result["health"]
