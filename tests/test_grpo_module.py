"""GRPOModule on the tiny model: a run's metrics and weights, the rollout buffer, the reference, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Callback

from ltpost import GRPOModule, PromptDataModule, ReferenceModel
from ltpost.rollout.batch import completion_logps
from tests.helpers import cpu_trainer, even_token_reward


def data(**kwargs) -> PromptDataModule:
    return PromptDataModule(
        **{"prompts_per_step": 4, "max_train_samples": 64, "max_eval_samples": 8, "eval_batch_size": 8, **kwargs}
    )


def module(**kwargs) -> GRPOModule:
    defaults = {
        "reward_funcs": [even_token_reward],
        "num_generations": 4,
        "max_completion_length": 6,
        "learning_rate": 1e-3,
    }
    return GRPOModule(**{**defaults, **kwargs})


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Recorder(Callback):
    """Keeps each step's outputs, the rollout buffer's slice and how many generate calls happened so far."""

    def __init__(self):
        self.outputs, self.slices, self.generations, self.rewards = [], [], [], []

    def on_fit_start(self, trainer, pl_module):
        engine = pl_module.rollout_engine
        original = engine.generate
        self.calls = 0

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        engine.generate = counted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: float(v) for k, v in outputs.items()})
        self.slices.append(pl_module._buffer[batch["round_step"] % pl_module.steps_per_generation])
        self.generations.append(self.calls)
        self.rewards.append(float(pl_module._round_metrics["reward"]))


def test_a_run_moves_the_policy_and_logs_trl_metrics(tmp_path):
    """Three steps with a reward that varies between completions: weights change, TRL's metric names are logged,
    and the on-policy ratio is exactly 1 (nothing clipped)."""
    recorder = Recorder()
    grpo = module()
    trainer = cpu_trainer(
        tmp_path,
        max_steps=3,
        callbacks=[recorder],
        log_every_n_steps=1,
        val_check_interval=3,
        check_val_every_n_epoch=None,
    )
    grpo.configure_model()
    before = params(grpo.model)
    trainer.fit(grpo, datamodule=data())
    after = params(grpo.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logged = set(trainer.logged_metrics)
    for name in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/even_token_reward/mean",
        "rewards/even_token_reward/std",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/max_length",
        "completions/min_length",
        "completions/clipped_ratio",
        "num_tokens",
        "loss",
    ):
        assert f"train/{name}" in logged, name
    assert "train/kl" not in logged  # beta = 0: no KL and no reference model
    assert "eval/reward" in logged and "eval/rewards/even_token_reward/mean" in logged
    assert not any(isinstance(c, ReferenceModel) for c in trainer.callbacks)
    assert recorder.generations == [1, 2, 3]  # one generation round per step
    assert all(o["clip_ratio/region_mean"] == 0.0 for o in recorder.outputs)
    assert all("old_logps" not in s for s in recorder.slices)  # used once: no old-log-prob forward


def test_each_rollout_used_once_costs_one_training_forward(tmp_path):
    """With num_iterations=1 and steps_per_generation=1 the only forwards outside generation are the training
    forwards, one per packed row: no forward for old log-probs, none for a reference (beta=0)."""
    grpo = module()
    grpo.configure_model()
    calls = []
    grpo.model.register_forward_pre_hook(
        lambda m, a, k: calls.append(torch.is_inference_mode_enabled()), with_kwargs=True
    )
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(grpo, datamodule=data())
    outside_generation = [c for c in calls if not c]
    assert len(outside_generation) == 2  # two steps, one row each (packing_row_tokens=None)
    assert len(calls) > 2  # generation ran too, in inference mode


def test_num_iterations_reuses_completions_against_their_old_logprobs(tmp_path):
    """num_iterations=2: one generation serves two steps on the same completions; the old log-probs stored at
    generation time are the policy's log-probs before any update, so on the second step the ratio differs from 1."""
    recorder = Recorder()
    grpo = module(num_iterations=2, learning_rate=5e-3)
    grpo.configure_model()
    initial = params(grpo.model)
    trainer = cpu_trainer(tmp_path, max_steps=4, callbacks=[recorder], log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(grpo, datamodule=data())
    assert recorder.generations == [1, 1, 2, 2]
    first, second = recorder.slices[0], recorder.slices[1]
    assert first is second  # the very same completions
    assert torch.equal(first["input_ids"], second["input_ids"])
    # old log-probs equal a fresh computation with the initial weights
    reference = GRPOModule(**{k: v for k, v in grpo.hparams.items()})
    reference.configure_model()
    reference.model.load_state_dict(initial)
    with torch.no_grad():
        expected, _ = completion_logps(reference.model, first, temperature=1.0)
    torch.testing.assert_close(first["old_logps"], expected, atol=1e-5, rtol=0)
    # step 1 is on-policy in value (ratio 1), step 2 runs after an update: the loss sees a moved ratio
    with torch.no_grad():
        moved, _ = completion_logps(grpo.model, first, temperature=1.0)
    assert (moved - first["old_logps"]).abs().max() > 1e-4


def test_steps_per_generation_slices_one_round(tmp_path):
    """steps_per_generation=2: one generate call for two steps, each step training on its own half of the round."""
    recorder = Recorder()
    trainer = cpu_trainer(tmp_path, max_steps=4, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(module(steps_per_generation=2), datamodule=data())
    assert recorder.generations == [1, 1, 2, 2]
    assert recorder.slices[0] is not recorder.slices[1]
    assert recorder.slices[0]["advantages"].shape == (16,)  # 4 prompts x 4 generations per step
    assert "old_logps" in recorder.slices[1]  # trained after an optimizer step: needs the sampling policy's logps


def test_beta_uses_a_frozen_reference_copy(tmp_path):
    """beta > 0 adds a ReferenceModel in copy mode (no precompute for online methods): KL is 0 on the first step
    (policy == reference), positive later, and the reference weights never change."""
    recorder = Recorder()
    grpo = module(beta=0.1, learning_rate=5e-3)
    trainer = cpu_trainer(tmp_path, max_steps=3, callbacks=[recorder], log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(grpo, datamodule=data())
    reference = next(c for c in trainer.callbacks if isinstance(c, ReferenceModel))
    assert reference.resolved_mode == "copy"
    assert recorder.outputs[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert recorder.outputs[-1]["kl"] > 0
    fresh = grpo.build_reference_model(None)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), reference.reference.state_dict().values())
    )


def test_lora_reference_is_the_base_model(tmp_path):
    """With LoRA and beta > 0 the reference is the policy with adapters disabled: no second model."""
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    grpo = module(beta=0.1, use_peft=True, lora_r=4, lora_alpha=8)
    trainer.fit(grpo, datamodule=data())
    reference = next(c for c in trainer.callbacks if isinstance(c, ReferenceModel))
    assert reference.resolved_mode == "adapter" and reference.reference is None


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "cispo"])
def test_every_loss_type_trains(tmp_path, loss_type):
    """Each loss_type runs end to end with importance sampling at sequence level (GSPO) and num_iterations=2."""
    extra = {"epsilon_high": 5.0} if loss_type == "cispo" else {}
    grpo = module(loss_type=loss_type, importance_sampling_level="sequence", num_iterations=2, **extra)
    grpo.configure_model()
    before = params(grpo.model)
    cpu_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(grpo, datamodule=data())
    assert any(not torch.equal(before[k], v) for k, v in grpo.model.state_dict().items())


def test_masks_and_entropy_filter_run(tmp_path):
    """mask_truncated_completions and top_entropy_quantile change which tokens carry loss; with every completion
    truncated (6 tokens from a random model) the masked loss is exactly 0."""
    recorder = Recorder()
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(module(mask_truncated_completions=True, top_entropy_quantile=0.2), datamodule=data())
    for step in recorder.slices:
        truncated = step["is_truncated"]
        assert torch.all(step["loss_mask"][truncated] == 0)
    if all(bool(s["is_truncated"].all()) for s in recorder.slices):
        assert all(o["loss"] == 0.0 for o in recorder.outputs) if "loss" in recorder.outputs[0] else True


# -- bad input ---------------------------------------------------------------------------------------------------


def test_num_generations_below_two_is_rejected():
    with pytest.raises(ValueError, match="num_generations >= 2"):
        GRPOModule(num_generations=1)


def test_generation_batch_size_must_hold_whole_groups():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        GRPOModule(num_generations=8, generation_batch_size=12)


def test_steps_per_generation_must_fit_gradient_accumulation(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, limit_val_batches=0)
    with pytest.raises(ValueError, match="steps_per_generation=3 and accumulate_grad_batches=2"):
        trainer.fit(module(steps_per_generation=3), datamodule=data())


def test_a_reward_function_that_raises_is_named_with_a_sample(tmp_path):
    def broken_reward(prompts, completions, answer, **kwargs):
        raise KeyError("score")

    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="reward function 'broken_reward' raised KeyError"):
        trainer.fit(module(reward_funcs=[broken_reward]), datamodule=data())


def test_a_reward_function_with_the_wrong_length_is_named(tmp_path):
    def short_reward(prompts, completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"'short_reward' returned 15 values for 16 completions"):
        trainer.fit(module(reward_funcs=[short_reward]), datamodule=data())


def test_rewards_that_are_all_none_are_an_error_with_a_sample(tmp_path):
    def never_applies(prompts, completions, **kwargs):
        return [None] * len(completions)

    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="returned None for all 16 completions") as error:
        trainer.fit(module(reward_funcs=[never_applies]), datamodule=data())
    assert "got completion" in str(error.value)


def test_rows_no_function_scored_get_zero_advantage(tmp_path):
    """A completion every function skipped (None) has NaN reward and zero advantage; the rest still learn."""

    def odd_rows_only(prompts, completions, completion_ids, **kwargs):
        return [float(sum(t % 2 == 0 for t in ids)) if i % 2 else None for i, ids in enumerate(completion_ids)]

    recorder = Recorder()
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[recorder], limit_val_batches=0)
    trainer.fit(module(reward_funcs=[odd_rows_only]), datamodule=data())
    advantages = recorder.slices[0]["advantages"]
    assert torch.all(advantages[0::2] == 0)
    assert torch.any(advantages[1::2] != 0)


def test_prompts_longer_than_the_limit_are_an_error(tmp_path):
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match="longer than max_prompt_length=5"):
        trainer.fit(module(), datamodule=data(max_prompt_length=5))


def test_reward_funcs_from_import_paths_and_hparams_round_trip(tmp_path):
    """A YAML-style import path resolves to the function; the module's hparams survive a checkpoint."""
    grpo = GRPOModule(reward_funcs=["ltpost.rewards.integer_accuracy"], num_generations=2, max_completion_length=4)
    trainer = cpu_trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=True)
    trainer.fit(grpo, datamodule=data())
    assert grpo.reward_names == ["integer_accuracy"]
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert json.dumps(checkpoint["hyper_parameters"]["reward_funcs"]) == '["ltpost.rewards.integer_accuracy"]'


def test_grpo_raises_a_simple_reward_from_scratch(tmp_path):
    """Learning, not just running: from the random tiny model, 25 GRPO steps on the even-token reward raise the
    mean reward of sampled completions clearly above its starting level (about 0.5: half the vocabulary is even)."""
    torch.manual_seed(0)
    recorder = Recorder()
    grpo = module(num_generations=8, learning_rate=3e-3, lr_scheduler_type="constant")
    trainer = cpu_trainer(tmp_path, max_steps=25, callbacks=[recorder], log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(grpo, datamodule=data(prompts_per_step=8, max_train_samples=400))
    first, last = sum(recorder.rewards[:5]) / 5, sum(recorder.rewards[-5:]) / 5
    assert last > first + 0.2, recorder.rewards
