"""ltpost: post-training for language models, built natively on Lightning.

The stable surface lives here; newer methods live under ``ltpost.experimental`` with no stability promise.
"""

__version__ = "0.1.0"

from ltpost.callbacks import HFExport
from ltpost.datamodules import SFTDataModule
from ltpost.modules import SFTModule

__all__ = ["HFExport", "SFTDataModule", "SFTModule", "__version__"]
