from .mamba_layer import BIMAMBA_TYPES, MambaEncoderLayer, build_mamba_encoder_layer, build_mixer_cls  # noqa: F401
from .mamba_mixer import ExternalBiMamba, Mamba, SelectiveSSM  # noqa: F401
from .causal_attention import CausalSelfAttention, CausalTransformerLayer  # noqa: F401
from .mamba2_mixer import ExternalBiMamba2, GatedRMSNorm, Mamba2, SSD  # noqa: F401
