"""The layer-0 target of :mod:`.layer_mi`, the paper's "reconstruction" view: layer 0's k-means code.

Why not I(layer k; layer 0) itself: layer k is a near-deterministic function of layer 0, and the
MI between a continuous vector and a deterministic function of it is infinite (or, for a map
that is only almost invertible, far above the log N that any lower bound can show from N
samples). Every estimate then sits at its estimator's ceiling, ~log N for every layer, as the
first version of this analysis did (InfoNCE: 8.1-8.2 nats at all 13 layers of both models).

The quantity used instead: ``c0 = code(layer 0)``, the cell of a ``n_codes``-cell k-means
codebook of layer 0's top ``pca`` principal components (z-scored), fitted once per model on all
analysed frames; the curve is I(layer k; c0), estimated by the same held-out InfoNCE as the
units and phones targets. It is

* finite and bounded: 0 <= I(layer k; c0) <= H(c0) <= log n_codes (H(c0): plug-in with the
  Miller-Madow correction over all frames, ~log 64 = 4.16 nats), well below InfoNCE's log N;
* monotone in what layer k keeps: c0 is a function of layer 0's frame t, and layer k's frame t a
  function of the whole layer-0 sequence, so c0 -> layer 0 -> layer k is a Markov chain given
  the frame and I(layer k; c0) <= I(layer 0; c0) = H(c0), with equality whenever c0 can be
  read back from layer k (any invertible map of layer 0 keeps all of it);
* at k = 0 an estimate of a *known* value, H(c0): how far the k = 0 point falls below H(c0) is
  the estimator's own shortfall on these data, measured in every run.

What it gets wrong: it sees layer 0 only at the resolution of ``n_codes`` cells of its top
``pca`` components, so detail finer than a cell or outside those components counts for nothing,
and a layer that keeps all of c0 reads the same however much finer detail it keeps or loses.
The estimate is a lower bound that under-reads (``python -m fairseq_mamba.analysis.validate_estimators
--kinds coded``): 9-15% low at k = 0 (16-17% on the tiny 12-layer models' layer 0) and ~20% low
for an invertible nonlinear map of layer 0, i.e. 5-12% below the k = 0 point although nothing
was lost; so a layer within ~12% of the k = 0 point may still keep all of c0. Larger drops
(keeping 8 of 32 directions reads 17% of H(c0)) are the signal.

Rejected alternatives (same validation): the plug-in I(code of layer k; c0) over a second k-means
codebook reads 0.3-0.8 nats where the truth is 1.4-4.2, even for layer 0 against itself
(separately fitted codebooks cut the space differently), +0.2 nats at independence, and its
k = 0 point is H(c0) by construction when the same codebook is used; I(layer k; layer 0 +
Gaussian noise) is finite too, but it is a continuous-continuous estimate (20-80% low in 32
dimensions in the validation) and its k = 0 value is not known on real features.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .mutual_information import pca_reduce, entropy_miller_madow

N_CODES = 64  # cells of the layer-0 codebook: H(c0) ~ 4.2 nats, about half of log N_heldout
PCA = 32  # layer 0's principal components the codebook sees (the estimators' reduction too)


def layer0_codes(layer0: Tensor, n_codes: int = N_CODES, pca: Optional[int] = PCA,
                 seed: int = 0) -> Tuple[Tensor, float]:
    """layer0: (N, d) float -> (codes (N,) long in [0, n_codes), H(codes) in nats).

    k-means (scikit-learn's Lloyd, 3 seeded restarts) on the z-scored top-``pca`` principal
    components of ``layer0``; the entropy is the Miller-Madow plug-in over the N codes."""
    from sklearn.cluster import KMeans

    if layer0.dim() != 2 or not layer0.is_floating_point():
        raise ValueError(f"layer0 must be a float tensor (N, d), got dtype={layer0.dtype} shape={tuple(layer0.shape)}")
    if not 2 <= n_codes <= layer0.shape[0] // 10:
        raise ValueError(f"n_codes={n_codes} must be in [2, N/10 = {layer0.shape[0] // 10}] for {layer0.shape[0]} "
                         f"frames (each cell needs frames to estimate with); lower --layer0-codes")
    reduced = pca_reduce(layer0.double(), pca=pca)[0].numpy()
    codes = KMeans(n_codes, n_init=3, random_state=seed).fit_predict(reduced)
    return torch.from_numpy(codes).long(), entropy_miller_madow(np.bincount(codes, minlength=n_codes))


def permuted(codes: Tensor, seed: int = 0) -> Tensor:
    """The codes in a seeded random order: independent of every layer, same histogram (the null)."""
    return codes[torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))]
