"""``hubert_enhancer``: the mamba_hubert (or stock hubert) encoder trained to reconstruct clean speech.

The reconstruction-type model of the paper's MI argument (issue #14): the very encoder of the
pre-training configs (conv stack, encoder layers, sizes: the config is ``MambaHubertConfig`` plus
``encoder_type``), built from scratch, plus one Linear from each frame to the clean utterance's
log-power spectrum at that frame. Trained by the ``speech_enhancement`` task with the
``spectral_reconstruction`` criterion.

Target frames: model frame j (conv stack of total stride ``s`` and receptive field ``r``) gets
the ``n_fft``-sample Hann window centred on its own receptive field, samples
``[s*j + (r - n_fft)//2, ... + n_fft)`` (for HuBERT's stack, r = 400 = n_fft: exactly the frame's
samples), as ``log10(|STFT|^2 + POWER_FLOOR)`` over ``n_fft // 2 + 1`` bins. Frames are counted
as the conv stack produces them (floor((L - kernel) / stride) + 1 per layer), for every encoder.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.hubert.hubert import HubertModel

from fairseq_mamba.models.mamba_hubert import MambaHubertConfig, MambaHubertModel

# On standardised waveforms unit white noise has ~150 (21.8 dB) per bin of a 400-sample Hann frame; the
# floor sits 42 dB below that. With 1e-4 the clean recordings' digital silences (14% of the bins at the
# floor) dominated loss and metric, and 120 updates learnt no more than the mean spectrum.
POWER_FLOOR = 1e-2
ENCODERS = {"mamba_hubert": MambaHubertModel, "hubert": HubertModel}


@dataclass
class HubertEnhancerConfig(MambaHubertConfig):
    encoder_type: ChoiceEnum(list(ENCODERS)) = field(
        default="mamba_hubert", metadata={"help": "mamba_hubert: Mamba layers (the Mamba fields apply); "
                                                  "hubert: fairseq's Transformer layers"})
    n_fft: int = field(default=400, metadata={"help": "target window (samples); n_fft // 2 + 1 bins"})
    label_rate: float = field(default=50, metadata={"help": "unused (no labels); HubertModel reads it"})


@register_model("hubert_enhancer", dataclass=HubertEnhancerConfig)
class HubertEnhancerModel(BaseFairseqModel):
    """``encoder_model`` (a MambaHubertModel or HubertModel without its pre-training heads) + ``proj``."""

    def __init__(self, cfg: HubertEnhancerConfig, task_cfg):
        super().__init__()
        if cfg.n_fft < 2:
            raise ValueError(f"model.n_fft={cfg.n_fft} must be >= 2")
        self.encoder_model = ENCODERS[str(cfg.encoder_type)](cfg, task_cfg, [None])
        self.encoder_model.remove_pretraining_modules()
        self.convs = [(kernel, stride) for _, kernel, stride in eval(cfg.conv_feature_layers)]  # noqa: S307
        self.stride = math.prod(s for _, s in self.convs)
        receptive, jump = 1, 1
        for kernel, stride in self.convs:
            receptive, jump = receptive + (kernel - 1) * jump, jump * stride
        self.offset = max(0, (receptive - cfg.n_fft) // 2)
        self.n_fft = cfg.n_fft
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.proj = nn.Linear(cfg.encoder_embed_dim, cfg.n_fft // 2 + 1)

    @classmethod
    def build_model(cls, cfg: HubertEnhancerConfig, task):
        return cls(cfg, task.cfg)

    def frame_lengths(self, samples: Tensor) -> Tensor:
        """(B,) sample counts -> (B,) frame counts, as the conv stack produces them."""
        for kernel, stride in self.convs:
            samples = torch.div(samples - kernel, stride, rounding_mode="floor") + 1
        return samples.clamp(min=0)

    def target_frames(self, wave: Tensor, n_frames: int) -> Tensor:
        """(B, S) waveforms -> (B, n_frames, n_fft // 2 + 1) log10 power, one row per model frame
        (rows whose window runs past S are zero-padded audio: the caller masks them)."""
        need = self.offset + self.stride * (n_frames - 1) + self.n_fft
        wave = nn.functional.pad(wave[:, self.offset:], (0, max(0, need - wave.size(1))))
        spec = torch.stft(wave, self.n_fft, self.stride, window=self.window, center=False, return_complex=True)
        return torch.log10(spec.abs().pow(2) + POWER_FLOOR).transpose(1, 2)[:, :n_frames]

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """source: (B, S) noisy waveforms (padding_mask: (B, S), True = pad) -> {"pred": (B, T, bins)
        predicted clean log10 power, "padding_mask": (B, T) True = pad, exact frame counts}."""
        x, _ = self.encoder_model.extract_features(source, padding_mask=padding_mask, mask=False)
        samples = torch.full((source.size(0),), source.size(1)) if padding_mask is None else (~padding_mask).sum(1)
        frames = torch.arange(x.size(1), device=x.device)
        return {"pred": self.proj(x), "padding_mask": frames[None, :] >= self.frame_lengths(samples)[:, None]}
