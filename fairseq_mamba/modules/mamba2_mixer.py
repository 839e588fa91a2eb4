"""Padding-aware Mamba-2 mixers (Dao & Gu 2024, the SSD layer): causal, internal and external bi.

The Mamba-2 block: one input projection to (z, xBC, Δ); a causal depthwise conv + SiLU over
xBC = (x, B, C); the SSD scan (a scalar decay exp(Δ A) per head, B/C shared by the heads of a
group, see ``ops.ssd_scan``); a gated RMSNorm ``norm(y * silu(z))``; the output projection.
Input/output (batch, length, d_model), as ``Mamba``; the padding guarantee is Mamba-1's (see
``mamba_mixer``): padded inputs are zeroed, the forward direction is causal, and the backward
direction reverses each sequence within its own length.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_mamba import ops
from fairseq_mamba.modules.mamba_mixer import (
    ExternalBiMamba, lengths_from_padding_mask, reverse_within_lengths, time_chunks)
from fairseq_mamba.ops.ssd_scan import ssd_scan


class GatedRMSNorm(nn.Module):
    """mamba-ssm's RMSNormGated with norm_before_gate=False: rmsnorm(y * silu(z)) per group."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z: (..., dim) -> (..., dim), computed in fp32 and returned in y's dtype."""
        gated = y.float() * F.silu(z.float())
        groups = gated.unflatten(-1, (-1, self.group_size))
        normed = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.float()).to(y.dtype)


class SSD(nn.Module):
    """The part of a Mamba-2 block that has a direction: causal conv over xBC, Δ bias, A, D, scan.

    forward(xBC (batch, conv_dim, length), dt (batch, length, nheads)) -> y (batch, length, d_inner).
    """

    def __init__(self, nheads, headdim, d_state, ngroups=1, d_conv=4, chunk_size=64, conv_bias=True,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1, 16)):
        super().__init__()
        self.nheads, self.headdim, self.d_state, self.ngroups = nheads, headdim, d_state, ngroups
        self.chunk_size = chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range = dt_min, dt_max, dt_init_floor, A_init_range
        self.conv_dim = nheads * headdim + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(nheads))
        for p in (self.dt_bias, self.A_log, self.D):  # out of weight decay, as in mamba-ssm
            p._no_weight_decay = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba-2's initialisation: Δ log-uniform in [dt_min, dt_max], A uniform in A_init_range, D = 1."""
        dt = torch.exp(torch.rand(self.nheads) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.empty(self.nheads).uniform_(*self.A_init_range).log())
        self.D.fill_(1.0)

    def forward(self, xBC: torch.Tensor, dt: torch.Tensor, state=None, return_state: bool = False):
        """state: None, or (conv_state (batch, conv_dim, d_conv - 1), ssm_state (batch, nheads,
        headdim, d_state)) of the frames before; return_state: also return the state after."""
        conv_state, ssm_state = (None, None) if state is None else state
        conv = ops.causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                 initial_states=conv_state, return_final_states=return_state)
        if return_state:
            conv, conv_state = conv
        batch, _, length = xBC.shape
        inner, bc = self.nheads * self.headdim, self.ngroups * self.d_state
        x, B, C = torch.split(conv.transpose(1, 2), [inner, bc, bc], dim=-1)
        out = ssd_scan(
            x.reshape(batch, length, self.nheads, self.headdim), dt, -torch.exp(self.A_log.float()),
            B.reshape(batch, length, self.ngroups, self.d_state),
            C.reshape(batch, length, self.ngroups, self.d_state), self.chunk_size, D=self.D.float(),
            dt_bias=self.dt_bias.float(), dt_softplus=True, initial_states=ssm_state,
            return_final_states=return_state)
        if return_state:
            return out[0].reshape(batch, length, inner), (conv_state, out[1])
        return out.reshape(batch, length, inner)


class Mamba2(nn.Module):
    """Mamba-2 mixer with shared projections and gated norm over one or two scan directions.

    ``directions=("forward",)``: causal Mamba-2; ``("forward", "backward")``: the internal
    bidirectional block (an SSD, with its own conv, Δ bias, A and D, per direction; outputs
    averaged before the gated norm), as ``Mamba`` does for Mamba-1.
    """

    def __init__(self, d_model, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=64,
                 directions: Sequence[str] = ("forward",), bias=False, conv_bias=True, norm_eps=1e-5):
        super().__init__()
        unknown = set(directions) - {"forward", "backward"}
        if unknown or not directions:
            raise ValueError(f"directions={tuple(directions)!r}; use 'forward' and/or 'backward'")
        self.d_model, self.d_inner = d_model, int(expand * d_model)
        if headdim < 1 or self.d_inner % headdim:
            raise ValueError(f"mamba_headdim={headdim} must divide the inner width {self.d_inner}")
        self.nheads = self.d_inner // headdim
        if ngroups < 1 or self.nheads % ngroups:
            raise ValueError(f"mamba_ngroups={ngroups} must divide the number of heads {self.nheads}")
        if chunk_size < 1:
            raise ValueError(f"mamba_chunk_size={chunk_size} must be >= 1")
        self.directions = tuple(directions)
        self.d_bc = ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * self.d_bc + self.nheads, bias=bias)
        self.ssds = nn.ModuleList(
            SSD(self.nheads, headdim, d_state, ngroups, d_conv, chunk_size, conv_bias) for _ in self.directions)
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // ngroups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _project(self, hidden):
        """(batch, length, d_model) -> z (batch, length, d_inner), xBC (batch, conv_dim, length), dt."""
        z, xBC, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.d_inner + 2 * self.d_bc, self.nheads], -1)
        return z, xBC.transpose(1, 2), dt

    def forward(self, hidden: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """hidden: (batch, length, d_model); padding_mask: (batch, length) bool, True = pad."""
        batch, length, _ = hidden.shape
        if length == 0:  # nothing to mix; conv kernels refuse empty inputs
            return hidden.new_zeros(batch, 0, self.d_model)
        lengths = lengths_from_padding_mask(padding_mask, batch, length, hidden.device)
        if padding_mask is not None:
            hidden = hidden.masked_fill(padding_mask[..., None], 0.0)
        z, xBC, dt = self._project(hidden)
        y = 0
        for direction, ssd in zip(self.directions, self.ssds):
            if direction == "forward":
                y = y + ssd(xBC, dt)
            else:
                y_rev = ssd(reverse_within_lengths(xBC, lengths, dim=2), reverse_within_lengths(dt, lengths, dim=1))
                y = y + reverse_within_lengths(y_rev, lengths, dim=1)
        return self.out_proj(self.norm(y / len(self.ssds), z))

    def forward_chunk(self, hidden: torch.Tensor, state=None):
        """Streaming step of the causal mixer: hidden (batch, length >= 1, d_model), no padding;
        state: None at the start, else the one returned before (see ``SSD.forward``)."""
        if self.directions != ("forward",):
            raise ValueError(
                f"Mamba2(directions={self.directions}) reads the future, so it cannot continue a "
                "stream chunk by chunk; only the causal mixer (bimamba_type=none) can")
        z, xBC, dt = self._project(hidden)
        y, state = self.ssds[0](xBC, dt, state, return_state=True)
        return self.out_proj(self.norm(y, z)), state

    def forward_long(self, hidden: torch.Tensor, chunk: int, reverse: bool = False):
        """``forward(hidden)`` for one long unpadded sequence in ``chunk``-frame state-carrying
        sweeps (the backward one from the end); ``reverse=True`` gives rev(forward(rev(hidden)))."""
        batch, length, _ = hidden.shape
        spans = time_chunks(length, chunk)
        y = hidden.new_zeros(batch, length, self.d_inner)
        for direction, ssd in zip(self.directions, self.ssds):
            backwards = (direction == "backward") != reverse
            state = None
            for span in (reversed(spans) if backwards else spans):
                h = hidden[:, span].flip(1) if backwards else hidden[:, span]
                _, xBC, dt = self._project(h)
                y_span, state = ssd(xBC, dt, state, return_state=True)
                y[:, span] += y_span.flip(1) if backwards else y_span
        out = hidden.new_empty(batch, length, self.d_model)
        for span in spans:
            z = self._project(hidden[:, span])[0]
            out[:, span] = self.out_proj(self.norm(y[:, span] / len(self.ssds), z))
        return out


class ExternalBiMamba2(ExternalBiMamba):
    """Two independent causal Mamba-2 mixers, one reading each sequence backwards.

    ``ExternalBiMamba``'s forward and forward_long as they are; only the per-direction mixer
    differs, so its __init__ (which builds Mamba-1 mixers) is replaced, not called.
    """

    fold_out_proj = False  # Mamba2 has no ``mix``: its out_proj follows a gated norm

    def __init__(self, d_model, merge="concat", **mamba2_kwargs):
        nn.Module.__init__(self)
        if merge not in ("concat", "sum"):
            raise ValueError(f"bimamba_merge={merge!r}; use 'concat' or 'sum'")
        self.forward_mamba = Mamba2(d_model, directions=("forward",), **mamba2_kwargs)
        self.backward_mamba = Mamba2(d_model, directions=("forward",), **mamba2_kwargs)
        self.merge = nn.Linear(2 * d_model, d_model) if merge == "concat" else None
