from ltpost.modules.dpo import DPOModule
from ltpost.modules.grpo import GRPOModule
from ltpost.modules.reward import RewardModule
from ltpost.modules.rloo import RLOOModule
from ltpost.modules.sft import SFTModule

__all__ = ["DPOModule", "GRPOModule", "RewardModule", "RLOOModule", "SFTModule"]
