"""HealthMonitor: runs the checks over a growing history and decides what to say, with hysteresis.

Pure Python, no Lightning: the ``TrainingHealth`` callback feeds it what a run logs, and ``python -m ltpost.doctor``
replays a finished run's TensorBoard scalars through a fresh one when the run wrote no ``health.jsonl``.

A check moves between two states. *Raised*: its condition held; one record is emitted then, none while it stays
raised (the check runs with its looser ``clear_*`` thresholds meanwhile). *Recovered*: the condition no longer
holds even at the looser threshold; one record says so, and the check may be raised again later. So a condition
costs two lines however long it lasts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from ltpost.health.checks import CHECKS, Finding, History, RunInfo


@dataclass
class Event:
    """A state change of one check: ``status`` is ``raised`` or ``recovered``."""

    status: str
    step: int
    finding: Finding

    def record(self) -> dict[str, Any]:
        """The JSON record (one line of ``health.jsonl``)."""
        finding = self.finding
        return {
            "code": finding.code,
            "status": self.status,
            "severity": finding.severity if self.status == "raised" else "info",
            "area": finding.area,
            "step": self.step,
            "message": finding.message,
            "action": finding.action if self.status == "raised" else None,
            "evidence": {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in finding.evidence.items()
            },
            "time": time.time(),
        }

    def line(self) -> str:
        return self.finding.line(self.status)  # type: ignore[arg-type]


class HealthMonitor:
    """The checks, their state and the history they read.

    Args:
        thresholds: per check code, keyword overrides of its defaults, e.g.
            ``{"reward-std-collapse": {"frac_zero_std": 0.95}}``.
        disable: check codes not to run.
        history_size: values kept per metric.
    """

    def __init__(
        self,
        thresholds: dict[str, dict[str, float]] | None = None,
        disable: list[str] | None = None,
        history_size: int = 500,
    ) -> None:
        unknown = sorted((set(thresholds or {}) | set(disable or [])) - set(CHECKS))
        if unknown:
            raise ValueError(f"Unknown health check(s) {unknown}; the checks are: {', '.join(CHECKS)}.")
        self.thresholds = {code: dict(values) for code, values in (thresholds or {}).items()}
        self.disable = set(disable or [])
        self.history = History(history_size)
        self.active: dict[str, Finding] = {}
        self.counts: dict[str, int] = {}
        self.events: list[Event] = []

    @property
    def num_raised(self) -> int:
        return sum(self.counts.values())

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Add logged values to the history without running the checks."""
        self.history.add(step, metrics)

    def update(self, step: int, metrics: dict[str, float], info: RunInfo) -> list[Event]:
        """Add ``metrics`` (logged at ``step``), run every check, return the state changes."""
        self.history.add(step, metrics)
        events = []
        for code, check in CHECKS.items():
            if code in self.disable:
                continue
            was_active = code in self.active
            finding = check(self.history, info, active=was_active, **self.thresholds.get(code, {}))
            if finding is not None and not was_active:
                self.active[code] = finding
                self.counts[code] = self.counts.get(code, 0) + 1
                events.append(Event("raised", step, finding))
            elif finding is None and was_active:
                events.append(Event("recovered", step, self.active.pop(code)))
            elif finding is not None:
                self.active[code] = finding  # still raised: keep the freshest evidence, say nothing
        self.events.extend(events)
        return events

    def raise_now(self, step: int, finding: Finding) -> Event:
        """Raise a finding decided outside the checks (the callback's per-step non-finite loss guard)."""
        self.active[finding.code] = finding
        self.counts[finding.code] = self.counts.get(finding.code, 0) + 1
        event = Event("raised", step, finding)
        self.events.append(event)
        return event

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history.state_dict(),
            "active": {code: vars(finding) for code, finding in self.active.items()},
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state["history"])
        self.active = {code: Finding(**fields) for code, fields in state["active"].items()}
        self.counts = dict(state["counts"])
