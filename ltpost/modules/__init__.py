from ltpost.modules.sft import SFTModule

__all__ = ["SFTModule"]
