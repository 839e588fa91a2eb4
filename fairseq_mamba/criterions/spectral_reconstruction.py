"""``spectral_reconstruction``: mean squared error between predicted and clean log10-power frames.

Only valid frames count (the model's exact frame padding mask); the loss is summed over bins
and frames and normalised by the number of valid frames (``sample_size``), in log10-power^2
units per frame. Logged besides: the log-spectral distance (LSD, dB) of the prediction and of
the noisy input from the clean target, and their difference ``lsd_gain`` (dB, > 0 = enhanced).
"""
from dataclasses import dataclass

import torch
from torch import Tensor

from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics


def log_spectral_distance(a: Tensor, b: Tensor) -> Tensor:
    """(..., bins) log10 power frames -> (...) LSD in dB: sqrt(mean over bins (10 a - 10 b)^2)."""
    return 10 * (a - b).pow(2).mean(-1).sqrt()


@dataclass
class SpectralReconstructionConfig(FairseqDataclass):
    pass


@register_criterion("spectral_reconstruction", dataclass=SpectralReconstructionConfig)
class SpectralReconstructionCriterion(FairseqCriterion):
    def forward(self, model, sample, reduce=True):
        out = model(**sample["net_input"])
        pred, valid = out["pred"], ~out["padding_mask"]
        with torch.no_grad():
            clean = model.target_frames(sample["clean"], pred.size(1))
            noisy = model.target_frames(sample["net_input"]["source"], pred.size(1))
        loss = (pred - clean).pow(2).sum(-1)[valid].sum()
        frames = int(valid.sum())
        log = {"loss": loss.item(), "ntokens": frames, "nsentences": pred.size(0), "sample_size": frames,
               "lsd_enhanced": log_spectral_distance(pred.detach(), clean)[valid].sum().item(),
               "lsd_noisy": log_spectral_distance(noisy, clean)[valid].sum().item()}
        return loss, frames, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        frames = sum(log.get("sample_size", 0) for log in logging_outputs)
        if not frames:
            return
        sums = {k: sum(log.get(k, 0) for log in logging_outputs) for k in ("loss", "lsd_enhanced", "lsd_noisy")}
        metrics.log_scalar("loss", sums["loss"] / frames, frames, round=4)
        metrics.log_scalar("lsd_enhanced", sums["lsd_enhanced"] / frames, frames, round=3)
        metrics.log_scalar("lsd_noisy", sums["lsd_noisy"] / frames, frames, round=3)
        metrics.log_derived("lsd_gain", lambda m: round(m["lsd_noisy"].avg - m["lsd_enhanced"].avg, 3))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
