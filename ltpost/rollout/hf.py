"""Rollouts with Hugging Face ``generate`` on the policy itself: the default engine, runs anywhere.

Generation runs in inference mode with the KV cache, in eval mode (no dropout), in chunks of at most
``generation_batch_size`` rows. The sampling pipeline is transformers' own processors (repetition penalty, then
temperature, top-k, top-p, min-p), passed to ``generate`` as one ``LogitsProcessorList`` with a last processor that
records the log-prob of each sampled token under the final distribution. Recording keeps one ``[B, V]`` tensor at a
time; ``output_scores`` would keep one per generated token (``T * B * V``: 38 GB for 512 tokens of 128 rows over a
150k vocabulary). Each distinct prompt is prefilled once and its KV cache repeated for its ``num_generations``
completions (``prefill_once``), so the prompt costs one row of compute per group, not ``G``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ltpost.rollout.base import Rollout, SamplingParams
from ltpost.strategies import gathered_for_generation, is_sharded, no_grad_for


class SampledLogprobRecorder(LogitsProcessor):
    """Records ``log_softmax(scores)[token]`` for every generated token, one step late.

    ``generate`` calls processors with the ids so far and the scores of the next position; the token drawn from
    these scores appears in ``input_ids`` only at the next call. So each call reads the previous step's
    log-softmax at the newest token, and ``finish`` reads the last one. Scores pass through unchanged.
    """

    def __init__(self) -> None:
        self.previous: Tensor | None = None  # [B, V] log-softmax of the last step
        self.steps: list[Tensor] = []  # each [B]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._read(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)  # [B, V]
        return scores

    def _read(self, tokens: Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, tokens[:, None]).squeeze(-1))  # [B]

    def finish(self, sequences: Tensor) -> Tensor:
        """``[B, T_new]`` log-probs of the generated tokens (``sequences`` are the full ``generate`` output)."""
        self._read(sequences[:, -1])
        self.previous = None
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((sequences.size(0), 0)).float()


def sampling_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """transformers' processors for ``params``, in vLLM's order: penalty, temperature, top-k, top-p, min-p."""
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.min_p:
            processors.append(MinPLogitsWarper(params.min_p))
    return processors


def split_completions(
    generated: Tensor, logprobs: Tensor, eos_token_ids: set[int]
) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """Cut each generated row after its first end-of-turn token; a row without one is truncated.

    Args:
        generated: ``[N, T_new]`` new tokens (rows that ended early are padded by ``generate``).
        logprobs: ``[N, T_new]`` their recorded log-probs.
        eos_token_ids: tokens that end a completion.
    """
    ids_rows, logprob_rows, truncated = generated.tolist(), logprobs.tolist(), []  # one host transfer each
    completions, completion_logprobs = [], []
    for ids, values in zip(ids_rows, logprob_rows):
        end = next((i + 1 for i, token in enumerate(ids) if token in eos_token_ids), None)
        truncated.append(end is None)
        end = len(ids) if end is None else end
        completions.append(ids[:end])
        completion_logprobs.append(values[:end])
    return completions, completion_logprobs, truncated


@contextmanager
def _blank_generation_config(model: torch.nn.Module, config: GenerationConfig):
    """Temporarily give every transformers model inside ``model`` (itself, or the one a PEFT wrapper holds) a
    generation config holding only ``config``'s token ids; the originals are restored afterwards."""
    blank = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    saved = [
        (m, m.generation_config)
        for m in model.modules()
        if isinstance(getattr(m, "generation_config", None), GenerationConfig)
    ]
    try:
        for m, _ in saved:
            m.generation_config = blank
        yield
    finally:
        for m, original in saved:
            m.generation_config = original


class HFRolloutEngine:
    """Generates with ``model.generate`` on the policy model itself, so it never needs new weights.

    Args:
        model: the policy (a transformers causal LM, PEFT-wrapped or not). Generation uses its current weights.
        eos_token_ids: tokens that end a completion (end of turn); default: the model's generation config.
        pad_token_id: the padding token id for left-padded prompts.
        generation_batch_size: most rows per ``generate`` call (None: all at once), bounding the KV cache's memory;
            a call holds at least one whole prompt group (``num_generations`` rows).
        prefill_once: compute each prompt's KV cache once and share it among its ``num_generations`` completions
            (same completions and log-probs; needs a model that takes a ``DynamicCache``, as decoder-only
            transformers models do).
    """

    generates_with_policy = True  # load_weights has nothing to do: VLLMSync skips this engine

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_ids: Iterable[int] | None = None,
        pad_token_id: int = 0,
        generation_batch_size: int | None = None,
        prefill_once: bool = True,
    ) -> None:
        if eos_token_ids is None:
            configured = model.generation_config.eos_token_id
            eos_token_ids = [configured] if isinstance(configured, int) else list(configured or [])
        self.eos_token_ids = sorted(set(eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("HFRolloutEngine needs at least one end-of-turn token id (eos_token_ids).")
        if generation_batch_size is not None and generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1 (or None), got {generation_batch_size}.")
        self.model = model
        self.pad_token_id = pad_token_id
        self.generation_batch_size = generation_batch_size
        self.prefill_once = prefill_once
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns); older versions know only it.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_keyword = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Nothing to load: this engine generates with the policy's own parameters."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        with no_grad_for(self.model):
            return self._generate(prompt_ids, params)

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("HFRolloutEngine.generate needs a non-empty list of non-empty prompts.")
        group = params.num_generations
        rows_per_call = self.generation_batch_size or len(prompt_ids) * group
        prompts_per_call = max(1, rows_per_call // group)
        was_training = self.model.training
        self.model.eval()
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        truncated: list[bool] = []
        # FSDP2: gather the weights once for the whole call (not once per token), and keep every rank stepping
        # until all ranks' rows are done (each forward is a collective; ranks stop at different lengths).
        synced = is_sharded(self.model) and dist.is_initialized() and dist.get_world_size() > 1
        try:
            with gathered_for_generation(self.model):
                for start in range(0, len(prompt_ids), prompts_per_call):
                    chunk = prompt_ids[start : start + prompts_per_call]
                    ids, values, cut = self._generate_chunk(chunk, params, synced)
                    completions += ids
                    logprobs += values
                    truncated += cut
        finally:
            self.model.train(was_training)
        prompt_index = [p for p in range(len(prompt_ids)) for _ in range(group)]
        return Rollout(completions, logprobs, truncated, prompt_index)

    def _generate_chunk(self, prompt_ids: list[list[int]], params: SamplingParams, synced: bool = False):
        device = next(self.model.parameters()).device
        group = params.num_generations
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        cache = None
        if self.prefill_once and group > 1 and width > 1:
            cache = self._prefilled_cache(input_ids, attention_mask, group)
        input_ids = input_ids.repeat_interleave(group, dim=0)  # [P*G, width], grouped by prompt
        attention_mask = attention_mask.repeat_interleave(group, dim=0)
        recorder = SampledLogprobRecorder()
        # Every sampling setting is one of ours, in the processor list (see _blank_generation_config).
        sample = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=params.max_completion_length,
            do_sample=sample,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            **(dict(temperature=1.0, top_k=0, top_p=1.0) if sample else {}),
        )
        # transformers fills every setting left unset in `config` from `model.generation_config` (a checkpoint's
        # repetition_penalty=1.05, min_p ...) and applies them outside our processor list: generate against a blank one.
        with _blank_generation_config(self.model, config):
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **({self._cache_keyword: cache} if cache is not None else {}),
                generation_config=config,
                synced_gpus=synced,
                logits_processor=LogitsProcessorList([*sampling_processors(params), recorder]),
            )  # [P*G, width + T_new]
        return split_completions(sequences[:, width:], recorder.finish(sequences), set(self.eos_token_ids))

    def _prefilled_cache(self, input_ids: Tensor, attention_mask: Tensor, group: int) -> DynamicCache:
        """The KV cache of each distinct prompt but its last token, computed once and repeated for its ``group``
        completions. ``generate`` then feeds only the last prompt token: the prompt's prefill costs ``P`` rows
        instead of ``P * G`` (the embedded task's 15-token prompts with 16 completions: a third of the time of
        a whole ``generate`` call). Positions are those ``generate`` derives from the left-padded mask."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [P, width]
        cache = DynamicCache(config=self.model.config)
        self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids[:, :-1],
            use_cache=True,
            **{self._cache_keyword: cache},
        )
        cache.batch_repeat_interleave(group)
        return cache
