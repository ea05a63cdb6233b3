"""The rollout engine interface: generate completions (token ids and sampling log-probs) for prompts, load weights.

Online methods (GRPO, RLOO) talk to an engine only through ``RolloutEngine``: the Hugging Face engine
(``ltpost.rollout.hf``, the default, runs anywhere) generates with the policy itself; a vLLM engine plugs into the
same two methods. Prompts and completions are token-id lists, so the engine never needs the chat template.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled (names as in TRL's GRPOConfig and vLLM's ``SamplingParams``).

    Args:
        max_completion_length: most tokens generated per completion (the end-of-turn token included).
        num_generations: completions per prompt (``n``); they come back grouped by prompt.
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass (1.0: off).
        top_k: keep the ``k`` most likely tokens (0 or None: off).
        min_p: drop tokens below ``min_p`` times the top token's probability (None: off).
        repetition_penalty: CTRL-style penalty on tokens already in the prompt or completion (1.0: off).
    """

    max_completion_length: int = 256
    num_generations: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}.")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: off), got {self.top_k}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0: off), got {self.repetition_penalty}.")


@dataclass
class Rollout:
    """What an engine returns for ``P`` prompts and ``G = num_generations``: ``N = P * G`` completions, grouped by
    prompt (rows ``p*G .. p*G+G-1`` answer prompt ``p``).

    Attributes:
        completion_ids: ``N`` token-id lists, each ending with the end-of-turn token unless truncated.
        logprobs: ``N`` lists of the sampled tokens' log-probs under the distribution they were drawn from
            (after temperature, top-k/top-p/min-p and repetition penalty), aligned with ``completion_ids``.
        is_truncated: ``N`` flags, True where the completion hit ``max_completion_length`` without ending.
        prompt_index: ``N`` indices of each completion's prompt.
    """

    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    is_truncated: list[bool]
    prompt_index: list[int] = field(default_factory=list)


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions for token-id prompts, and takes new policy weights."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        """``len(prompt_ids) * params.num_generations`` completions, grouped by prompt, without autograd."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights by the policy's ``(name, tensor)`` pairs (Hugging Face parameter names)."""
        ...
