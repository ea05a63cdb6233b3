from ltpost.modules.dpo import DPOModule
from ltpost.modules.reward import RewardModule
from ltpost.modules.sft import SFTModule

__all__ = ["DPOModule", "RewardModule", "SFTModule"]
