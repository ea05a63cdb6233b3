"""Rollout engines behind one small interface (``RolloutEngine``): Hugging Face ``generate`` by default, vLLM in the
training process or as a server (``ltpost.rollout.vllm``; vLLM itself is imported only when an engine starts)."""

from ltpost.rollout.base import Rollout, RolloutEngine, SamplingParams
from ltpost.rollout.hf import HFRolloutEngine
from ltpost.rollout.vllm import VLLMColocateEngine, VLLMServerEngine, VLLMServerError

__all__ = [
    "HFRolloutEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "VLLMColocateEngine",
    "VLLMServerEngine",
    "VLLMServerError",
]
