from .mamba_hubert_criterion import MambaHubertCriterion, MambaHubertCriterionConfig  # noqa: F401
