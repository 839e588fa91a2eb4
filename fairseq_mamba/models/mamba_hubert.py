"""``mamba_hubert``: fairseq's HuBERT with bidirectional Mamba in place of self-attention.

Only two things differ from ``fairseq.models.hubert.HubertModel``: the config gains the Mamba
fields, and the encoder builds Mamba layers. Feature extractor, masking, the masked-prediction
head, ``extract_features``, ``remove_pretraining_modules`` and everything the ``hubert_pretraining``
task, the ``hubert`` criterion, ``hubert_ctc`` and the simple_kmeans scripts touch are HubertModel's.
"""
import copy
import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from omegaconf import open_dict

from fairseq.dataclass import ChoiceEnum
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model
from fairseq.models.hubert.hubert import HubertConfig, HubertModel
from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from fairseq_mamba.modules.mamba_layer import BIMAMBA_TYPES, MAMBA_VERSIONS, build_mamba_encoder_layer
from fairseq_mamba.modules.mamba_mixer import SelectiveSSM

logger = logging.getLogger(__name__)


@dataclass
class MambaHubertConfig(HubertConfig):
    """HubertConfig plus the Mamba fields.

    Inherited fields that a Mamba encoder ignores: ``encoder_attention_heads``,
    ``attention_dropout``, ``layer_type``, ``attn_type``, ``pos_enc_type``,
    ``depthwise_conv_kernel_size`` and ``fp16`` (used only by rotary attention).
    ``encoder_ffn_embed_dim`` is used only when ``mamba_ffn`` is true. With ``mamba_version=2``,
    ``mamba_dt_rank`` is unused (Mamba-2 projects one Δ per head from the input).
    """

    mamba_d_state: int = field(default=16, metadata={"help": "SSM state size N per channel"})
    mamba_d_conv: int = field(default=4, metadata={"help": "width of the causal depthwise conv"})
    mamba_expand: float = field(
        default=2, metadata={"help": "inner width = mamba_expand * encoder_embed_dim"}
    )
    mamba_dt_rank: str = field(
        default="auto", metadata={"help": "rank of the Δ projection; 'auto' = ceil(dim / 16)"}
    )
    bimamba_type: ChoiceEnum(BIMAMBA_TYPES) = field(
        default="external",
        metadata={
            "help": "external: two independent Mambas, one per direction (the paper's ExtBiMamba); "
            "internal: Vim v2, shared in/out projections with a conv and SSM per direction; "
            "none: causal, forward only"
        },
    )
    bimamba_merge: ChoiceEnum(["concat", "sum"]) = field(
        default="concat",
        metadata={"help": "external type only: concat both directions then Linear (as the authors), or sum"},
    )
    mamba_version: int = field(
        default=1,
        metadata={"help": "1: Mamba (selective scan, a decay per channel and state); 2: Mamba-2 "
                  "(the SSD layer: a scalar decay per head, gated RMSNorm), for every bimamba_type"},
    )
    mamba_headdim: int = field(
        default=64, metadata={"help": "mamba_version=2: channels per SSD head (must divide the inner width)"}
    )
    mamba_ngroups: int = field(
        default=1, metadata={"help": "mamba_version=2: groups of heads sharing B and C (must divide the heads)"}
    )
    mamba_chunk_size: int = field(
        default=64, metadata={"help": "mamba_version=2: frames per chunk of the chunked SSD scan"}
    )
    mamba_ffn: bool = field(
        default=True,
        metadata={
            "help": "keep HuBERT's FFN in every layer (Mamba replaces self-attention inside the "
            "Transformer layer, as the paper); false gives pure Mamba blocks without FFN"
        },
    )


def validate_config(cfg: MambaHubertConfig) -> None:
    """ValueError for sizes a Mamba encoder cannot build, naming the field and value."""
    for name in ("mamba_d_state", "mamba_d_conv", "encoder_embed_dim", "encoder_layers"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"model.{name}={getattr(cfg, name)} must be >= 1")
    inner = float(cfg.mamba_expand) * cfg.encoder_embed_dim
    if inner < 1:
        raise ValueError(f"model.mamba_expand={cfg.mamba_expand} gives an empty inner width")
    if inner != int(inner):
        raise ValueError(f"model.mamba_expand={cfg.mamba_expand} x encoder_embed_dim="
                         f"{cfg.encoder_embed_dim} = {inner:g} is not a whole inner width")
    if str(cfg.mamba_dt_rank) != "auto" and not (str(cfg.mamba_dt_rank).isdigit()
                                                 and int(cfg.mamba_dt_rank) >= 1):
        raise ValueError(f"model.mamba_dt_rank={cfg.mamba_dt_rank!r}: use 'auto' or a positive integer")
    if cfg.mamba_ffn and cfg.encoder_ffn_embed_dim < 1:
        raise ValueError(f"model.encoder_ffn_embed_dim={cfg.encoder_ffn_embed_dim} must be >= 1 with "
                         "mamba_ffn=true (set mamba_ffn=false for pure Mamba blocks)")
    if int(cfg.mamba_version) not in MAMBA_VERSIONS:
        raise ValueError(f"model.mamba_version={cfg.mamba_version}: choose one of {MAMBA_VERSIONS}")
    if int(cfg.mamba_version) == 2:
        heads = inner / cfg.mamba_headdim if cfg.mamba_headdim >= 1 else 0.5
        if heads != int(heads):
            raise ValueError(f"model.mamba_headdim={cfg.mamba_headdim} must divide the inner width {inner:g}")
        if cfg.mamba_ngroups < 1 or heads % cfg.mamba_ngroups:
            raise ValueError(f"model.mamba_ngroups={cfg.mamba_ngroups} must divide the {heads:g} heads")
        if cfg.mamba_chunk_size < 1:
            raise ValueError(f"model.mamba_chunk_size={cfg.mamba_chunk_size} must be >= 1")
    if str(cfg.bimamba_type) not in BIMAMBA_TYPES:
        raise ValueError(f"model.bimamba_type={cfg.bimamba_type!r}: choose one of {BIMAMBA_TYPES}")


def _without_transformer_layers(cfg):
    """A copy of ``cfg`` for HubertModel.__init__, which hard-wires a Transformer encoder that we
    replace at once: with no layers it costs nothing and needs no valid attention-head count.
    (HubertModel logs this copy; the encoder actually built is logged afterwards.)"""
    if dataclasses.is_dataclass(cfg):
        return dataclasses.replace(cfg, encoder_layers=0, encoder_attention_heads=1)
    stub = copy.deepcopy(cfg)
    with open_dict(stub):
        stub.encoder_layers, stub.encoder_attention_heads = 0, 1
    return stub


class MambaEncoder(TransformerEncoder):
    """fairseq's wav2vec2/HuBERT encoder (conv positional embedding, layerdrop, padding to
    ``required_seq_len_multiple``, per-layer results) with Mamba layers."""

    def build_encoder_layer(self, args: MambaHubertConfig, **kwargs):
        layer = fsdp_wrap(build_mamba_encoder_layer(args))
        if args.checkpoint_activations:
            layer = checkpoint_wrapper(layer)
        return layer

    def __init__(self, args: MambaHubertConfig):
        super().__init__(args)
        # TransformerEncoder.__init__ ends with init_bert_params, which re-draws every Linear;
        # put back Mamba's own Δ/A/D initialisation afterwards.
        for module in self.modules():
            if isinstance(module, SelectiveSSM):
                module.reset_ssm_parameters()

    def ssm_statistics(self):
        """{f"ssm_delta_{i}": mean Δ of layer i} from the last training forward pass."""
        stats = {}
        for i, layer in enumerate(self.layers):
            deltas = [m.last_delta_mean for m in layer.modules()
                      if isinstance(m, SelectiveSSM) and m.last_delta_mean is not None]
            if deltas:
                stats[f"ssm_delta_{i}"] = float(sum(deltas) / len(deltas))
        return stats


@register_model("mamba_hubert", dataclass=MambaHubertConfig)
class MambaHubertModel(HubertModel):
    """HuBERT whose encoder layers are (bi)directional Mamba blocks; see ``MambaHubertConfig``."""

    def __init__(self, cfg: MambaHubertConfig, task_cfg, dictionaries):
        validate_config(cfg)
        super().__init__(_without_transformer_layers(cfg), task_cfg, dictionaries)
        self.encoder = MambaEncoder(cfg)
        self.conv_layer_spec = eval(cfg.conv_feature_layers)  # noqa: S307 (as HubertModel does)
        logger.info(f"MambaHubertModel: {cfg.encoder_layers} Mamba layers ({cfg.bimamba_type}), "
                    f"{sum(p.numel() for p in self.parameters())} parameters")

    def forward_padding_mask(self, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """(batch, samples) -> (batch, frames) padding mask from the exact conv output lengths.

        HubertModel marks a frame valid when any sample of its stride window is valid, so the
        last "valid" frame can be computed partly from padding. Attention spreads that frame
        into every other; a backward Mamba starts its scan there. So we count frames the way
        the conv stack produces them: floor((L - kernel) / stride) + 1 per layer.
        """
        lengths = (~padding_mask).sum(-1)
        for _, kernel, stride in self.conv_layer_spec:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        lengths = lengths.clamp(min=0)
        frames = torch.arange(features.size(1), device=features.device)
        return frames[None, :] >= lengths[:, None]

    @classmethod
    def build_model(cls, cfg: MambaHubertConfig, task):
        """Build a new model instance."""
        return cls(cfg, task.cfg, task.dictionaries)
