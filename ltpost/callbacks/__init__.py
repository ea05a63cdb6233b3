"""Lightning callbacks for what cuts across methods."""

from ltpost.callbacks.hf_export import HFExport
from ltpost.callbacks.reference_model import ReferenceModel

__all__ = ["HFExport", "ReferenceModel"]
