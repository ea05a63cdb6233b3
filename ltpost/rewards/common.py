"""What every reward function shares: reading a completion's text, and naming a function for logs and errors."""

from __future__ import annotations

import functools
from typing import Any


def completion_text(completion: Any) -> str:
    """The text of one completion, whichever shape the trainer passes.

    - a plain string (prompts in plain-text format) is returned as is;
    - a conversational completion (a list of messages, TRL's ``[{"role": "assistant", "content": ...}]``) gives
      the ``content`` of its messages joined by newlines (one message, the usual case, gives exactly its content);
    - a single message dict gives its ``content``.

    A ``content`` given as a list of typed parts (``[{"type": "text", "text": ...}]``) keeps its text parts.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        return "\n".join(_content_text(message.get("content")) for message in completion if isinstance(message, dict))
    raise TypeError(
        f"A completion must be a string or a list of chat messages (dicts with 'role' and 'content'), got "
        f"{type(completion).__name__}: {completion!r:.80}"
    )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts: keep the text ones
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def reward_function_name(function: Any) -> str:
    """The name a reward function is logged under (``rewards/<name>/mean``) and named by in errors.

    Its ``__name__`` when it has one (plain and async functions, and callable objects that set one, such as
    ``RewardModelScorer`` and the penalties here); the wrapped function's for a ``functools.partial``; otherwise the
    class name of a callable object.
    """
    name = getattr(function, "__name__", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(function, functools.partial):
        return reward_function_name(function.func)
    return type(function).__name__
