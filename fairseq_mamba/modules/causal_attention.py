"""Causal self-attention for a streaming Transformer HuBERT baseline (``causal_hubert``).

fairseq's ``TransformerSentenceEncoderLayer`` takes a ``self_attn_mask`` only in its pre-norm
branch (the post-norm branch drops it), so the causal mask lives in the attention module itself:
``CausalSelfAttention`` is fairseq's ``MultiheadAttention`` that adds a causal mask to every
call, and ``CausalTransformerLayer`` is the stock layer with that attention in place.
Parameter names, initialisation and the rest of the layer are fairseq's.
"""
from typing import Dict, Optional

import torch
from fairseq.models.wav2vec.wav2vec2 import TransformerSentenceEncoderLayer
from fairseq.modules import MultiheadAttention


def causal_mask(queries: int, past: int, device) -> torch.Tensor:
    """(queries, past + queries) bool, True = blocked: query i (time past + i) sees keys 0 .. past + i."""
    keys = torch.arange(past + queries, device=device)
    times = torch.arange(past, past + queries, device=device)
    return keys[None, :] > times[:, None]


class CausalSelfAttention(MultiheadAttention):
    """fairseq's self-attention in which a frame attends only to itself and earlier frames.

    ``stream_state``: None for whole sequences; a dict while streaming, in which fairseq's
    incremental state caches the keys and values of earlier chunks (a KV cache), so a chunk's
    queries see every earlier frame without recomputing it.
    """

    stream_state: Optional[Dict] = None

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None,
                need_weights=True, static_kv=False, attn_mask=None, **kwargs):
        """query: (time, batch, dim) as fairseq's; ``attn_mask`` must be None (the mask is causal)."""
        if attn_mask is not None:
            raise ValueError("CausalSelfAttention builds its own causal mask: pass attn_mask=None")
        state = self.stream_state if incremental_state is None else incremental_state
        past = 0
        if state is not None:
            prev = self._get_input_buffer(state).get("prev_key")
            past = 0 if prev is None else prev.shape[2]  # (batch, heads, time, head_dim)
        mask = causal_mask(query.shape[0], past, query.device)
        if state is not None:  # fairseq's own attention path adds the mask to the logits: a float one
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(mask, float("-inf"))
        return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                               incremental_state=state, need_weights=need_weights,
                               static_kv=static_kv, attn_mask=mask, **kwargs)


class CausalTransformerLayer(TransformerSentenceEncoderLayer):
    """fairseq's wav2vec2/HuBERT Transformer layer with ``CausalSelfAttention``."""

    def __init__(self, embedding_dim, ffn_embedding_dim, num_attention_heads, dropout,
                 attention_dropout, activation_dropout, activation_fn, layer_norm_first):
        super().__init__(embedding_dim, ffn_embedding_dim, num_attention_heads, dropout,
                         attention_dropout, activation_dropout, activation_fn, layer_norm_first)
        self.self_attn = CausalSelfAttention(self.embedding_dim, num_attention_heads,
                                             dropout=attention_dropout, self_attention=True)

    def forward_chunk(self, x: torch.Tensor, state=None):
        """Streaming step: the next frames of ``forward`` on the whole stream.

        x: (time >= 1, batch, dim), no padding; state: None at the start, else the dict returned
        for the previous chunk (the attention's cached keys and values). Returns (x, state).
        """
        state = {} if state is None else state
        self.self_attn.stream_state = state
        try:
            x = self(x)[0]
        finally:
            self.self_attn.stream_state = None
        return x, state
