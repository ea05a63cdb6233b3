"""Generate completions for a batch of prompts and score them with reward functions: what GRPO and RLOO share.

``generate_and_score`` is the host-side half of an online step (engine, decoding, reward functions);
``rollout_metrics`` turns its result into TRL's per-function reward and completion-length metrics. Both are plain
functions of their arguments, so the modules stay readable top to bottom and tests can call them directly.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ltpost.rewards import call_reward_functions, combine_rewards, reward_function_name
from ltpost.rewards.model import RewardModelScorer
from ltpost.rollout.base import Rollout, RolloutEngine, SamplingParams
from ltpost.rollout.hf import HFRolloutEngine

RewardFunc = Callable[..., Any] | str


def resolve_reward_funcs(reward_funcs: list[RewardFunc]) -> list[Callable[..., Any]]:
    """Callables as given; a string is an import path (``ltpost.rewards.integer_accuracy``) when it names a Python
    object, otherwise a reward-model checkpoint (a ``RewardModule`` export: local path or hub id)."""
    resolved = []
    for function in reward_funcs:
        if isinstance(function, str):
            imported = _import_object(function)
            resolved.append(imported if imported is not None else RewardModelScorer(function))
        elif callable(function):
            resolved.append(function)
        else:
            raise ValueError(
                f"A reward function must be a callable f(prompts, completions, **columns) or a reward-model path; got "
                f"{type(function).__name__}: {function!r:.80}"
            )
    return resolved


def _import_object(path: str) -> Any | None:
    """``package.module.name`` imported, or None when ``path`` is not such a path."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name or "/" in path or os.path.exists(path):
        return None
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None


@dataclass
class ScoredRollout:
    """A rollout with its rewards. ``N = P * G`` rows, grouped by prompt.

    Attributes:
        rollout: what the engine returned.
        prompt_ids: ``N`` prompt token lists (each prompt repeated for its completions).
        texts: ``N`` decoded completions.
        rewards: ``[N]`` weighted sum over the reward functions; NaN where none scored the completion.
        per_function: ``[num_functions][N]`` each function's rewards (None: not applicable).
    """

    rollout: Rollout
    prompt_ids: list[list[int]]
    texts: list[str]
    rewards: Tensor
    per_function: list[list[float | None]]


def generate_and_score(
    engine: RolloutEngine,
    tokenizer,
    reward_funcs: list[Callable[..., Any]],
    reward_weights: list[float] | None,
    batch: dict[str, Any],
    params: SamplingParams,
) -> ScoredRollout:
    """Completions for ``batch`` (from ``collate_prompt_rows``) and their rewards.

    Reward functions get TRL's keywords: ``prompts`` and ``completions`` (strings, or ``[{"role": "assistant",
    "content": ...}]`` for conversational prompts), every dataset column repeated per completion, and
    ``completion_ids``.

    Raises:
        ValueError: from ``call_reward_functions`` (naming the function), or when no function scored any completion.
    """
    rollout = engine.generate(batch["prompt_ids"], params)
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    prompts = [batch["prompts"][i] for i in rollout.prompt_index]
    conversational = isinstance(prompts[0], list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    columns = {name: [values[i] for i in rollout.prompt_index] for name, values in batch["columns"].items()}
    columns["completion_ids"] = rollout.completion_ids
    per_function = call_reward_functions(reward_funcs, prompts, completions, columns)
    total, valid = combine_rewards(per_function, reward_weights)
    if not any(valid):
        names = ", ".join(reward_function_name(f) for f in reward_funcs)
        raise ValueError(
            f"Every reward function ({names}) returned None for all {len(valid)} completions of this batch, so "
            f"nothing can be learned from it. None means 'does not apply to this completion'; check the functions "
            f"against a sample: prompt {prompts[0]!r:.100} got completion {texts[0]!r:.100}."
        )
    rewards = torch.tensor([t if ok else float("nan") for t, ok in zip(total, valid)], dtype=torch.float32)  # [N]
    prompt_ids = [batch["prompt_ids"][i] for i in rollout.prompt_index]
    return ScoredRollout(rollout, prompt_ids, texts, rewards, per_function)


def rollout_metrics(scored: ScoredRollout, reward_names: list[str]) -> dict[str, float]:
    """Per-function reward means and stds (``rewards/<name>/mean|std``, over the completions it scored) and TRL's
    completion-length metrics, as host floats."""
    metrics: dict[str, float] = {}
    for name, values in zip(reward_names, scored.per_function):
        present = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
        if len(present):
            metrics[f"rewards/{name}/mean"] = present.mean().item()
            metrics[f"rewards/{name}/std"] = present.std().item() if len(present) > 1 else 0.0
    lengths = torch.tensor([len(c) for c in scored.rollout.completion_ids], dtype=torch.float64)
    truncated = torch.tensor(scored.rollout.is_truncated, dtype=torch.bool)
    terminated = lengths[~truncated]
    metrics["completions/mean_length"] = lengths.mean().item()
    metrics["completions/min_length"] = lengths.min().item()
    metrics["completions/max_length"] = lengths.max().item()
    metrics["completions/clipped_ratio"] = truncated.double().mean().item()
    metrics["completions/mean_terminated_length"] = terminated.mean().item() if len(terminated) else 0.0
    return metrics


def default_engine(model, tokenizer, generation_batch_size: int | None = None) -> HFRolloutEngine:
    """The Hugging Face engine on the policy itself, stopping at the tokenizer's EOS and the model's configured EOS
    tokens (chat models often list the end-of-turn token there)."""
    eos = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    eos |= {configured} if isinstance(configured, int) else set(configured or [])
    return HFRolloutEngine(model, eos, tokenizer.pad_token_id, generation_batch_size)


def describe_schedule(
    method: str,
    prompts_per_step: int | None,
    num_generations: int,
    steps_per_generation: int,
    num_iterations: int,
    accumulate_grad_batches: int,
    world_size: int,
) -> str:
    """Check that the batch sizes fit together and say what they mean in one line (logged at setup).

    Raises:
        ValueError: when ``steps_per_generation`` and ``accumulate_grad_batches`` do not divide one another, so a
            generation round would end in the middle of an optimizer step; the message says what to set.
    """
    steps, accumulate = steps_per_generation, accumulate_grad_batches
    if steps % accumulate and accumulate % steps:
        raise ValueError(
            f"steps_per_generation={steps} and accumulate_grad_batches={accumulate} do not divide: a generation "
            f"round would end inside an optimizer step. Set steps_per_generation to a multiple of "
            f"accumulate_grad_batches (e.g. {accumulate}) or a divisor of it."
        )
    if prompts_per_step is None:
        return f"{method}: {num_generations} generations per prompt."
    per_step = prompts_per_step * num_generations
    return (
        f"{method} batch: {prompts_per_step} prompts x {num_generations} generations = {per_step} completions per "
        f"micro-step per device ({per_step * world_size} over {world_size} devices, {per_step * world_size * accumulate} "
        f"per optimizer step); one generation round = {prompts_per_step * steps} prompts per device, trained on for "
        f"{steps * num_iterations} micro-steps."
    )
