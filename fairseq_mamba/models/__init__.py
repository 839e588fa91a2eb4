from .causal_hubert import CausalHubertConfig, CausalHubertModel  # noqa: F401
from .hubert_ctc_head import HubertCtcHead, HubertCtcHeadConfig  # noqa: F401
from .hubert_enhancer import HubertEnhancerConfig, HubertEnhancerModel  # noqa: F401
from .mamba_hubert import MambaEncoder, MambaHubertConfig, MambaHubertModel  # noqa: F401
