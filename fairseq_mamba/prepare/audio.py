"""Any audio soundfile reads -> 16 kHz mono 16-bit FLAC, written atomically.

Channels are averaged (what fairseq's HubertDataset does to a 2-D read). The resampler is
``scipy.signal.resample_poly``: a polyphase FIR (Kaiser window, scipy's default design) at the
exact rational ratio (44100 -> 16000 is up 160, down 441), so no drift in length; it is already in
the environment (``examples/corpus/make_corpus.py`` uses it), needs no new package, and its
anti-aliasing is ample for speech at 16 kHz. (soxr would be faster on hours of audio; not needed
at this scale.) Resampling can overshoot full scale slightly; such samples are clipped to
[-1, 1] and counted.
"""
import os
from dataclasses import dataclass
from math import gcd
from typing import Optional

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

RATE = 16000


@dataclass(frozen=True)
class Converted:
    samples: int  # at RATE
    source_rate: int
    channels: int
    clipped: int  # samples clipped to [-1, 1] after resampling


def resample(x: np.ndarray, rate: int, target: int = RATE) -> np.ndarray:
    """(time,) float at ``rate`` -> (ceil(time * target / rate),) float32 at ``target``."""
    if rate <= 0:
        raise ValueError(f"rate={rate}: must be positive")
    if rate == target:
        return x.astype(np.float32)
    g = gcd(rate, target)
    return resample_poly(x, target // g, rate // g).astype(np.float32)


def convert(src: str, dst: str) -> Converted:
    """Write ``src`` as RATE Hz mono PCM-16 FLAC at ``dst`` (via ``dst.part``, then renamed: a
    ``dst`` that exists is complete). Raises ValueError for audio that cannot be converted."""
    try:
        x, rate = sf.read(src, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile: "Format not recognised", truncated data, ...
        raise ValueError(f"cannot be read as audio ({err})") from err
    if x.shape[0] == 0:
        raise ValueError("has no samples")
    if not np.isfinite(x).all():
        raise ValueError("has NaN/inf samples")
    y = resample(x.mean(axis=1), rate)
    clipped = int((np.abs(y) > 1).sum())
    np.clip(y, -1, 1, out=y)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    part = dst + ".part"
    sf.write(part, y, RATE, format="FLAC", subtype="PCM_16")
    os.replace(part, dst)
    return Converted(len(y), rate, x.shape[1], clipped)


def converted_before(src: str, dst: str) -> Optional[Converted]:
    """The result of an earlier ``convert(src, dst)`` (resuming), or None when there is none."""
    if not os.path.isfile(dst):
        return None
    info = sf.info(src)
    return Converted(sf.info(dst).frames, info.samplerate, info.channels, 0)
