"""``hubert_ctc_head``: fairseq's ``hubert_ctc`` with an extra module between encoder and CTC.

The paper (arXiv 2409.07273) argues that Mamba layers do "reconstruction" and that a
classification task such as ASR needs an extra module on top of a Mamba HuBERT; its ASR
evidence is fine-tuning with and without a Conformer there (and feeding it layer 9 of 12).
This model is that experiment as a fairseq role: ``HubertCtcHeadConfig(HubertCtcConfig)`` adds

* ``head_layers`` layers of ``head_type`` (``conformer``: fairseq's
  ``ConformerWav2Vec2EncoderLayer``; ``transformer``: fairseq's ``TransformerSentenceEncoderLayer``;
  ``bimamba``: our external-BiMamba ``MambaEncoderLayer``) after the pre-trained encoder, and
* ``feature_layer`` k: the head (or, with no head, the CTC projection) reads encoder layer k
  (1-based, as ``extract_features(output_layer=k)``) and the layers above k are dropped.

Everything else is fairseq's ``HubertEncoder``: loading ``w2v_path`` (a ``mamba_hubert`` or a
stock ``hubert`` checkpoint), ``no_pretrained_weights``, masking, freezing, the final dropout
and projection. ``head_layers=0, feature_layer=0`` is exactly ``hubert_ctc``.
"""
import contextlib
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from fairseq.models.hubert.hubert_asr import HubertCtc, HubertEncoder
from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer
from fairseq.modules.conformer_layer import ConformerWav2Vec2EncoderLayer

from fairseq_mamba.modules.mamba_layer import MambaEncoderLayer, build_mixer_cls
from fairseq_mamba.fairseq_fixes.upstream import patch_hubert_ctc

patch_hubert_ctc()  # HubertCtcConfig with fairseq 0.12's missing `autoregressive` field
from fairseq.models import MODEL_DATACLASS_REGISTRY  # noqa: E402

HubertCtcConfig = MODEL_DATACLASS_REGISTRY["hubert_ctc"]
HEAD_TYPES = ("conformer", "transformer", "bimamba")
logger = logging.getLogger(__name__)


@dataclass
class HubertCtcHeadConfig(HubertCtcConfig):
    head_layers: int = field(default=0, metadata={"help": "layers of the extra module; 0 = plain hubert_ctc"})
    head_type: ChoiceEnum(HEAD_TYPES) = field(
        default="conformer",
        metadata={"help": "conformer: fairseq's ConformerWav2Vec2EncoderLayer (depthwise conv masked to "
                  "the utterance); transformer: fairseq's TransformerSentenceEncoderLayer; bimamba: "
                  "this plugin's external-BiMamba layer"})
    head_embed_dim: int = field(default=0, metadata={"help": "head width; 0 = the encoder's width "
                                                     "(else a Linear maps the encoder output to it)"})
    head_attention_heads: int = field(default=4, metadata={"help": "attention heads (conformer, transformer)"})
    head_ffn_embed_dim: int = field(default=1024, metadata={"help": "FFN width of each head layer"})
    head_conv_kernel: int = field(default=31, metadata={"help": "conformer depthwise conv kernel (odd)"})
    head_dropout: float = field(default=0.1, metadata={"help": "dropout inside the head layers"})
    head_mamba_d_state: int = field(default=16, metadata={"help": "bimamba head: SSM state size"})
    head_mamba_expand: float = field(default=1, metadata={"help": "bimamba head: inner width / width"})
    feature_layer: int = field(
        default=0, metadata={"help": "encoder layer (1-based) fed to the head; 0 = the last; the "
                             "layers above it are dropped (the paper's 'layer-9 features')"})


class MaskedConformerLayer(ConformerWav2Vec2EncoderLayer):
    """fairseq's Conformer layer, batch-consistent.

    As shipped, its depthwise conv reads the padded frames of a batch, so an utterance's output
    depends on what it is batched with (0.13 max difference in eval mode, measured). Here the
    conv's input is zeroed on padded frames, which is exactly the zero padding the conv sees at
    the end of an utterance alone: in eval mode a padded batch gives each utterance its solo
    output. In training, BatchNorm's batch statistics still pool every frame of the batch,
    padded ones included (as in every fairseq Conformer); eval uses the running statistics.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._padding_mask: Optional[Tensor] = None
        self.conv_module.depthwise_conv.register_forward_pre_hook(self._zero_padding)

    def _zero_padding(self, module, inputs):
        if self._padding_mask is None:
            return None
        x = inputs[0]  # (batch, channels, time)
        return (x.masked_fill(self._padding_mask[:, None, : x.shape[-1]], 0.0),)

    def forward(self, x, self_attn_mask=None, self_attn_padding_mask=None, need_weights=False,
                att_args=None, position_emb=None):
        """x: (time, batch, dim); self_attn_padding_mask: (batch, time), True = pad."""
        self._padding_mask = self_attn_padding_mask
        try:
            return super().forward(x, self_attn_padding_mask=self_attn_padding_mask, position_emb=position_emb)
        finally:
            self._padding_mask = None


def build_head_layer(cfg: HubertCtcHeadConfig) -> nn.Module:
    """One head layer; every kind is called as ``layer(x, self_attn_padding_mask=mask)[0]`` on
    (time, batch, dim) x."""
    dim, kind = cfg.head_embed_dim, str(cfg.head_type)
    if kind == "conformer":
        return MaskedConformerLayer(dim, cfg.head_ffn_embed_dim, cfg.head_attention_heads, cfg.head_dropout,
                                    use_fp16=False, depthwise_conv_kernel_size=cfg.head_conv_kernel)
    if kind == "transformer":
        return TransformerSentenceEncoderLayer(dim, cfg.head_ffn_embed_dim, cfg.head_attention_heads,
                                               cfg.head_dropout, cfg.head_dropout, cfg.head_dropout,
                                               activation_fn="gelu", layer_norm_first=True)
    if kind == "bimamba":
        mixer = build_mixer_cls("external", d_state=cfg.head_mamba_d_state, expand=cfg.head_mamba_expand)
        return MambaEncoderLayer(dim, mixer, ffn_dim=cfg.head_ffn_embed_dim, dropout=cfg.head_dropout,
                                 layer_norm_first=True)
    raise ValueError(f"model.head_type={kind!r}: choose one of {HEAD_TYPES}")


def validate_head_config(cfg: HubertCtcHeadConfig) -> None:
    """ValueError naming the field for a head that cannot be built."""
    for name in ("head_layers", "feature_layer", "head_embed_dim"):
        if int(getattr(cfg, name)) < 0:
            raise ValueError(f"model.{name}={getattr(cfg, name)} must be >= 0")
    if cfg.head_layers and str(cfg.head_type) == "conformer" and cfg.head_conv_kernel % 2 == 0:
        raise ValueError(f"model.head_conv_kernel={cfg.head_conv_kernel} must be odd (same-length conv)")
    if cfg.head_layers and str(cfg.head_type) != "bimamba" and cfg.head_embed_dim % cfg.head_attention_heads:
        raise ValueError(f"model.head_embed_dim={cfg.head_embed_dim} is not divisible by "
                         f"model.head_attention_heads={cfg.head_attention_heads}")


class HubertHeadEncoder(HubertEncoder):
    """fairseq's HubertEncoder (pre-trained HuBERT, masking, freezing, CTC projection) with
    ``feature_layer`` and the head layers between encoder and projection."""

    def __init__(self, cfg: HubertCtcHeadConfig, task):
        super().__init__(cfg, task)  # builds (and loads, unless no_pretrained_weights) w2v_model
        layers = self.w2v_model.encoder.layers
        if cfg.feature_layer > len(layers):
            raise ValueError(f"model.feature_layer={cfg.feature_layer}, but the encoder has {len(layers)} layers")
        self.feature_layer = cfg.feature_layer or None
        if self.feature_layer:
            self.w2v_model.encoder.layers = layers[: self.feature_layer]
        width = self.w2v_model.encoder.embedding_dim
        if not cfg.head_embed_dim:
            cfg.head_embed_dim = width
        validate_head_config(cfg)
        self.head_in = nn.Linear(width, cfg.head_embed_dim) if cfg.head_layers and cfg.head_embed_dim != width else None
        self.head = nn.ModuleList(build_head_layer(cfg) for _ in range(cfg.head_layers))
        if self.head_in is not None and self.proj is not None:
            self.proj = nn.Linear(cfg.head_embed_dim, self.proj.out_features)
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.constant_(self.proj.bias, 0.0)

    def encode(self, source: Tensor, padding_mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """(batch, samples) -> encoder layer ``feature_layer`` (time, batch, dim) and the frame
        padding mask (batch, time), under fairseq's freeze_finetune_updates."""
        ft = self.freeze_finetune_updates <= self.num_updates
        with torch.no_grad() if not ft else contextlib.ExitStack():
            x, padding_mask = self.w2v_model.extract_features(
                source=source, padding_mask=padding_mask, mask=self.apply_mask and self.training,
                output_layer=self.feature_layer)
        return x.transpose(0, 1), padding_mask

    def run_head(self, x: Tensor, padding_mask: Optional[Tensor]) -> List[Tensor]:
        """The head's input and each head layer's output, (time, batch, dim) each."""
        outputs = [x if self.head_in is None else self.head_in(x)]
        for layer in self.head:
            outputs.append(layer(outputs[-1], self_attn_padding_mask=padding_mask)[0])
        return outputs

    def forward(self, source, padding_mask, tbc=True, **kwargs):
        x, padding_mask = self.encode(source, padding_mask)
        x = self.run_head(x, padding_mask)[-1]
        if not tbc:
            x = x.transpose(0, 1)
        x = self.final_dropout(x)
        if self.proj:
            x = self.proj(x)
        return {"encoder_out": x, "encoder_padding_mask": padding_mask, "padding_mask": padding_mask}

    def layer_outputs(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Tuple[List[Tensor], Optional[Tensor]]:
        """Every layer's frames for the MI analysis, (batch, time, dim) each: [layer 0 = the input
        of the first encoder layer, encoder layers 1..k (k = feature_layer or the last), head
        layers 1..H] (the head's input projection, if any, is not a layer), and the frame padding
        mask (batch, time), True = pad. Eval-mode numbers need ``model.eval()`` first."""
        captured = []
        layers = self.w2v_model.encoder.layers
        hooks = [layers[0].register_forward_pre_hook(lambda m, args, kw: captured.append(args[0] if args else kw["x"]),
                                                     with_kwargs=True)]
        hooks += [layer.register_forward_hook(lambda m, args, out: captured.append(out[0])) for layer in layers]
        try:
            x, padding_mask = self.encode(source, padding_mask)
        finally:
            for h in hooks:
                h.remove()
        heads = self.run_head(x, padding_mask)[1:]
        return [t.transpose(0, 1) for t in captured + heads], padding_mask


@register_model("hubert_ctc_head", dataclass=HubertCtcHeadConfig)
class HubertCtcHead(HubertCtc):
    """``hubert_ctc`` with an extra module on top of the encoder: see ``HubertCtcHeadConfig``."""

    @classmethod
    def build_model(cls, cfg: HubertCtcHeadConfig, task):
        model = cls(cfg, HubertHeadEncoder(cfg, task))
        head = sum(p.numel() for p in model.w2v_encoder.head.parameters())
        logger.info(f"hubert_ctc_head: {cfg.head_layers} x {cfg.head_type} head ({head} parameters) on encoder "
                    f"layer {cfg.feature_layer or 'last'}")
        return model
