"""Causal depthwise 1-D convolution, with the semantics of ``causal_conv1d_fn``.

Shapes: x (batch, dim, length), weight (dim, width), bias (dim,),
initial_states / final states (batch, dim, width - 1).

``causal_conv1d`` uses the CUDA kernel of the ``causal-conv1d`` package where
``ops.dispatch.kernel_for`` picks it (a GPU, the package importable, no state
passed, width 2..4), on CPU the compiled kernel of conv_kernel.py (no states passed),
and ``F.conv1d`` otherwise.
``causal_conv1d_reference`` is an explicit loop over the taps, the ground truth
the fast paths are tested against.
"""

import torch
import torch.nn.functional as F

from fairseq_mamba.ops.conv_kernel import KernelCausalConv1d, conv_kernel_applies
from fairseq_mamba.ops.dispatch import HAS_CUDA_CONV, causal_conv1d_fn, kernel_for

__all__ = ["HAS_CUDA_CONV", "causal_conv1d", "causal_conv1d_fn", "causal_conv1d_reference"]

_ACTIVATIONS = (None, "silu", "swish")


def _check(x, weight, bias, activation, initial_states):
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, dim, length), got shape {tuple(x.shape)}")
    dim = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(
            f"weight must be (dim={dim}, width>=1), got shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias must be (dim={dim},), got shape {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    width = weight.shape[1]
    if initial_states is not None:
        want = (x.shape[0], dim, width - 1)
        if tuple(initial_states.shape) != want:
            raise ValueError(
                f"initial_states must be (batch, dim, width-1)={want}, "
                f"got shape {tuple(initial_states.shape)}"
            )


def _pad_left(x, width, initial_states):
    """Prepend the width-1 past frames: zeros, or the streaming state."""
    if initial_states is None:
        return F.pad(x, (width - 1, 0))
    return torch.cat([initial_states.to(x.dtype), x], dim=-1)


def _finish(out, padded, width, activation, return_final_states):
    if activation is not None:
        out = F.silu(out)
    if not return_final_states:
        return out
    # The last width-1 input frames (zeros/initial state if the input is shorter).
    final = padded[..., padded.shape[-1] - (width - 1):]
    return out, final.contiguous()


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None,
                  return_final_states=False):
    """out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (width-1) + k]).

    Frames before t=0 are zeros, or ``initial_states`` (the previous width-1
    input frames) so a stream can be continued exactly chunk by chunk.
    Returns out (batch, dim, length), plus the final states
    (batch, dim, width-1) when ``return_final_states``.
    """
    _check(x, weight, bias, activation, initial_states)
    width = weight.shape[1]
    kernel = kernel_for("causal_conv1d", x, conv_width=width,
                        stateful=initial_states is not None or return_final_states)
    if kernel is not None:
        return kernel(x, weight, bias, activation=activation)
    if conv_kernel_applies(x, activation, initial_states is not None or return_final_states):
        return KernelCausalConv1d.apply(x, weight, bias, activation is not None)
    padded = _pad_left(x, width, initial_states)
    if x.shape[-1] == 0:  # F.conv1d rejects inputs shorter than the kernel
        out = padded[..., :0] * weight[:, :1]  # empty, in the graph: zero gradients
        out = out if bias is None else out + bias[:, None]
    else:
        out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=x.shape[1])
    return _finish(out, padded, width, activation, return_final_states)


def causal_conv1d_reference(x, weight, bias=None, activation=None, initial_states=None,
                            return_final_states=False):
    """Same as :func:`causal_conv1d`, an explicit sum over taps in fp32 (fp64 for fp64)."""
    _check(x, weight, bias, activation, initial_states)
    dtype_in = x.dtype
    ct = torch.promote_types(torch.float32, x.dtype)
    width, length = weight.shape[1], x.shape[-1]
    padded = _pad_left(x.to(ct), width, initial_states)
    w = weight.to(ct)
    out = torch.zeros_like(padded[..., width - 1:])
    for k in range(width):
        # Tap k looks (width-1-k) frames into the past.
        out = out + w[:, k, None] * padded[..., k:k + length]
    if bias is not None:
        out = out + bias.to(ct)[:, None]
    result = _finish(out, padded, width, activation, return_final_states)
    if return_final_states:
        return result[0].to(dtype_in), result[1].to(dtype_in)
    return result.to(dtype_in)
