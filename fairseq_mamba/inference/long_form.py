"""Per-layer features of one long utterance in bounded memory, equal to the one-pass result.

``iter_layer_features(model, wav, layers)`` yields ``(k, features)`` with features (frames, dim)
equal to ``model.extract_features(wav[None], output_layer=k)[0][0]`` (fp32 rounding apart), for
``mamba_hubert`` of every ``bimamba_type`` and for stock ``hubert``. Memory holds the waveform,
a few (frames, dim) tensors and ``chunk_frames``-sized intermediates:

* conv front-end: in chunks of output frames, each from exactly the samples of its receptive
  field (frame j reads samples [j * hop, j * hop + receptive)), so chunks overlap by
  ``receptive - hop`` samples and every frame is the one-pass frame. ``extractor_mode=default``
  (HuBERT Base) normalises conv layer 0 with a GroupNorm over the whole time axis: a first pass
  accumulates its per-group sums in float64, the second pass normalises with them.
* positional conv: chunks extended by its half-widths on both sides (zeros only at the true ends).
* Mamba layers: ``MambaEncoderLayer.forward_long`` (state-carrying sweeps, backward directions
  from the last chunk to the first); the rest of every layer is per frame.
* Transformer layers (stock hubert): run over the whole sequence as in the one pass; their
  self-attention costs time quadratic in the length (memory depends on torch's attention kernel).

fairseq pads the encoder input to ``required_seq_len_multiple`` and masks the pad; a masked pad
changes no valid frame in either layer type, so it is not added here.
"""
from typing import Dict, Iterable, Iterator, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from fairseq_mamba.modules import MambaEncoderLayer
from fairseq_mamba.modules.mamba_mixer import time_chunks


def conv_geometry(feature_extractor) -> Tuple[int, int]:
    """(receptive field, hop) in samples of the conv stack: 400 and 320 for HuBERT's."""
    receptive, hop = 1, 1
    for block in feature_extractor.conv_layers:
        kernel, stride = block[0].kernel_size[0], block[0].stride[0]
        receptive += (kernel - 1) * hop
        hop *= stride
    return receptive, hop


def num_frames(n_samples: int, receptive: int, hop: int) -> int:
    """Frames the conv stack makes from n samples: floor((n - receptive) / hop) + 1, or 0."""
    return max(0, (n_samples - receptive) // hop + 1)


def _group_norm_index(feature_extractor):
    """Index of the conv block holding a GroupNorm (None if none); only block 0 is supported."""
    found = [i for i, block in enumerate(feature_extractor.conv_layers)
             if any(isinstance(m, nn.GroupNorm) for m in block)]
    if found and found != [0]:
        raise ValueError(f"GroupNorm in conv layers {found}: long-form encoding supports one in "
                         "layer 0 only (fairseq's extractor_mode=default)")
    return 0 if found else None


@torch.no_grad()
def group_norm_affine(block, wav, chunk_samples):
    """(scale, shift) per channel such that ``conv(x) * scale + shift`` is the block's GroupNorm
    over the whole utterance; the statistics are summed chunk by chunk in float64."""
    conv = block[0]
    norm = next(m for m in block if isinstance(m, nn.GroupNorm))
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    n_out = num_frames(wav.shape[-1], kernel, stride)
    total = torch.zeros(2, conv.out_channels, dtype=torch.float64, device=wav.device)
    step = max(1, chunk_samples // stride)
    for span in time_chunks(n_out, step):
        y = conv(wav[None, None, span.start * stride:(span.stop - 1) * stride + kernel])[0].double()
        total += torch.stack([y.sum(-1), y.pow(2).sum(-1)])
    groups = norm.num_groups
    per_group = total.view(2, groups, -1).sum(-1) / (n_out * conv.out_channels // groups)
    mean, var = per_group[0], (per_group[1] - per_group[0] ** 2).clamp(min=0)
    mean = mean.repeat_interleave(conv.out_channels // groups)
    var = var.repeat_interleave(conv.out_channels // groups)
    scale = norm.weight.double() / torch.sqrt(var + norm.eps)
    return scale.float()[:, None], (norm.bias.double() - mean * scale).float()[:, None]


def front_end_chunks(model, wav, chunk_frames) -> Iterator[Tuple[slice, torch.Tensor]]:
    """(span, encoder input (frames, dim)) chunk by chunk: conv stack, layer_norm, post_extract_proj."""
    extractor = model.feature_extractor
    receptive, hop = conv_geometry(extractor)
    affine = None
    if _group_norm_index(extractor) is not None:
        affine = group_norm_affine(extractor.conv_layers[0], wav, chunk_frames * hop)
    for span in time_chunks(num_frames(wav.shape[-1], receptive, hop), chunk_frames):
        x = wav[None, None, span.start * hop:(span.stop - 1) * hop + receptive]
        for block in extractor.conv_layers:
            for module in block:
                if isinstance(module, nn.GroupNorm):
                    x = x * affine[0] + affine[1]
                else:
                    x = module(x)
        features = model.layer_norm(x[0].t())
        if model.post_extract_proj is not None:
            features = model.post_extract_proj(features)
        yield span, features


def add_positional_conv(encoder, x, chunk_frames):
    """x + pos_conv(x) for x (frames, dim), in chunks extended by the conv's half-widths."""
    kernels = [m.kernel_size[0] for m in encoder.pos_conv.modules() if isinstance(m, nn.Conv1d)]
    left = sum(k // 2 for k in kernels)
    right = sum(k - 1 - k // 2 for k in kernels)
    out = torch.empty_like(x)
    length = x.shape[0]
    for span in time_chunks(length, chunk_frames):
        start, stop = max(0, span.start - left), min(length, span.stop + right)
        # pos_conv pads its input with zeros itself: right at the true ends, discarded elsewhere
        conv = encoder.pos_conv(x[start:stop].t()[None])[0].t()
        out[span] = x[span] + conv[span.start - start:span.stop - start]
    return out


@torch.no_grad()
def iter_layer_features(model, wav: torch.Tensor, layers: Iterable[int], chunk_frames: int = 500,
                        progress: bool = False) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield (k, output of encoder layer k (frames, dim)) for the 1-based ``layers``, in order.

    wav: (samples,) float, as the model sees it (already layer-normalised if the task says so).
    """
    model.eval()
    encoder = model.encoder
    wanted = sorted(set(int(k) for k in layers))
    if not wanted or wanted[0] < 1 or wanted[-1] > len(encoder.layers):
        raise ValueError(f"layers={wanted}: choose among 1..{len(encoder.layers)}")
    receptive, hop = conv_geometry(model.feature_extractor)
    length = num_frames(wav.shape[-1], receptive, hop)
    if length == 0:
        raise ValueError(f"{wav.shape[-1]} samples make no frame: the conv front-end needs {receptive}")
    wav = wav.float()
    n_chunks = len(time_chunks(length, chunk_frames))
    bar = tqdm(total=n_chunks + wanted[-1], unit="step", disable=not progress,
               desc=f"front-end, {length} frames")
    x = wav.new_empty(length, encoder.embedding_dim)
    for span, features in front_end_chunks(model, wav, chunk_frames):
        x[span] = features
        bar.update()
    x = add_positional_conv(encoder, x, chunk_frames)
    if not encoder.layer_norm_first:
        for span in time_chunks(length, chunk_frames):
            x[span] = encoder.layer_norm(x[span])
    for k, layer in enumerate(encoder.layers[: wanted[-1]], start=1):
        bar.set_description(f"layer {k}/{wanted[-1]}")
        if isinstance(layer, MambaEncoderLayer):
            x = layer.forward_long(x[:, None], chunk_frames)[:, 0]
        else:  # a Transformer layer sees the whole sequence at once
            x = layer(x[:, None], self_attn_padding_mask=None, need_weights=False)[0][:, 0]
        bar.update()
        if k in wanted:
            yield k, x
    bar.close()


def encode_long(model, wav, layers, chunk_frames: int = 500) -> Dict[int, torch.Tensor]:
    """{k: (frames, dim)} for the 1-based ``layers``; see ``iter_layer_features``."""
    return dict(iter_layer_features(model, wav, layers, chunk_frames))
