"""Format rewards: does the completion follow the expected layout."""

from __future__ import annotations

import re

from ltpost.rewards.common import completion_text

# TRL's think_format_reward pattern: "<think>" at the very start, no second "<think>", a "</think>", then anything.
_THINK_FORMAT = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)


def think_format(prompts: list, completions: list, **kwargs) -> list[float]:
    """1.0 when a completion is ``<think>reasoning</think>`` followed by the answer, else 0.0 (TRL's
    ``think_format_reward``).

    The completion must start with ``<think>`` (no leading whitespace), contain no second ``<think>``, and close
    the reasoning with ``</think>``; whatever follows is the answer and, as in TRL, may be empty. A chat template
    that already puts ``<think>`` in the generation prompt makes completions start inside the reasoning: they then
    never match, so use this reward only where the model writes the opening tag itself.

    Args:
        prompts: unused (part of the reward-function contract).
        completions: strings or conversational message lists.
    """
    return [1.0 if _THINK_FORMAT.match(completion_text(c)) else 0.0 for c in completions]
