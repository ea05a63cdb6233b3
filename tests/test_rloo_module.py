"""RLOOModule on the tiny model: metrics, the KL folded into the reward, the rollout buffer, learning, bad input."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from ltpost import PromptDataModule, ReferenceModel, RLOOModule
from ltpost.losses.grpo import rloo_advantages, rloo_kl
from tests.helpers import cpu_trainer, even_token_reward
from tests.test_grpo_module import Recorder, params


def data(**kwargs) -> PromptDataModule:
    return PromptDataModule(
        **{"prompts_per_step": 4, "max_train_samples": 64, "max_eval_samples": 8, "eval_batch_size": 8, **kwargs}
    )


def module(**kwargs) -> RLOOModule:
    defaults = {
        "reward_funcs": [even_token_reward],
        "num_generations": 4,
        "max_completion_length": 6,
        "learning_rate": 1e-3,
        "beta": 0.0,
    }
    return RLOOModule(**{**defaults, **kwargs})


def test_a_run_moves_the_policy_and_logs_trl_metrics(tmp_path):
    """Without a KL term there is no reference model; weights move; TRL's names are logged; each rollout is used
    once, so no old-log-prob forward is stored and the sequence ratio is exactly 1."""
    recorder = Recorder()
    rloo = module()
    rloo.configure_model()
    before = params(rloo.model)
    trainer = cpu_trainer(
        tmp_path,
        max_steps=3,
        callbacks=[recorder],
        log_every_n_steps=1,
        val_check_interval=3,
        check_val_every_n_epoch=None,
    )
    trainer.fit(rloo, datamodule=data())
    assert any(not torch.equal(before[k], v) for k, v in rloo.model.state_dict().items())
    logged = set(trainer.logged_metrics)
    for name in ("reward", "reward_std", "frac_reward_zero_std", "rewards/even_token_reward/mean", "entropy",
                 "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio", "num_tokens"):  # fmt: skip
        assert f"train/{name}" in logged, name
    assert "eval/reward" in logged
    assert not any(isinstance(c, ReferenceModel) for c in trainer.callbacks)
    assert all("old_logps" not in s for s in recorder.slices)
    assert all(o["clip_ratio/region_mean"] == 0.0 for o in recorder.outputs)


class WeightsAtBatchStart(Callback):
    """The policy's weights when each step starts, i.e. the weights that sample the step's completions."""

    def __init__(self):
        self.snapshots = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshots.append(params(pl_module.model))


def test_kl_is_folded_into_the_reward(tmp_path):
    """beta > 0: a frozen reference copy; each round's KL is rloo_kl of the sampling policy's log-probs against the
    reference's, and the advantages are rloo_advantages of (reward - beta * KL). The first round's KL is exactly 0
    (policy == reference), later ones are not."""
    recorder, weights = Recorder(), WeightsAtBatchStart()
    rloo = module(beta=0.5, learning_rate=5e-3)
    trainer = cpu_trainer(tmp_path, max_steps=3, callbacks=[recorder, weights], limit_val_batches=0)
    trainer.fit(rloo, datamodule=data())
    reference = next(c for c in trainer.callbacks if isinstance(c, ReferenceModel))
    assert reference.resolved_mode == "copy"
    assert torch.all(recorder.slices[0]["kl"].abs() < 1e-5)
    last, sampler = recorder.slices[-1], rloo.build_reference_model(None)
    sampler.load_state_dict(weights.snapshots[-1])
    with torch.no_grad():
        old_logps = rloo.reference_compute(sampler, last)
        ref_logps = rloo.reference_compute(reference.reference, last)
    kl, _ = rloo_kl(old_logps, ref_logps, last["completion_mask"])
    torch.testing.assert_close(last["kl"], kl, atol=1e-5, rtol=1e-4)
    assert kl.abs().max() > 1e-4
    expected, _ = rloo_advantages(last["rewards"], 4, kl_penalty=0.5 * last["kl"])
    torch.testing.assert_close(last["advantages"], expected)


def test_num_iterations_reuses_the_round(tmp_path):
    recorder = Recorder()
    trainer = cpu_trainer(tmp_path, max_steps=4, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(module(num_iterations=2, learning_rate=5e-3), datamodule=data())
    assert recorder.generations == [1, 1, 2, 2]
    assert recorder.slices[0] is recorder.slices[1]
    assert "old_logps" in recorder.slices[0]


def test_rloo_raises_a_simple_reward_from_scratch(tmp_path):
    """Learning: 25 RLOO steps from the random tiny model raise the even-token reward clearly."""
    torch.manual_seed(0)
    recorder = Recorder()
    rloo = module(num_generations=8, learning_rate=3e-3, lr_scheduler_type="constant")
    trainer = cpu_trainer(tmp_path, max_steps=25, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(rloo, datamodule=data(prompts_per_step=8, max_train_samples=400))
    first, last = sum(recorder.rewards[:5]) / 5, sum(recorder.rewards[-5:]) / 5
    assert last > first + 0.2, recorder.rewards


def test_num_generations_below_two_is_rejected():
    with pytest.raises(ValueError, match="num_generations >= 2"):
        RLOOModule(num_generations=1)


def test_a_reward_function_that_raises_is_named(tmp_path):
    def broken_reward(prompts, completions, **kwargs):
        raise RuntimeError("sandbox down")

    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="reward function 'broken_reward' raised RuntimeError: sandbox down"):
        trainer.fit(module(reward_funcs=[broken_reward]), datamodule=data())
