"""Training health: pure checks over a run's metrics (``checks``), the state machine that decides what to say
(``monitor``), and the run report (``python -m ltpost.doctor``). The Lightning side is
``ltpost.callbacks.TrainingHealth``."""

from ltpost.health.checks import AREAS, CHECKS, Finding, History, RunInfo
from ltpost.health.monitor import Event, HealthMonitor

__all__ = ["AREAS", "CHECKS", "Event", "Finding", "HealthMonitor", "History", "RunInfo"]
