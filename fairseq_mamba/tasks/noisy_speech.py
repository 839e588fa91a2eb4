"""Noisy speech for the ``speech_enhancement`` task: a fairseq manifest's utterances mixed with generated noise.

Every utterance gets one noise (``white``, ``pink`` or ``babble``) at one SNR of a stated list,
both drawn from ``np.random.default_rng([seed, epoch, index])``: the same (seed, epoch,
utterance) always gives the same mixture, so a resumed run sees exactly the noise it would have
seen, and valid/test splits (``fixed=True``: epoch 0 always) are one fixed noisy set.

* white: i.i.d. Gaussian samples;
* pink: white noise shaped to a 1/f power spectrum (amplitude 1/sqrt(f) in the FFT);
* babble: the sum of ``BABBLE_TALKERS`` other utterances of the same split, each at unit RMS,
  each tiled to the utterance's length from a random offset.

The noise is scaled so that ``10 log10(P_clean / P_noise)`` = the SNR, both powers over the
whole utterance. With ``normalize``, the mixture is standardised (zero mean, unit variance, as
fairseq's ``normalize: true`` layer-norms a waveform) and the clean target gets the same shift
and gain, so the target stays the clean part of the model's input.
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from fairseq.data.audio.raw_audio_dataset import FileAudioDataset

NOISE_TYPES = ("white", "pink", "babble")
BABBLE_TALKERS = 4
EPS = 1e-5  # as F.layer_norm's


def white(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def babble(n: int, rng: np.random.Generator, others: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of the ``others`` waveforms, each at unit RMS and tiled to n samples from a random offset."""
    out = np.zeros(n)
    for wave in others:
        wave = wave / max(np.sqrt(np.mean(wave ** 2)), EPS)
        start = int(rng.integers(len(wave)))
        out += np.resize(np.roll(wave, -start), n)
    return out


def mix(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """clean + noise scaled to ``snr_db``: (n,) and (n,) -> (n,) float64."""
    p_clean, p_noise = np.mean(clean ** 2), np.mean(noise ** 2)
    return clean + noise * np.sqrt(p_clean / max(p_noise, EPS ** 2) / 10 ** (snr_db / 10))


class NoisySpeechDataset(FileAudioDataset):
    """(noisy, clean) waveform pairs of one manifest split; see the module doc.

    Items: {"id", "source": (S,) noisy, "clean": (S,) clean, "snr": dB, "noise": type}. Batches
    crop every pair to the batch's shortest utterance (at most ``max_sample_size``) at a start
    drawn from the same seeded generator, so a batch has no padding: {"id", "net_input":
    {"source": (B, S)}, "clean": (B, S), "snr": (B,)}."""

    def __init__(self, manifest: str, sample_rate: int, snrs: Sequence[float], noise_types: Sequence[str],
                 seed: int, fixed: bool, normalize: bool, max_sample_size: int, min_sample_size: int,
                 shuffle: bool):
        super().__init__(manifest, sample_rate=sample_rate, max_sample_size=max_sample_size,
                         min_sample_size=min_sample_size, shuffle=shuffle, pad=False, normalize=False)
        bad = [t for t in noise_types if t not in NOISE_TYPES]
        if bad or not noise_types:
            raise ValueError(f"task.noise_types={list(noise_types)}: choose from {NOISE_TYPES}")
        if not snrs:
            raise ValueError("task.snrs is empty: give at least one SNR in dB")
        if "babble" in noise_types and len(self.sizes) <= BABBLE_TALKERS:
            raise ValueError(f"{manifest}: babble noise needs more than {BABBLE_TALKERS} utterances, it has "
                             f"{len(self.sizes)}; drop babble from task.noise_types")
        self.snrs, self.noise_types = [float(s) for s in snrs], list(noise_types)
        self.seed, self.fixed, self.standardise, self.epoch = seed, fixed, normalize, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int, stream: int) -> np.random.Generator:
        """The generator of one utterance's noise (stream 0) or crop (stream 1) in this epoch."""
        return np.random.default_rng([self.seed, 0 if self.fixed else self.epoch, index, stream])

    def clean(self, index: int) -> np.ndarray:
        return super().__getitem__(index)["source"].double().numpy()

    def noisy_pair(self, index: int) -> Tuple[np.ndarray, np.ndarray, float, str]:
        """(noisy, clean, snr, noise type) of one utterance, before standardisation."""
        clean = self.clean(index)
        rng = self.rng(index, 0)
        kind = self.noise_types[int(rng.integers(len(self.noise_types)))]
        snr = self.snrs[int(rng.integers(len(self.snrs)))]
        if kind == "babble":
            pool = np.delete(np.arange(len(self.sizes)), index)
            noise = babble(len(clean), rng, [self.clean(int(j)) for j in rng.choice(pool, BABBLE_TALKERS, False)])
        else:
            noise = {"white": white, "pink": pink}[kind](len(clean), rng)
        return mix(clean, noise, snr), clean, snr, kind

    def __getitem__(self, index: int) -> Dict:
        noisy, clean, snr, kind = self.noisy_pair(index)
        if self.standardise:
            mean, std = noisy.mean(), np.sqrt(noisy.var() + EPS)
            noisy, clean = (noisy - mean) / std, (clean - mean) / std
        return {"id": index, "source": torch.from_numpy(noisy).float(), "clean": torch.from_numpy(clean).float(),
                "snr": snr, "noise": kind}

    def collater(self, samples: List[Dict]) -> Dict:
        if not samples:
            return {}
        size = min(min(len(s["source"]) for s in samples), self.max_sample_size)
        noisy, clean = [], []
        for s in samples:
            start = int(self.rng(s["id"], 1).integers(len(s["source"]) - size + 1))
            noisy.append(s["source"][start:start + size])
            clean.append(s["clean"][start:start + size])
        return {"id": torch.LongTensor([s["id"] for s in samples]), "net_input": {"source": torch.stack(noisy)},
                "clean": torch.stack(clean), "snr": torch.tensor([s["snr"] for s in samples])}


