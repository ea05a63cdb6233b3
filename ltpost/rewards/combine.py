"""Call a list of reward functions on one batch of completions and combine their rewards; what the trainers use.

``call_reward_functions`` runs each function (async ones concurrently), checks what it returned and names the
culprit when something is wrong; ``combine_rewards`` is the pure weighted sum that skips None ("not applicable").
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ltpost.rewards.common import reward_function_name


def combine_rewards(
    per_function: Sequence[Sequence[float | None]], weights: Sequence[float] | None = None
) -> tuple[list[float], list[bool]]:
    """``(total, valid)``: each completion's weighted reward summed over the functions, None entries skipped.

    ``per_function[k][i]`` is function k's reward for completion i. ``total[i] = sum_k weights[k] * r[k][i]`` over the
    functions that scored completion i (TRL's ``nansum``). A completion no function scored gets ``total`` 0.0 and
    ``valid`` False: it carries no signal, and the trainer gives it zero advantage rather than treating 0.0 as a
    real reward. E.g. ``per_function=[[1.0, None, None], [0.5, 0.5, None]]``, ``weights=[2.0, 1.0]`` gives
    ``([2.5, 0.5, 0.0], [True, True, False])``.

    Args:
        per_function: one list per reward function, each with one reward (or None) per completion.
        weights: one weight per function; None weighs them all 1.0.
    """
    if not per_function:
        raise ValueError("combine_rewards needs at least one reward function's rewards.")
    num_completions = len(per_function[0])
    if any(len(rewards) != num_completions for rewards in per_function):
        raise ValueError(
            f"Every reward function must score every completion; got {[len(r) for r in per_function]} rewards."
        )
    weights = [1.0] * len(per_function) if weights is None else [float(w) for w in weights]
    if len(weights) != len(per_function):
        raise ValueError(f"Got {len(weights)} reward weights for {len(per_function)} reward functions.")
    total: list[float] = []
    valid: list[bool] = []
    for i in range(num_completions):
        scored = [(w, rewards[i]) for w, rewards in zip(weights, per_function) if rewards[i] is not None]
        total.append(float(sum(w * r for w, r in scored)))
        valid.append(bool(scored))
    return total, valid


def call_reward_functions(
    functions: Sequence[Callable[..., Any]], prompts: list, completions: list, columns: dict[str, list] | None = None
) -> list[list[float | None]]:
    """Each function's rewards for the batch, ``[num_functions][num_completions]``, floats or None.

    Every function is called with keywords only, as TRL's GRPOTrainer calls them:
    ``f(prompts=prompts, completions=completions, **columns)``. ``columns`` holds the dataset columns repeated
    per completion (TRL leaves out ``prompt``) plus what the trainer adds, such as ``completion_ids``. Synchronous
    functions run one after the other; a function returning an awaitable (``async def``, or an object with an async
    ``__call__``) is awaited, all such together under ``asyncio.gather`` in one event loop (on a helper thread when
    the caller already runs a loop).

    Returned values are checked: a list, tuple or 1-D array/tensor of one number or None per completion. NaN is read
    as None (TRL's own encoding of "not applicable"); bools count as 0/1.

    Raises:
        ValueError: naming the function, when it raises (the original exception is chained), returns something
            other than a sequence, the wrong number of rewards, a non-number, or an infinite value.
    """
    columns = dict(columns or {})
    if len(prompts) != len(completions):
        raise ValueError(
            f"Got {len(prompts)} prompts for {len(completions)} completions; pass one prompt per completion."
        )
    for key in ("prompts", "completions"):
        if key in columns:
            raise ValueError(f"Column {key!r} would shadow the {key} argument of the reward functions; rename it.")
    for key, values in columns.items():
        if hasattr(values, "__len__") and len(values) != len(completions):
            raise ValueError(f"Column {key!r} has {len(values)} values for {len(completions)} completions.")
    names = [reward_function_name(f) for f in functions]
    results: list[Any] = [None] * len(functions)
    pending: dict[int, Any] = {}  # function index -> awaitable
    for index, (function, name) in enumerate(zip(functions, names)):
        try:
            output = function(prompts=prompts, completions=completions, **columns)
        except Exception as error:
            for awaitable in pending.values():  # not awaited now: close them to avoid "never awaited" warnings
                if inspect.iscoroutine(awaitable):
                    awaitable.close()
            raise ValueError(f"reward function {name!r} raised {type(error).__name__}: {error}") from error
        if inspect.isawaitable(output):
            pending[index] = output
        else:
            results[index] = output
    if pending:
        for index, output in zip(pending, _gather(list(pending.values()))):
            if isinstance(output, BaseException):
                name = names[index]
                raise ValueError(f"reward function {name!r} raised {type(output).__name__}: {output}") from output
            results[index] = output
    return [_checked(name, output, len(completions)) for name, output in zip(names, results)]


def _gather(awaitables: list) -> list:
    """Await all of ``awaitables`` concurrently; exceptions are returned in place of results."""

    async def gather() -> list:
        return await asyncio.gather(*awaitables, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop in this thread
        return asyncio.run(gather())
    # Called from inside a running loop (a notebook, an async server): asyncio.run would refuse, so use a thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def _checked(name: str, output: Any, num_completions: int) -> list[float | None]:
    if hasattr(output, "tolist") and not isinstance(output, (list, tuple)):  # numpy array, torch tensor
        output = output.tolist()
    if not isinstance(output, (list, tuple)):
        raise ValueError(
            f"reward function {name!r} returned {type(output).__name__}; expected a list with one float (or None) per "
            f"completion ({num_completions})."
        )
    if len(output) != num_completions:
        raise ValueError(
            f"reward function {name!r} returned {len(output)} values for {num_completions} completions; return "
            "exactly one reward (or None for 'not applicable') per completion."
        )
    rewards: list[float | None] = []
    for i, value in enumerate(output):
        if value is None:
            rewards.append(None)
            continue
        if not isinstance(value, numbers.Real):
            raise ValueError(
                f"reward function {name!r} returned a {type(value).__name__} ({value!r:.40}) for completion {i}; "
                "expected a float, or None for 'not applicable'."
            )
        value = float(value)
        if math.isnan(value):
            rewards.append(None)
        elif math.isinf(value):
            raise ValueError(f"reward function {name!r} returned {value} for completion {i}; rewards must be finite.")
        else:
            rewards.append(value)
    return rewards
