"""Shaping penalties (rewards <= 0): DAPO's soft overlong punishment and an n-gram repetition penalty.

Both are built by a factory and returned as callable objects rather than closures, so they pickle (to a DataLoader
worker or a spawned rollout process) and carry a ``__name__`` for logging.
"""

from __future__ import annotations

from typing import Literal

from ltpost.rewards.common import completion_text


def soft_overlong_penalty(max_completion_length: int, soft_punish_cache: int) -> SoftOverlongPenalty:
    """DAPO's soft overlong punishment (Eq. 13 of https://arxiv.org/abs/2503.14476), on completion token counts.

    With ``L = max_completion_length``, ``C = soft_punish_cache`` and ``n`` the completion's token count:
    0 when ``n <= L - C``; ``(L - C - n) / C`` when ``L - C < n <= L`` (linear, reaching -1 at ``L``); -1 beyond
    ``L``. E.g. ``L=100, C=20``: 80 tokens -> 0.0, 90 -> -0.5, 100 -> -1.0.

    The returned function reads the ``completion_ids`` keyword (a list of token-id lists, one per completion),
    which the online trainers pass to every reward function beside the dataset columns, as TRL's GRPOTrainer does.
    Set ``L`` to the trainer's ``max_completion_length`` so a truncated completion gets the full -1.

    Args:
        max_completion_length: ``L``, the longest completion in tokens (>= 1).
        soft_punish_cache: ``C``, the width of the linear zone below ``L`` (0 <= C <= L; 0 is a hard -1 past ``L``).
    """
    return SoftOverlongPenalty(max_completion_length, soft_punish_cache)


class SoftOverlongPenalty:
    """See ``soft_overlong_penalty``."""

    __name__ = "soft_overlong_penalty"

    def __init__(self, max_completion_length: int, soft_punish_cache: int) -> None:
        if max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1 token, got {max_completion_length}.")
        if not 0 <= soft_punish_cache <= max_completion_length:
            raise ValueError(
                f"soft_punish_cache must be in [0, max_completion_length={max_completion_length}], got {soft_punish_cache}."
            )
        self.max_completion_length = max_completion_length
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError(
                "soft_overlong_penalty needs the 'completion_ids' keyword (one token-id list per completion); the "
                "online trainers pass it. Calling it by hand: soft_overlong_penalty(L, C)(prompts, completions, "
                "completion_ids=[[...], ...])."
            )
        if len(completion_ids) != len(completions):
            raise ValueError(
                f"soft_overlong_penalty got {len(completion_ids)} completion_ids for {len(completions)} completions."
            )
        safe = self.max_completion_length - self.soft_punish_cache  # longest length with no penalty
        rewards = []
        for ids in completion_ids:
            length = len(ids)
            if length <= safe:
                rewards.append(0.0)
            elif length <= self.max_completion_length:  # only reachable when soft_punish_cache > 0
                rewards.append((safe - length) / self.soft_punish_cache)
            else:
                rewards.append(-1.0)
        return rewards

    def __repr__(self) -> str:
        return f"soft_overlong_penalty(max_completion_length={self.max_completion_length}, soft_punish_cache={self.soft_punish_cache})"


def repetition_penalty(
    ngram_size: int = 3, max_penalty: float = -1.0, unit: Literal["words", "tokens"] = "words"
) -> RepetitionPenalty:
    """Penalize repeated n-grams: ``(1 - unique / total) * max_penalty`` over a completion's n-grams.

    0.0 for a completion with no repeated n-gram (or fewer than ``ngram_size`` units), approaching ``max_penalty``
    as it degenerates into a loop: ``"x x x x x"`` has 3 word trigrams, 1 unique, so ``2/3 * max_penalty``.
    Appendix C.2 of https://arxiv.org/abs/2502.03373.

    Args:
        ngram_size: n-gram length (>= 1).
        max_penalty: the most negative value (<= 0).
        unit: ``"words"`` (open-r1's: lowercased, whitespace-split completion text) or ``"tokens"`` (TRL's: the
            ``completion_ids`` keyword the trainers pass, language-agnostic).
    """
    return RepetitionPenalty(ngram_size, max_penalty, unit)


class RepetitionPenalty:
    """See ``repetition_penalty``."""

    __name__ = "repetition_penalty"

    def __init__(
        self, ngram_size: int = 3, max_penalty: float = -1.0, unit: Literal["words", "tokens"] = "words"
    ) -> None:
        if ngram_size < 1:
            raise ValueError(f"ngram_size must be >= 1, got {ngram_size}.")
        if max_penalty > 0:
            raise ValueError(f"max_penalty is the most negative reward and must be <= 0, got {max_penalty}.")
        if unit not in ("words", "tokens"):
            raise ValueError(f"unit must be 'words' or 'tokens', got {unit!r}.")
        self.ngram_size = ngram_size
        self.max_penalty = max_penalty
        self.unit = unit

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None, **kwargs) -> list[float]:
        if self.unit == "tokens":
            if completion_ids is None:
                raise ValueError(
                    "repetition_penalty(unit='tokens') needs the 'completion_ids' keyword (token-id lists)."
                )
            sequences = [list(ids) for ids in completion_ids]
        else:
            sequences = [completion_text(c).lower().split() for c in completions]
        if len(sequences) != len(completions):
            raise ValueError(
                f"repetition_penalty got {len(sequences)} completion_ids for {len(completions)} completions."
            )
        return [self._penalty(units) for units in sequences]

    def _penalty(self, units: list) -> float:
        if len(units) < self.ngram_size:
            return 0.0
        ngrams = [tuple(units[i : i + self.ngram_size]) for i in range(len(units) - self.ngram_size + 1)]
        repeated = 1.0 - len(set(ngrams)) / len(ngrams)
        return repeated * self.max_penalty if repeated > 0 else 0.0

    def __repr__(self) -> str:
        return f"repetition_penalty(ngram_size={self.ngram_size}, max_penalty={self.max_penalty}, unit={self.unit!r})"
