from .mamba_hubert import MambaEncoder, MambaHubertConfig, MambaHubertModel  # noqa: F401
