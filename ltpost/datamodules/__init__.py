from ltpost.datamodules.sft import SFTDataModule, collate_sft

__all__ = ["SFTDataModule", "collate_sft"]
