from ltpost.datamodules.preference import PreferenceDataModule, collate_preference
from ltpost.datamodules.prompts import PromptDataModule, collate_prompt_rows
from ltpost.datamodules.sft import SFTDataModule, collate_sft

__all__ = [
    "PreferenceDataModule",
    "PromptDataModule",
    "SFTDataModule",
    "collate_preference",
    "collate_prompt_rows",
    "collate_sft",
]
