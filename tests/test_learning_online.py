"""The online methods learn on the embedded task: GRPO and RLOO from ``ltpost:tiny-llama-sft`` (what
configs/sft.yaml exports, shipped in the package), as configs/grpo.yaml and configs/rloo.yaml do."""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback, seed_everything

from ltpost import GRPOModule, PromptDataModule, RLOOModule
from tests.helpers import arithmetic_exact_match, cpu_trainer, health_findings

pytestmark = pytest.mark.slow


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
