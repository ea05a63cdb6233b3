"""ltpost: post-training for language models, built natively on Lightning.

The stable surface lives here; newer methods live under ``ltpost.experimental`` with no stability promise.
"""

__version__ = "0.1.0"

from ltpost import strategies
from ltpost.callbacks import EvalOnStart, HFExport, ReferenceModel, ResumeState, SLURMRequeue, TrainingHealth, VLLMSync
from ltpost.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from ltpost.modules import DPOModule, GRPOModule, RewardModule, RLOOModule, SFTModule

__all__ = [
    "DPOModule",
    "EvalOnStart",
    "GRPOModule",
    "HFExport",
    "PreferenceDataModule",
    "PromptDataModule",
    "ReferenceModel",
    "ResumeState",
    "RewardModule",
    "RLOOModule",
    "SFTDataModule",
    "SLURMRequeue",
    "SFTModule",
    "TrainingHealth",
    "VLLMSync",
    "strategies",
    "__version__",
]
