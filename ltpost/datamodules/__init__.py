from ltpost.datamodules.preference import PreferenceDataModule, collate_preference
from ltpost.datamodules.sft import SFTDataModule, collate_sft

__all__ = ["PreferenceDataModule", "SFTDataModule", "collate_preference", "collate_sft"]
