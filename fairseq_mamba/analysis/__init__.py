"""Layer-wise analysis tools (issue #5): mutual-information estimators and helpers."""
from .mutual_information import METHODS, MIEstimate, estimate_mi, flatten_frames, mi_profile

__all__ = ["METHODS", "MIEstimate", "estimate_mi", "flatten_frames", "mi_profile"]
