"""Answer verifiers: the last integer against an integer answer, and math-verify for LaTeX answers.

Named ``accuracy.py`` rather than ``math.py`` so the module never reads as the standard library's ``math``.
"""

from __future__ import annotations

import logging
import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Any

from ltpost.rewards.common import completion_text

# A number as written in prose: optional minus sign, digits (optionally grouped by thousands: 1,234), optional
# decimals. Not preceded by a letter, digit or dot, so "x2", "v1.5" and the "5" of "2.5" are not read as numbers,
# and "5-3" reads as 5 and 3 rather than 5 and -3.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")

# math-verify's timeouts (seconds), TRL's values. They rely on SIGALRM, which Python allows only in the main thread.
PARSE_TIMEOUT_S = 10
VERIFY_TIMEOUT_S = 5


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text`` (see ``_NUMBER``), or None when it has none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return Decimal(matches[-1].replace(",", ""))


def _as_integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = Decimal(str(value).strip().replace(",", ""))
    except InvalidOperation:
        return None
    return int(number) if number.is_finite() and number == number.to_integral_value() else None


def integer_accuracy(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the last number in a completion equals the integer ``answer``, else 0.0; None when the answer is
    not an integer.

    For the built-in arithmetic tasks (``answer`` is a string such as ``"81"``): ``"The answer is 81."`` scores 1.0,
    ``"81 or 82"`` scores 0.0 (the last number is 82), a completion without a number scores 0.0. A last number with
    decimals counts when it is whole (``"81.0"``); ``"2.5"`` never equals an integer. Thousands separators are read
    (``"1,234"`` is 1234). A GSM8K answer (a worked solution ending ``"#### 72"``) is read after its ``####``.

    Args:
        prompts: unused (part of the reward-function contract).
        completions: strings or conversational message lists.
        answer: the gold answers, one per completion: ints or strings holding an integer.
    """
    if len(answer) != len(completions):
        raise ValueError(f"integer_accuracy got {len(answer)} answers for {len(completions)} completions.")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        if isinstance(gold, str) and "####" in gold:  # GSM8K: worked solution, then "#### <final answer>"
            gold = gold.rsplit("####", 1)[1]
        target = _as_integer(gold)
        if target is None:
            rewards.append(None)
            continue
        number = last_number(completion_text(completion))
        rewards.append(1.0 if number is not None and number == target else 0.0)
    return rewards


def digit_accuracy(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """Partial credit for integer answers: the fraction of digit places the completion's last number gets right.

    Both numbers are aligned at the units digit and compared place by place over the longer of the two, so a
    missing or extra digit counts as wrong: gold ``"81"`` gives ``"81"`` 1.0, ``"71"`` 0.5, ``"181"`` 2/3,
    ``"8"`` 0.0 (the 8 sits in the units place), no number 0.0; a sign mismatch gives 0.0. None when the answer is
    not an integer. A denser signal than ``integer_accuracy`` for a small model learning arithmetic (a carry error
    still earns the digits it got right); combine the two with ``reward_weights``.

    Args:
        prompts: unused (part of the reward-function contract).
        completions: strings or conversational message lists.
        answer: the gold answers, one per completion: ints or strings holding an integer (GSM8K's ``#### n`` too).
    """
    if len(answer) != len(completions):
        raise ValueError(f"digit_accuracy got {len(answer)} answers for {len(completions)} completions.")
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer):
        if isinstance(gold, str) and "####" in gold:
            gold = gold.rsplit("####", 1)[1]
        target = _as_integer(gold)
        if target is None:
            rewards.append(None)
            continue
        number = last_number(completion_text(completion))
        if number is None or number != number.to_integral_value() or (number < 0) != (target < 0):
            rewards.append(0.0)
            continue
        got, want = str(abs(int(number)))[::-1], str(abs(target))[::-1]
        places = max(len(got), len(want))
        rewards.append(sum(a == b for a, b in zip(got, want)) / places)
    return rewards


def math_accuracy(
    prompts: list, completions: list, solution: list | None = None, answer: list | None = None, **kwargs
) -> list[float | None]:
    r"""1.0 when a completion's final answer is mathematically equal to the gold one, else 0.0, checked by
    math-verify; None when the gold answer cannot be parsed (the completion is then not scored), as TRL's
    ``accuracy_reward`` does.

    The gold answer comes from the ``solution`` column (TRL's name), else from ``answer``. It is parsed with
    math-verify's defaults (LaTeX or a plain expression: ``"$0.5$"``, ``"\\frac{1}{2}"``, ``"81"``). The completion's
    answer must be LaTeX, found preferably in ``\\boxed{...}`` (then in ``$...$`` and similar anchors), with units
    normalized, so ``"\\boxed{\\frac{1}{2}}"`` matches ``"$0.5$"``.

    Threads: math-verify bounds parsing and verification with ``signal.alarm``, which works only in the main thread.
    In any other thread (a DataLoader thread, a thread pool) the timeouts are turned off and math-verify's warnings
    about it silenced, as TRL does; a pathological expression can then take long. In the main thread the alarm also
    replaces, then cancels, any ``SIGALRM`` timer already set (e.g. pytest-timeout's signal method).

    Args:
        prompts: unused (part of the reward-function contract).
        completions: strings or conversational message lists.
        solution: the gold answers, one per completion (preferred when both columns exist).
        answer: the gold answers when there is no ``solution`` column.
    """
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    gold_answers = solution if solution is not None else answer
    if gold_answers is None:
        raise ValueError("math_accuracy needs the gold answers in a 'solution' or an 'answer' dataset column.")
    if len(gold_answers) != len(completions):
        raise ValueError(f"math_accuracy got {len(gold_answers)} gold answers for {len(completions)} completions.")
    in_main_thread = threading.current_thread() is threading.main_thread()
    parse_timeout = PARSE_TIMEOUT_S if in_main_thread else None
    verify_timeout = VERIFY_TIMEOUT_S if in_main_thread else None
    if not in_main_thread:  # "Timeout is disabled" is the intended state here, not news
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    answer_config = [
        LatexExtractionConfig(
            normalization_config=NormalizationConfig(units=True),
            boxed_match_priority=0,  # a \boxed{} answer wins over any other LaTeX in the text
            try_extract_without_anchor=False,  # only anchored answers: no stray number from the reasoning
        )
    ]
    rewards: list[float | None] = []
    for completion, gold in zip(completions, gold_answers):
        gold_parsed = parse(str(gold), parsing_timeout=parse_timeout)
        if not gold_parsed:
            rewards.append(None)
            continue
        answer_parsed = parse(
            completion_text(completion),
            extraction_config=answer_config,
            extraction_mode="first_match",
            parsing_timeout=parse_timeout,
        )
        rewards.append(float(verify(gold_parsed, answer_parsed, timeout_seconds=verify_timeout)))
    return rewards
