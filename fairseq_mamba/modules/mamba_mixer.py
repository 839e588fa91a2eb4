"""Padding-aware selective-state-space mixers: one-directional Mamba and the bidirectional variants.

Shapes follow state-spaces/mamba: a mixer maps hidden states (batch, length, d_model) to the
same shape. Batches are right-padded (fairseq's collaters pad at the end); a mixer takes the
(batch, length) boolean ``padding_mask`` (True = padding) and guarantees that a valid frame
never sees a padded one:

* the forward direction is causal, so padded frames (all after the valid ones) cannot reach it;
* the backward direction reverses each sequence *within its own length*, so after the
  reversal the padding is still at the end and the same causal argument holds;
* padded inputs are zeroed first, so NaN/inf garbage cannot leak through ``0 * x`` products.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_mamba import ops


def lengths_from_padding_mask(padding_mask: Optional[torch.Tensor], batch: int, length: int, device):
    """(batch, length) right-padding mask -> (batch,) valid lengths, or None where no row is
    padded (reverse_within_lengths then flips); ValueError if not right-padded."""
    if padding_mask is None:
        return None
    if padding_mask.shape != (batch, length):
        raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected {(batch, length)}")
    lengths = (~padding_mask).sum(-1)
    if bool((lengths == length).all()):
        return None
    right_padded = torch.arange(length, device=device)[None, :] >= lengths[:, None]
    if not torch.equal(right_padded, padding_mask.bool()):
        raise ValueError(
            "padding_mask is not right-padded (valid frames must come first in every row); "
            "bidirectional Mamba reverses each sequence within its length and needs that layout"
        )
    return lengths


def reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor, dim: int) -> torch.Tensor:
    """Reverse ``x`` along ``dim`` per batch row, only over the first ``lengths[b]`` positions.

    Padded positions stay where they are, so the operation is its own inverse.
    ``x``: batch first; ``dim`` is the time axis; ``lengths`` None: every row is full
    (a flip, whose backward is a flip rather than gather's scatter-add).
    """
    if lengths is None:  # no row is padded
        return x.flip(dim)
    length = x.shape[dim]
    t = torch.arange(length, device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (batch, length)
    shape = [1] * x.dim()
    shape[0], shape[dim] = x.shape[0], length
    return x.gather(dim, index.view(shape).expand_as(x))


def channel_major(t: torch.Tensor) -> torch.Tensor:
    """(batch, ch, length) -> (ch, batch * length): a view where t is already a view of such
    memory (what the helpers below return), else a copy."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def linear_to_channels(linear: nn.Linear, hidden: torch.Tensor, chunks: int = 1):
    """``linear(hidden).transpose(1, 2).chunk(chunks, dim=1)``: hidden (batch, length, in) ->
    ``chunks`` tensors (batch, out / chunks, length), views of (out / chunks, batch * length)
    memory.

    mamba-ssm's ``W @ rearrange(hidden, "b l d -> d (b l)")``: one matmul, and each channel's
    steps contiguous, the layout the conv and scan kernels read without a copy (the
    transposed view of ``linear(hidden)`` would be copied by each of them). The chunks are
    cut before the view, so that their gradients meet in that layout too (no copy in backward).
    """
    batch, length, _ = hidden.shape
    flat = linear.weight @ hidden.reshape(batch * length, -1).t()
    if linear.bias is not None:
        flat = flat + linear.bias[:, None]
    return tuple(t.view(-1, batch, length).transpose(0, 1) for t in flat.chunk(chunks, dim=0))


def linear_from_channels(y: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(y.transpose(1, 2), weight, bias)``: y (batch, ch, length) -> (batch, length,
    out), without a copy where y is channel-major (the matmul reads the transposed view)."""
    batch, _, length = y.shape
    return F.linear(channel_major(y).t(), weight, bias).view(batch, length, -1)


def time_chunks(length: int, chunk: int):
    """[slice(0, chunk), slice(chunk, 2 * chunk), ...] covering ``range(length)``."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: a chunk must hold at least one frame")
    return [slice(start, min(start + chunk, length)) for start in range(0, length, chunk)]


class SelectiveSSM(nn.Module):
    """The part of a Mamba block that has a direction: causal conv, input-dependent (Δ, B, C), scan.

    forward(x, z) with x, z: (batch, d_inner, length) -> y: (batch, d_inner, length), gated by z.
    """

    def __init__(self, d_inner, d_state=16, d_conv=4, dt_rank=None, dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4, conv_bias=True):
        super().__init__()
        self.d_inner, self.d_state = d_inner, d_state
        self.dt_rank = dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        # Kept out of weight decay by optimisers that look for it (as in mamba-ssm).
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.last_delta_mean: Optional[torch.Tensor] = None
        self.reset_ssm_parameters()

    # Parameters the scan kernels read in fp32 (A = -exp(A_log), D, the Δ bias): they stay fp32
    # when fairseq's common.fp16 / common.bf16 casts the model (model.half(), .to(bfloat16)).
    FP32_PARAMETERS = ("A_log", "D", "dt_proj.bias")

    def _apply(self, fn, recurse=True):
        keep = {name: p.data for name, p in self.named_parameters() if name in self.FP32_PARAMETERS}
        super()._apply(fn, recurse)
        for name, p in self.named_parameters():
            if name in keep and p.dtype in (torch.float16, torch.bfloat16):
                p.data = keep[name].to(p.device)  # the fp32 values, not a rounded copy
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba's special initialisation of Δ, A and D.

        Called again by the encoder after fairseq's ``init_bert_params`` has re-initialised every
        Linear (which would zero the Δ bias and give softplus(0) = 0.69, far outside [dt_min, dt_max]).
        """
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log.copy_(torch.log(A))  # S4D-real
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, z: torch.Tensor, valid: Optional[torch.Tensor] = None):
        """x, z: (batch, d_inner, length); valid: optional (batch, length) bool for the Δ statistic."""
        length = x.shape[-1]
        x = ops.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        dt, B, C = self._delta_b_c(x)
        self._record_delta(dt, valid, length)
        return self._scan(x, z, dt, B, C)

    def forward_chunk(self, x: torch.Tensor, z: torch.Tensor, state=None):
        """Continue a sequence from ``state``: the next ``length`` frames of ``forward(x, z)``.

        x, z: (batch, d_inner, length >= 1); state: None at the start, else the state returned
        for the previous chunk: (conv_state (batch, d_inner, d_conv - 1), the last conv inputs;
        ssm_state (batch, d_inner, d_state) fp32, h_{t-1}). Returns (y (batch, d_inner, length),
        new state). Chunks of any sizes give forward() on their concatenation (up to rounding).
        """
        conv_state, ssm_state = (None, None) if state is None else state
        x, conv_state = ops.causal_conv1d(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
            initial_states=conv_state, return_final_states=True,
        )
        dt, B, C = self._delta_b_c(x)
        y, ssm_state = self._scan(x, z, dt, B, C, initial_state=ssm_state, return_last_state=True)
        return y, (conv_state, ssm_state)

    def _delta_b_c(self, x):
        """Conv output x (batch, d_inner, length) -> Δ before bias (batch, d_inner, length)
        and B, C (batch, d_state, length), as views of channel-major memory (mamba-ssm's
        ``x_proj(rearrange(x, "b d l -> (b l) d"))`` without the copy)."""
        batch, _, length = x.shape
        x_dbl = self.x_proj.weight @ channel_major(x)  # (r + 2n, batch * length)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=0)
        return [t.view(-1, batch, length).transpose(0, 1)
                for t in (self.dt_proj.weight @ dt, B, C)]

    def _scan(self, x, z, dt, B, C, **state_args):
        A = -torch.exp(self.A_log.float())
        return ops.selective_scan(
            x, dt, A, B, C, self.D.float(),
            z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True, **state_args,
        )

    @torch.no_grad()
    def _record_delta(self, dt, valid, length):
        # Mean step size Δ over valid frames: a cheap health signal logged by the criterion
        # (collapsing Δ means the layer stopped reading its input; exploding Δ, it forgets at once).
        if not self.training or length == 0:
            self.last_delta_mean = None
            return
        delta = F.softplus(dt.float() + self.dt_proj.bias.float()[:, None]).mean(1)  # (batch, length)
        self.last_delta_mean = delta.mean() if valid is None else delta[valid].mean()


class Mamba(nn.Module):
    """Mamba mixer with shared in/out projections over one or two scan directions.

    ``directions=("forward",)`` is the causal Mamba of Gu & Dao; ``("forward", "backward")`` is
    Vim's bidirectional "v2" block (shared projections and gate, a conv and SSM per direction,
    outputs averaged before the out projection). Input/output: (batch, length, d_model).
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto",
                 directions: Sequence[str] = ("forward",), bias=False, conv_bias=True):
        super().__init__()
        unknown = set(directions) - {"forward", "backward"}
        if unknown or not directions:
            raise ValueError(f"directions={tuple(directions)!r}; use 'forward' and/or 'backward'")
        self.d_model, self.d_inner = d_model, int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.directions = tuple(directions)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.ssms = nn.ModuleList(  # one per entry of self.directions
            SelectiveSSM(self.d_inner, d_state, d_conv, self.dt_rank, conv_bias=conv_bias)
            for _ in self.directions
        )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """hidden: (batch, length, d_model); padding_mask: (batch, length) bool, True = pad."""
        if hidden.shape[1] == 0:  # nothing to mix; conv kernels refuse empty inputs
            return hidden.new_zeros(hidden.shape[0], 0, self.d_model)
        fused = ops.kernel_for("mamba_inner", hidden) if self.directions == ("forward",) else None
        if fused is not None:
            return self._fused_forward(fused, self._in_proj(hidden, padding_mask)[0])
        return linear_from_channels(self.mix(hidden, padding_mask), self.out_proj.weight,
                                    self.out_proj.bias)

    def mix(self, hidden: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Everything before out_proj: (batch, length >= 1, d_model) -> the directions' mean
        (batch, d_inner, length)."""
        batch, length, _ = hidden.shape
        lengths = lengths_from_padding_mask(padding_mask, batch, length, hidden.device)
        valid = None if padding_mask is None else ~padding_mask
        x, z = self._in_proj(hidden, padding_mask, chunks=2)  # (batch, d_inner, length) each
        y = 0
        for direction, ssm in zip(self.directions, self.ssms):
            if direction == "forward":
                y = y + ssm(x, z, valid)
            else:
                x_rev, z_rev = (reverse_within_lengths(t, lengths, dim=2) for t in (x, z))
                y = y + reverse_within_lengths(ssm(x_rev, z_rev, valid), lengths, dim=2)
        return y / len(self.ssms)

    def _in_proj(self, hidden, padding_mask, chunks=1):
        if padding_mask is not None:  # padded inputs zeroed: garbage cannot leak via 0 * x
            hidden = hidden.masked_fill(padding_mask[..., None], 0.0)
        return linear_to_channels(self.in_proj, hidden, chunks)

    def forward_chunk(self, hidden: torch.Tensor, state=None):
        """Streaming step of a causal mixer: the next frames of ``forward`` on the whole stream.

        hidden: (batch, length >= 1, d_model), no padding; state: None at the start, else the
        state returned for the previous chunk (see ``SelectiveSSM.forward_chunk``).
        Returns (out (batch, length, d_model), new state).
        """
        if self.directions != ("forward",):
            raise ValueError(
                f"Mamba(directions={self.directions}) reads the future, so it cannot continue a "
                "stream chunk by chunk; only the causal mixer (bimamba_type=none) can")
        x, z = linear_to_channels(self.in_proj, hidden, chunks=2)
        y, state = self.ssms[0].forward_chunk(x, z, state)
        return linear_from_channels(y, self.out_proj.weight, self.out_proj.bias), state

    def forward_long(self, hidden: torch.Tensor, chunk: int, reverse: bool = False):
        """``forward(hidden)`` for one long unpadded sequence, ``chunk`` frames at a time.

        Each direction is one sweep over the chunks carrying its conv and SSM state (the
        backward one from the last chunk to the first), so besides the (batch, length, d_model)
        output only a (batch, d_inner, length) sum of the directions is held. ``reverse=True``
        gives rev(forward(rev(hidden))) without materialising the reversed sequence.
        """
        batch, length, _ = hidden.shape
        spans = time_chunks(length, chunk)
        y = hidden.new_zeros(batch, self.d_inner, length)
        for direction, ssm in zip(self.directions, self.ssms):
            backwards = (direction == "backward") != reverse
            state = None
            for span in (reversed(spans) if backwards else spans):
                h = hidden[:, span].flip(1) if backwards else hidden[:, span]
                x, z = linear_to_channels(self.in_proj, h, chunks=2)
                y_span, state = ssm.forward_chunk(x, z, state)
                y[..., span] += y_span.flip(-1) if backwards else y_span
        out = hidden.new_empty(batch, length, self.d_model)
        for span in spans:
            out[:, span] = self.out_proj((y[..., span] / len(self.ssms)).transpose(1, 2))
        return out

    def _fused_forward(self, mamba_inner_fn, xz):
        # mamba-ssm's fused conv+scan+out_proj kernel covers the one-direction case; its padding
        # needs no care because padding is at the end and the kernel is causal.
        ssm = self.ssms[0]
        ssm.last_delta_mean = None  # not observable inside the fused kernel
        out = mamba_inner_fn(
            xz, ssm.conv1d.weight, ssm.conv1d.bias, ssm.x_proj.weight, ssm.dt_proj.weight,
            self.out_proj.weight, self.out_proj.bias, -torch.exp(ssm.A_log.float()), None, None,
            ssm.D.float(), delta_bias=ssm.dt_proj.bias.float(), delta_softplus=True,
        )
        return out  # (batch, length, d_model)


class ExternalBiMamba(nn.Module):
    """Two independent causal Mambas, one reading each sequence backwards (the paper's ExtBiMamba).

    merge="concat": concatenate both outputs and project back with a Linear (as the authors);
    merge="sum": add them. Input/output: (batch, length, d_model).
    """

    fold_out_proj = True  # Mamba.mix gives what comes before out_proj (see _merged_forward)

    def __init__(self, d_model, merge="concat", **mamba_kwargs):
        super().__init__()
        if merge not in ("concat", "sum"):
            raise ValueError(f"bimamba_merge={merge!r}; use 'concat' or 'sum'")
        self.forward_mamba = Mamba(d_model, directions=("forward",), **mamba_kwargs)
        self.backward_mamba = Mamba(d_model, directions=("forward",), **mamba_kwargs)
        self.merge = nn.Linear(2 * d_model, d_model) if merge == "concat" else None

    def forward(self, hidden: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        batch, length, _ = hidden.shape
        lengths = lengths_from_padding_mask(padding_mask, batch, length, hidden.device)
        reversed_hidden = reverse_within_lengths(hidden, lengths, dim=1)
        if (self.fold_out_proj and self.merge is not None
                and batch * length > self.forward_mamba.d_inner
                and ops.kernel_for("mamba_inner", hidden) is None):
            return self._merged_forward(hidden, reversed_hidden, padding_mask, lengths)
        y_fwd = self.forward_mamba(hidden, padding_mask)
        y_bwd = reverse_within_lengths(self.backward_mamba(reversed_hidden, padding_mask),
                                       lengths, dim=1)
        if self.merge is None:
            return y_fwd + y_bwd
        return self.merge(torch.cat([y_fwd, y_bwd], dim=-1))

    def _merged_forward(self, hidden, reversed_hidden, padding_mask, lengths):
        """merge(cat(out_f, out_b)) with each Mamba's out_proj folded into its half of the
        merge: merge_f (W_of y_f + b_of) = (merge_f W_of) y_f + merge_f b_of. The same
        function and gradients (autograd runs through the folded weights). Per direction it
        costs d_model^2 d_inner multiply-adds to fold and saves d_model^2 per frame (the
        merge's matmul), hence taken only when the batch has more frames than d_inner."""
        out, bias = [], self.merge.bias
        halves = self.merge.weight.chunk(2, dim=1)
        for mamba, half, x in zip((self.forward_mamba, self.backward_mamba), halves,
                                  (hidden, reversed_hidden)):
            out.append(linear_from_channels(mamba.mix(x, padding_mask),
                                            half @ mamba.out_proj.weight))
            if mamba.out_proj.bias is not None:
                bias = bias + half @ mamba.out_proj.bias
        return (out[0] + reverse_within_lengths(out[1], lengths, dim=1)) + bias

    def forward_long(self, hidden: torch.Tensor, chunk: int):
        """``forward(hidden)`` for one long unpadded sequence in ``chunk``-frame sweeps."""
        y_fwd = self.forward_mamba.forward_long(hidden, chunk)
        y_bwd = self.backward_mamba.forward_long(hidden, chunk, reverse=True)
        if self.merge is None:
            return y_fwd.add_(y_bwd)
        for span in time_chunks(hidden.shape[1], chunk):  # y_fwd becomes the output, in place
            y_fwd[:, span] = self.merge(torch.cat([y_fwd[:, span], y_bwd[:, span]], dim=-1))
        return y_fwd
