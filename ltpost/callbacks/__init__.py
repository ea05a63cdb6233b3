"""Lightning callbacks for what cuts across methods."""

from ltpost.callbacks.eval_on_start import EvalOnStart
from ltpost.callbacks.health import TrainingHealth
from ltpost.callbacks.hf_export import HFExport
from ltpost.callbacks.reference_model import ReferenceModel
from ltpost.callbacks.resume_state import ResumeState
from ltpost.callbacks.slurm_requeue import SLURMRequeue
from ltpost.callbacks.vllm_sync import VLLMSync

__all__ = ["EvalOnStart", "HFExport", "ReferenceModel", "ResumeState", "SLURMRequeue", "TrainingHealth", "VLLMSync"]
