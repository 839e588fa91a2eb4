"""``speech_enhancement``: noisy waveform in, the clean utterance's spectral frames out (issue #14's
reconstruction task, beside the ASR fine-tuning).

Reads the same fairseq manifests as every other stage (``{data}/{split}.tsv``) and mixes each
utterance with generated noise at the stated SNRs (:mod:`fairseq_mamba.tasks.noisy_speech`: white,
pink or babble, deterministic per (``noise_seed``, epoch, utterance)). Splits whose name starts
with ``train`` draw new noise every epoch; every other split (valid, test) is one fixed noisy
set. The model (``hubert_enhancer``) and criterion (``spectral_reconstruction``) turn the
clean waveform into the target frames themselves.
"""
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import List

from omegaconf import MISSING

from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task

from fairseq_mamba.tasks.noisy_speech import NOISE_TYPES, NoisySpeechDataset

logger = logging.getLogger(__name__)


@dataclass
class SpeechEnhancementConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with fairseq manifests {split}.tsv"})
    sample_rate: int = field(default=16000, metadata={"help": "audio must be at this rate"})
    normalize: bool = field(default=True, metadata={
        "help": "standardise each noisy waveform (as hubert_pretraining's normalize); the clean target gets "
                "the same shift and gain"})
    snrs: List[float] = field(default_factory=lambda: [0.0, 5.0, 10.0],
                              metadata={"help": "SNRs in dB; each utterance gets one, drawn uniformly"})
    noise_types: List[str] = field(default_factory=lambda: list(NOISE_TYPES),
                                   metadata={"help": f"noises drawn uniformly per utterance, of {NOISE_TYPES}"})
    noise_seed: int = field(default=1, metadata={"help": "seed of the noise and crops (with epoch, utterance)"})
    max_sample_size: int = field(default=64000, metadata={"help": "crop training batches to this many samples"})
    min_sample_size: int = field(default=4000, metadata={"help": "skip shorter utterances"})


@register_task("speech_enhancement", dataclass=SpeechEnhancementConfig)
class SpeechEnhancementTask(FairseqTask):
    cfg: SpeechEnhancementConfig

    @classmethod
    def setup_task(cls, cfg: SpeechEnhancementConfig, **kwargs):
        return cls(cfg)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"{manifest} does not exist; task.data must hold fairseq manifests "
                                    "(run_scripts/01_manifests.sh writes them)")
        train = split.startswith("train")
        self.datasets[split] = NoisySpeechDataset(
            manifest, self.cfg.sample_rate, self.cfg.snrs, self.cfg.noise_types, self.cfg.noise_seed,
            fixed=not train, normalize=self.cfg.normalize, max_sample_size=self.cfg.max_sample_size,
            min_sample_size=self.cfg.min_sample_size, shuffle=train)
        self.datasets[split].set_epoch(epoch)

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None

    def max_positions(self):
        return sys.maxsize, sys.maxsize
