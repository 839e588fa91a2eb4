"""Streaming inference for causal ``mamba_hubert`` (``bimamba_type=none``) and ``causal_hubert``.

    stream = StreamingEncoder(model)            # model.eval() is called
    for samples in chunks:                       # (batch, n) or (n,) float, any n >= 0
        feats = stream.forward_chunk(samples)    # (batch, frames ready, dim), maybe 0 frames
    feats = stream.flush()                       # the last frames, at the end of the stream
    stream.reset()                               # ready for the next stream

The concatenated outputs equal ``model.extract_features(all_samples, output_layer=...)[0]``
(fp32: within 1e-5, tested for chunkings down to one sample). Each stage carries its state:

* conv feature extractor: each conv layer keeps the input samples/frames it has not consumed;
  a frame is computed once its receptive field (400 samples in HuBERT's front-end) has arrived.
  With ``extractor_mode=layer_norm`` the norms are per frame, so this is exact. With
  ``extractor_mode=default`` (HuBERT Base) the first layer's GroupNorm normalises every channel
  over the whole utterance: no frame is final before the stream ends, so it is refused.
* positional conv (fairseq's ``pos_conv``): NON-causal, frame t reads frames t-K//2 .. t+R with
  R = K - 1 - K//2 (K = ``conv_pos``). A frame is emitted once its R lookahead frames have
  arrived: an algorithmic latency of R frames (``lookahead_seconds``: 1.26 s for conv_pos=128,
  0.30 s for 32). ``flush()`` supplies the zeros the full pass pads with at the end.
* encoder LayerNorm, FFN, projections: per frame, no state.
* every Mamba layer (Mamba-1 or Mamba-2): its causal conv state and SSM state
  (``MambaEncoderLayer.forward_chunk``).
* every causal attention layer: its keys and values so far, a KV cache
  (``CausalTransformerLayer.forward_chunk``; memory grows with the stream, as attention does).

Audio normalisation is the caller's: a task with ``normalize=true`` layer-normalises the whole
waveform before the model sees it, which a live stream cannot know in advance.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.modules import SamePad
from torch.nn.utils.weight_norm import WeightNorm

from fairseq_mamba.modules import CausalTransformerLayer, Mamba, Mamba2, MambaEncoderLayer


def check_streamable(model) -> None:
    """ValueError naming the reason and the fix if ``model`` cannot be streamed exactly."""
    for i, block in enumerate(model.feature_extractor.conv_layers):
        if any(isinstance(m, nn.GroupNorm) for m in block.modules()):
            raise ValueError(
                f"feature extractor conv layer {i} has a GroupNorm (model.extractor_mode=default): it "
                "normalises each channel over the whole utterance, so no frame is final until the "
                "stream ends and streaming cannot equal the full pass; train with "
                "model.extractor_mode=layer_norm (per-frame norms) to stream")
    for i, layer in enumerate(model.encoder.layers):
        if isinstance(layer, CausalTransformerLayer):
            continue
        if not isinstance(layer, MambaEncoderLayer):
            raise ValueError(
                f"encoder layer {i} is a {type(layer).__name__}: self-attention reads the whole "
                "utterance; only mamba_hubert with model.bimamba_type=none or causal_hubert can stream")
        if not (isinstance(layer.mixer, (Mamba, Mamba2)) and layer.mixer.directions == ("forward",)):
            raise ValueError(
                f"encoder layer {i} has a bidirectional mixer ({type(layer.mixer).__name__}): it reads "
                "the future; only model.bimamba_type=none (causal) models can stream")
    pos = model.encoder.pos_conv
    convs = [m for m in pos if isinstance(m, nn.Conv1d)]
    if len(convs) != 1 or any(isinstance(m, nn.Sequential) for m in pos):
        raise ValueError("encoder.pos_conv is not fairseq's one-layer conv (pos_conv_depth > 1?); "
                         "streaming supports model.pos_conv_depth=1 only")


def effective_weight(conv: nn.Conv1d) -> torch.Tensor:
    """The weight ``conv`` uses in forward: fairseq's pos_conv recomputes it from weight norm's
    (g, v) in a forward pre-hook, so the ``weight`` attribute may be stale after loading."""
    for hook in conv._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return hook.compute_weight(conv)
    return conv.weight


class StreamingEncoder:
    """Chunk-by-chunk ``extract_features`` of a causal model (see module doc).

    Args:
        model: a ``MambaHubertModel`` with ``bimamba_type=none`` or a ``CausalHubertModel``,
            with ``extractor_mode=layer_norm``.
        output_layer: 1-based layer whose output is returned, as in ``extract_features``;
            None = the last layer (with the final LayerNorm of pre-norm encoders).
    """

    def __init__(self, model, output_layer: Optional[int] = None):
        check_streamable(model)
        n_layers = len(model.encoder.layers)
        if output_layer is not None and not 1 <= output_layer <= n_layers:
            raise ValueError(f"output_layer={output_layer}: choose 1..{n_layers} (or None = last)")
        self.model = model.eval()
        encoder = model.encoder
        self.layers = list(encoder.layers)[: output_layer or n_layers]
        self.final_norm = encoder.layer_norm_first and output_layer is None
        index = next(i for i, m in enumerate(encoder.pos_conv) if isinstance(m, nn.Conv1d))
        self.pos_pre = encoder.pos_conv[:index]  # e.g. conv_pos_batch_norm's BatchNorm (per frame)
        self.pos_conv = encoder.pos_conv[index]
        self.pos_post = [m for m in encoder.pos_conv[index + 1:] if not isinstance(m, SamePad)]
        kernel = self.pos_conv.kernel_size[0]
        self.pos_left, self.lookahead_frames = kernel // 2, kernel - 1 - kernel // 2
        self.hop = 1
        for block in model.feature_extractor.conv_layers:
            self.hop *= block[0].stride[0]
        self.reset()

    @property
    def lookahead_seconds(self) -> float:
        """Algorithmic latency of the positional conv at 16 kHz: frames wait for R later frames."""
        return self.lookahead_frames * self.hop / 16000

    def reset(self) -> None:
        """Forget the stream: the next ``forward_chunk`` starts a new utterance."""
        self._conv_inputs = [None] * len(self.model.feature_extractor.conv_layers)
        self._window = None  # (batch, frames, dim): pos_pre(frames) from frame t - K//2 on
        self._pending = None  # (batch, frames, dim): encoder inputs not emitted yet
        self._states = [None] * len(self.layers)
        self._pos_weight = effective_weight(self.pos_conv).detach()
        self._flushed = False
        self.frames_emitted = 0

    @torch.no_grad()
    def forward_chunk(self, samples) -> torch.Tensor:
        """samples: (batch, n) or (n,) -> (batch, frames, dim) features of the frames completed."""
        if self._flushed:
            raise ValueError("forward_chunk after flush(): call reset() to start a new stream")
        samples = torch.as_tensor(samples, dtype=torch.float32, device=self.model.layer_norm.weight.device)
        if samples.dim() == 1:
            samples = samples[None]
        if samples.dim() != 2:
            raise ValueError(f"samples must be (batch, n) or (n,), got shape {tuple(samples.shape)}")
        return self._emit(self._front_end(samples), final=False)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """End of stream: the last ``lookahead_frames`` frames, their future padded with zeros
        as the full pass pads it. Samples short of a whole frame are dropped, as in the full pass."""
        if self._flushed:
            raise ValueError("flush() called twice: call reset() to start a new stream")
        self._flushed = True
        if self._pending is None:  # no frame was ever completed
            return self.model.layer_norm.weight.new_zeros(0, 0, self.model.encoder.embedding_dim)
        return self._emit(self._pending[:, :0], final=True)

    def _front_end(self, samples):
        """New samples -> (batch, frames, dim) encoder inputs of the frames they complete."""
        x = samples[:, None, :]  # (batch, 1, n)
        for i, block in enumerate(self.model.feature_extractor.conv_layers):
            if self._conv_inputs[i] is not None:
                x = torch.cat([self._conv_inputs[i], x], dim=-1)
            conv = block[0]
            kernel, stride = conv.kernel_size[0], conv.stride[0]
            n_out = max(0, (x.shape[-1] - kernel) // stride + 1)
            self._conv_inputs[i] = x[..., n_out * stride:]
            if n_out == 0:  # later layers get nothing new; their buffers wait as they are
                return x.new_zeros(x.shape[0], 0, self.model.encoder.embedding_dim)
            x = block(x[..., : (n_out - 1) * stride + kernel])
        features = self.model.layer_norm(x.transpose(1, 2))
        if self.model.post_extract_proj is not None:
            features = self.model.post_extract_proj(features)
        return features

    def _emit(self, frames, final):
        """Encoder inputs (batch, new frames, dim) -> outputs of every frame whose lookahead is in."""
        batch, _, dim = frames.shape
        if self._window is None:  # start of stream: the zeros the full pass pads with on the left
            self._window = frames.new_zeros(batch, self.pos_left, dim)
            self._pending = frames[:, :0]
        right_pad = [frames.new_zeros(batch, self.lookahead_frames, dim)] if final else []
        pre = self.pos_pre(frames.transpose(1, 2)).transpose(1, 2)  # modules work on (batch, dim, time)
        self._window = torch.cat([self._window, pre, *right_pad], dim=1)
        self._pending = torch.cat([self._pending, frames], dim=1)
        kernel = self.pos_left + self.lookahead_frames + 1
        n_out = self._window.shape[1] - kernel + 1
        if n_out <= 0:
            return frames[:, :0]
        x_conv = F.conv1d(self._window[:, : n_out + kernel - 1].transpose(1, 2), self._pos_weight,
                          self.pos_conv.bias, groups=self.pos_conv.groups)
        for module in self.pos_post:
            x_conv = module(x_conv)
        x = self._pending[:, :n_out] + x_conv.transpose(1, 2)
        self._window, self._pending = self._window[:, n_out:], self._pending[:, n_out:]
        self.frames_emitted += n_out
        return self._encode(x)

    def _encode(self, x):
        """(batch, frames, dim) after the positional conv -> the chosen layer's output."""
        encoder = self.model.encoder
        if not encoder.layer_norm_first:
            x = encoder.layer_norm(x)
        x = x.transpose(0, 1)  # fairseq's (time, batch, dim)
        for i, layer in enumerate(self.layers):
            x, self._states[i] = layer.forward_chunk(x, self._states[i])
        x = x.transpose(0, 1)
        return encoder.layer_norm(x) if self.final_norm else x
