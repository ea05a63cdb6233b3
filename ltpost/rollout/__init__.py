"""Rollout engines behind one small interface (``RolloutEngine``): Hugging Face ``generate`` by default."""

from ltpost.rollout.base import Rollout, RolloutEngine, SamplingParams
from ltpost.rollout.hf import HFRolloutEngine

__all__ = ["HFRolloutEngine", "Rollout", "RolloutEngine", "SamplingParams"]
