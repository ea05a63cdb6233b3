"""What a training-health check sees and says: the metric ``History``, the ``RunInfo`` and the ``Finding``.

The checks themselves are in ``rl_checks``, ``preference_checks`` and ``general_checks``; ``checks`` is their
registry.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "critical"]


class History:
    """The last ``maxlen`` logged values of each metric, as ``(step, value)`` pairs, newest last."""

    def __init__(self, maxlen: int = 500) -> None:
        self.maxlen = maxlen
        self.series: dict[str, deque[tuple[int, float]]] = {}

    def add(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            series = self.series.setdefault(name, deque(maxlen=self.maxlen))
            if series and series[-1][0] == step:
                series[-1] = (step, float(value))  # logged twice in one step: keep the latest
            else:
                series.append((step, float(value)))

    def values(self, name: str, last: int | None = None) -> list[float]:
        series = self.series.get(name, ())
        values = [value for _, value in series]
        return values if last is None else values[-last:]

    def steps(self, name: str, last: int | None = None) -> list[int]:
        series = self.series.get(name, ())
        steps = [step for step, _ in series]
        return steps if last is None else steps[-last:]

    def has(self, name: str, count: int = 1) -> bool:
        return len(self.series.get(name, ())) >= count

    def state_dict(self) -> dict[str, Any]:
        return {"maxlen": self.maxlen, "series": {name: list(values) for name, values in self.series.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.maxlen = state["maxlen"]
        self.series = {name: deque(map(tuple, values), maxlen=self.maxlen) for name, values in state["series"].items()}


@dataclass
class RunInfo:
    """Where the run is, for checks that depend on it.

    Attributes:
        step: the current optimizer step.
        max_steps: the run's planned optimizer steps (None: unknown).
        lr_ratio: the learning rate now over the highest seen so far (1.0 when unknown); below ~0.1 the schedule is
            annealing and a flat loss is expected.
        gradient_clip_val: the trainer's gradient clipping (None: off).
        accelerator: ``"cuda"``, ``"cpu"`` ...
        settings: the module's hyperparameters that actions refer to (``max_completion_length``, ``beta``,
            ``use_vllm`` ...), when known.
    """

    step: int
    max_steps: int | None = None
    lr_ratio: float = 1.0
    gradient_clip_val: float | None = None
    accelerator: str = "cpu"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float | None:
        return self.step / self.max_steps if self.max_steps else None


@dataclass
class Finding:
    """One condition a check found: a stable ``code``, the numbers behind it and what to do.

    Attributes:
        code: stable identifier (``reward-std-collapse``), what programs match on.
        severity: ``warning`` for most, ``critical`` when the run cannot go on (NaN loss).
        area: the part of the run it concerns (``rl-signal``, ``optimization``, ``preference``, ...).
        message: the evidence in words, with the numbers.
        action: what to change, naming the setting.
        evidence: the numbers, by name.
    """

    code: str
    severity: Severity
    area: str
    message: str
    action: str
    evidence: dict[str, float]

    def line(self, status: Literal["raised", "recovered"] = "raised") -> str:
        """The one human-readable line: ``[ltpost] WARNING code: message. action``."""
        if status == "recovered":
            return f"[ltpost] RECOVERED {self.code}: {self.message}."
        return f"[ltpost] {self.severity.upper()} {self.code}: {self.message}. {self.action}"


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _window(history: History, name: str, window: int) -> list[float] | None:
    """The last ``window`` values of ``name``, or None when fewer have been logged (the check then waits)."""
    values = history.values(name, window)
    return values if len(values) >= window else None


def _span(history: History, name: str, window: int) -> str:
    steps = history.steps(name, window)
    return f"steps {steps[0]}-{steps[-1]}" if steps else "no steps"
