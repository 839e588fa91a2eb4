"""The Mamba encoder layer that stands where fairseq's ``TransformerSentenceEncoderLayer`` stands.

It honours that layer's contract, so ``fairseq.models.wav2vec.wav2vec2.TransformerEncoder``
(pos_conv, layerdrop, ``required_seq_len_multiple``, ``layer_results``) drives it unchanged:
``layer(x, self_attn_padding_mask=mask, need_weights=False) -> (x, (None, layer_result))``
with x in fairseq's (time, batch, channel) layout. The mixer itself works batch-first, as
Mamba does; the transposes happen here and only here.
"""
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn

from fairseq import utils
from fairseq.modules import LayerNorm

from .mamba2_mixer import ExternalBiMamba2, Mamba2
from .mamba_mixer import ExternalBiMamba, Mamba, time_chunks

BIMAMBA_TYPES = ("external", "internal", "none")
MAMBA_VERSIONS = (1, 2)


class MambaEncoderLayer(nn.Module):
    """A residual block around a sequence mixer, with or without HuBERT's FFN.

    Args:
        dim: model width.
        mixer_cls: ``mixer_cls(dim)`` -> module mapping (batch, length, dim) and a padding
            mask to (batch, length, dim).
        ffn_dim: width of the position-wise FFN; 0 gives a pure Mamba block (no FFN).
        layer_norm_first: pre-norm (True) or HuBERT Base's post-norm (False).
    """

    def __init__(self, dim: int, mixer_cls: Callable[[int], nn.Module], ffn_dim: int = 3072,
                 dropout: float = 0.1, activation_dropout: float = 0.0, activation_fn: str = "gelu",
                 layer_norm_first: bool = False):
        super().__init__()
        self.embedding_dim = dim
        self.layer_norm_first = layer_norm_first
        self.mixer = mixer_cls(dim)
        self.mixer_layer_norm = LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.has_ffn = ffn_dim > 0
        if self.has_ffn:
            self.activation_fn = utils.get_activation_fn(activation_fn)
            self.fc1 = nn.Linear(dim, ffn_dim)
            self.fc2 = nn.Linear(ffn_dim, dim)
            self.dropout2 = nn.Dropout(activation_dropout)
            self.dropout3 = nn.Dropout(dropout)
            self.final_layer_norm = LayerNorm(dim)

    def forward(self, x: torch.Tensor, self_attn_mask: Optional[torch.Tensor] = None,
                self_attn_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                att_args=None):
        """x: (time, batch, dim); self_attn_padding_mask: (batch, time), True = pad.

        ``self_attn_mask``, ``need_weights`` and ``att_args`` are accepted for interface
        compatibility and ignored (a Mamba has no attention weights; None is returned for them).
        """
        return self._after_mixer(x, self._mix(self._mixer_input(x), self_attn_padding_mask))

    def forward_chunk(self, x: torch.Tensor, state=None):
        """Streaming step (causal mixer only): the next frames of ``forward`` on the whole stream.

        x: (time >= 1, batch, dim), no padding; state: None at the start, else the state
        returned for the previous chunk (the mixer's conv and SSM state; everything else in
        the layer works frame by frame). Returns (x, new state).
        """
        mixed, state = self.mixer.forward_chunk(self._mixer_input(x).transpose(0, 1), state)
        return self._after_mixer(x, mixed.transpose(0, 1))[0], state

    def forward_long(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """``forward(x)[0]`` for one long unpadded sequence x (time, batch, dim), holding a few
        (time, batch, dim) tensors and ``chunk``-frame intermediates instead of the whole
        layer's activations (the mixer runs in state-carrying sweeps, the rest frame-wise)."""
        spans = time_chunks(x.shape[0], chunk)
        mixer_input = x
        if self.layer_norm_first:
            mixer_input = x.new_empty(x.shape)
            for span in spans:
                mixer_input[span] = self.mixer_layer_norm(x[span])
        mixed = self.mixer.forward_long(mixer_input.transpose(0, 1), chunk).transpose(0, 1)
        del mixer_input
        out = torch.empty_like(x)
        for span in spans:
            out[span] = self._after_mixer(x[span], mixed[span])[0]
        return out

    def _mixer_input(self, x):
        return self.mixer_layer_norm(x) if self.layer_norm_first else x

    def _after_mixer(self, residual, x):
        """Residual, norms and FFN around the mixer output x; every step is per frame."""
        layer_result = x
        x = residual + self.dropout1(x)
        if not self.layer_norm_first:
            x = self.mixer_layer_norm(x)
        if self.has_ffn:
            residual = x
            if self.layer_norm_first:
                x = self.final_layer_norm(x)
            x = self.fc2(self.dropout2(self.activation_fn(self.fc1(x))))
            layer_result = x
            x = residual + self.dropout3(x)
            if not self.layer_norm_first:
                x = self.final_layer_norm(x)
        return x, (None, layer_result)

    def _mix(self, x, padding_mask):
        return self.mixer(x.transpose(0, 1), padding_mask).transpose(0, 1)


def build_mixer_cls(bimamba_type: str, merge: str = "concat", version: int = 1,
                    **mamba_kwargs) -> Callable[[int], nn.Module]:
    """The mixer factory for a ``bimamba_type`` (external | internal | none = causal) and a Mamba
    ``version`` (1: ``Mamba``; 2: ``Mamba2``, the SSD layer); kwargs go to that mixer."""
    if version not in MAMBA_VERSIONS:
        raise ValueError(f"mamba_version={version!r}; choose one of {MAMBA_VERSIONS}")
    mixer, external = (Mamba, ExternalBiMamba) if version == 1 else (Mamba2, ExternalBiMamba2)
    if bimamba_type == "external":
        return partial(external, merge=merge, **mamba_kwargs)
    if bimamba_type == "internal":
        return partial(mixer, directions=("forward", "backward"), **mamba_kwargs)
    if bimamba_type == "none":
        return partial(mixer, directions=("forward",), **mamba_kwargs)
    raise ValueError(f"bimamba_type={bimamba_type!r}; choose one of {BIMAMBA_TYPES}")


def build_mamba_encoder_layer(cfg) -> MambaEncoderLayer:
    """Build one layer from a ``MambaHubertConfig`` (or anything with the same fields)."""
    version = int(getattr(cfg, "mamba_version", 1))
    if version == 2:
        mixer_kwargs = dict(headdim=cfg.mamba_headdim, ngroups=cfg.mamba_ngroups, chunk_size=cfg.mamba_chunk_size)
    else:
        mixer_kwargs = dict(dt_rank=cfg.mamba_dt_rank)
    mixer_cls = build_mixer_cls(
        cfg.bimamba_type, merge=cfg.bimamba_merge, version=version, d_state=cfg.mamba_d_state,
        d_conv=cfg.mamba_d_conv, expand=cfg.mamba_expand, **mixer_kwargs,
    )
    return MambaEncoderLayer(
        cfg.encoder_embed_dim, mixer_cls,
        ffn_dim=cfg.encoder_ffn_embed_dim if cfg.mamba_ffn else 0,
        dropout=cfg.dropout, activation_dropout=cfg.activation_dropout,
        activation_fn=cfg.activation_fn, layer_norm_first=cfg.layer_norm_first,
    )
