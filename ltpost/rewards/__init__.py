"""Reward functions: verifiers, format checks, shaping penalties and learned reward models, as plain callables.

The contract (TRL's): ``f(prompts, completions, **columns) -> list[float | None]``, one entry per completion, None
meaning "not applicable" (the completion is then scored by the other functions only). Trainers call it with
keywords: ``prompts`` and ``completions`` (strings for plain-text prompts, ``[{"role": "assistant", "content": ...}]``
for conversational ones), every dataset column by its name (one value per completion), and ``completion_ids``
(token-id lists). Unknown keywords land in ``**kwargs``. A function may be ``async``.

```python
from ltpost.rewards import integer_accuracy, think_format, soft_overlong_penalty
reward_funcs = [integer_accuracy, think_format, soft_overlong_penalty(256, 64)]
```
"""

from ltpost.rewards.accuracy import digit_accuracy, integer_accuracy, math_accuracy
from ltpost.rewards.combine import call_reward_functions, combine_rewards
from ltpost.rewards.common import completion_text, reward_function_name
from ltpost.rewards.format import think_format
from ltpost.rewards.model import RewardModelScorer
from ltpost.rewards.penalties import RepetitionPenalty, SoftOverlongPenalty, repetition_penalty, soft_overlong_penalty

__all__ = [
    "RepetitionPenalty",
    "RewardModelScorer",
    "SoftOverlongPenalty",
    "call_reward_functions",
    "combine_rewards",
    "completion_text",
    "digit_accuracy",
    "integer_accuracy",
    "math_accuracy",
    "repetition_penalty",
    "reward_function_name",
    "soft_overlong_penalty",
    "think_format",
]
