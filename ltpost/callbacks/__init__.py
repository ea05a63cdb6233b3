"""Lightning callbacks for what cuts across methods."""

from ltpost.callbacks.hf_export import HFExport

__all__ = ["HFExport"]
