"""``causal_hubert``: stock fairseq HuBERT whose self-attention is causal (a streaming baseline).

The fair baseline for causal Mamba HuBERT (``mamba_hubert`` with ``bimamba_type=none``): the same
feature extractor, positional conv, masking, head and task, with Transformer layers in which a
frame attends only to itself and earlier frames (``CausalSelfAttention``). ``StreamingEncoder``
streams it with a KV cache, so both causal encoders are compared through one API.
"""
import logging
from dataclasses import dataclass

from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from fairseq_mamba.models.mamba_hubert import _without_transformer_layers
from fairseq_mamba.modules.causal_attention import CausalTransformerLayer

logger = logging.getLogger(__name__)


@dataclass
class CausalHubertConfig(HubertConfig):
    """HubertConfig as is; ``layer_type`` must be ``transformer`` (the causal layer is that one)."""


class CausalTransformerEncoder(TransformerEncoder):
    """fairseq's wav2vec2/HuBERT encoder with ``CausalTransformerLayer``s."""

    def build_encoder_layer(self, args: CausalHubertConfig, **kwargs):
        if args.layer_type != "transformer":
            raise ValueError(f"model.layer_type={args.layer_type!r}: causal_hubert builds "
                             "layer_type=transformer layers only")
        layer = fsdp_wrap(CausalTransformerLayer(
            embedding_dim=self.embedding_dim, ffn_embedding_dim=args.encoder_ffn_embed_dim,
            num_attention_heads=args.encoder_attention_heads, dropout=self.dropout,
            attention_dropout=args.attention_dropout, activation_dropout=args.activation_dropout,
            activation_fn=args.activation_fn, layer_norm_first=args.layer_norm_first))
        if args.checkpoint_activations:
            layer = checkpoint_wrapper(layer)
        return layer


@register_model("causal_hubert", dataclass=CausalHubertConfig)
class CausalHubertModel(HubertModel):
    """HuBERT with causal self-attention; see the module doc."""

    def __init__(self, cfg: CausalHubertConfig, task_cfg, dictionaries):
        super().__init__(_without_transformer_layers(cfg), task_cfg, dictionaries)
        self.encoder = CausalTransformerEncoder(cfg)
        logger.info(f"CausalHubertModel: {cfg.encoder_layers} causal Transformer layers, "
                    f"{sum(p.numel() for p in self.parameters())} parameters")

    @classmethod
    def build_model(cls, cfg: CausalHubertConfig, task):
        """Build a new model instance."""
        return cls(cfg, task.cfg, task.dictionaries)
