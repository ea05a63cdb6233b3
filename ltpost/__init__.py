"""ltpost: post-training for language models, built natively on Lightning.

The stable surface lives here; newer methods live under ``ltpost.experimental`` with no stability promise.
"""

__version__ = "0.1.0"

from ltpost.callbacks import HFExport, ReferenceModel
from ltpost.datamodules import PreferenceDataModule, SFTDataModule
from ltpost.modules import DPOModule, RewardModule, SFTModule

__all__ = [
    "DPOModule",
    "HFExport",
    "PreferenceDataModule",
    "ReferenceModel",
    "RewardModule",
    "SFTDataModule",
    "SFTModule",
    "__version__",
]
