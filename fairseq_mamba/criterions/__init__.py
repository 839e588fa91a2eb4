from .mamba_hubert_criterion import MambaHubertCriterion, MambaHubertCriterionConfig  # noqa: F401
from .spectral_reconstruction import SpectralReconstructionCriterion  # noqa: F401
