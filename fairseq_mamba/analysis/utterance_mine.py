"""The seed paper's MI procedure: MINE (Donsker-Varadhan) per utterance, averaged over utterances.

``estimate_mi(x, y, method="mine_utterance", groups=utterance_ids, ...)`` (registered in
:mod:`.mutual_information`), used by ``layer_mi --targets input`` with x = layer k and y = layer
0 (the encoder input). For every utterance (the frames with one ``groups`` id; padded frames
were dropped before) a FRESH critic (:class:`.neural_mi.SeparableCritic`, initialised from the
seed, so every layer of a model starts from the same critics: paired comparisons) is trained
by full-batch Adam for ``steps`` steps on the DV objective with MINE's moving-average gradient
correction, on that utterance's frames only (z-scored per utterance, optionally PCA-reduced);
the utterance's estimate is the DV bound of the trained critic on those same frames
(``held_out=0``, as the paper: in-sample) or on a random ``held_out`` fraction of them that it
never trained on. The estimate is the mean over utterances (``max_utterances`` of them, chosen
by the seed when there are more).

What it can and cannot show (``python -m fairseq_mamba.analysis.validate_estimators
--kinds utterance``): the sample is one utterance, N ~ 100-500 frames, so a distribution-free
lower bound cannot certify more than ~log N ~ 5-6 nats (McAllester & Stratos 2020) and the
critic has a few hundred samples for a 2 x d-dimensional function. In-sample (the paper's way)
the bound is also an over-fitting score: a critic that memorises the pairs raises it without
any dependence in the data, so it reads well above 0 at independence and grows with ``steps``
and critic size; two layers compare fairly only with equal N, critic and steps. Differences
between layers of ~ the null's size mean nothing.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .neural_mi import SeparableCritic, _offdiag_logmeanexp, bound

MIN_FRAMES = 8  # utterances with fewer valid frames are left out (no critic can be fitted)


def utterance_dv(x: Tensor, y: Tensor, generator: torch.Generator, steps: int = 100, hidden: int = 32,
                 embed: int = 16, lr: float = 1e-3, held_out: float = 0.0, ema_alpha: float = 0.01) -> float:
    """DV bound (nats) of a fresh critic trained on one utterance's frames. x: (n, dx), y: (n, dy) float,
    standardised; the critic trains on all n frames (held_out=0) or on a random 1 - held_out of them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        critic = SeparableCritic(x.shape[1], y.shape[1], None, hidden, embed)
    fit = test = torch.arange(x.shape[0])
    if held_out > 0:
        perm = torch.randperm(x.shape[0], generator=generator)
        n_test = max(2, int(round(held_out * x.shape[0])))
        test, fit = perm[:n_test], perm[n_test:]
    opt = torch.optim.Adam(critic.parameters(), lr=lr)
    log_ema: Optional[Tensor] = None
    for _ in range(steps):
        fx, gy = critic.embed(x[fit], y[fit])
        lme = _offdiag_logmeanexp(fx, gy)
        cur = lme.detach()
        log_ema = cur if log_ema is None else torch.logaddexp(log_ema + math.log1p(-ema_alpha),
                                                              cur + math.log(ema_alpha))
        loss = -(fx * gy).sum(1).mean() + torch.exp(lme - log_ema)  # MINE's bias-corrected DV gradient
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return bound("dv", *critic.embed(x[test], y[test]))


def mine_utterance(x: Tensor, y: Tensor, gen: torch.Generator, groups: Optional[Tensor] = None,
                   pca: Optional[int] = 8, max_utterances: Optional[int] = 10, **train_options
                   ) -> Tuple[float, int, int, Optional[float]]:
    """The :mod:`.mutual_information` method ``mine_utterance``: (mean per-utterance DV bound,
    frames used, frames the bounds were evaluated on, None). x: (N, dx), y: (N, dy) float;
    groups: (N,) utterance ids (required)."""
    from .mutual_information import pca_reduce

    if groups is None or groups.shape != (x.shape[0],) or groups.is_floating_point():
        raise ValueError("mine_utterance needs groups: (N,) integer utterance ids, one per frame")
    if not y.is_floating_point():
        raise ValueError("mine_utterance takes continuous y (N, dy) only")
    ids, counts = torch.unique(groups, return_counts=True)
    ids = ids[counts >= MIN_FRAMES]
    if not len(ids):
        raise ValueError(f"mine_utterance: no utterance has >= {MIN_FRAMES} frames")
    if max_utterances is not None and len(ids) > max_utterances:
        ids = ids[torch.randperm(len(ids), generator=gen)[:max_utterances]].sort().values
    seed = int(torch.randint(2**62, (1,), generator=gen))
    values, n_used, n_eval = [], 0, 0
    for u in ids:
        rows = (groups == u).nonzero()[:, 0]
        xu, = pca_reduce(x[rows].float(), pca=pca)
        yu, = pca_reduce(y[rows].float(), pca=pca)
        # the same critic seed for utterance u in every call: layers are compared with equal critics
        values.append(utterance_dv(xu, yu, torch.Generator().manual_seed(seed + int(u)), **train_options))
        held = train_options.get("held_out", 0.0)
        n_used += len(rows)
        n_eval += max(2, int(round(held * len(rows)))) if held > 0 else len(rows)
    return float(torch.tensor(values).mean()), n_used, n_eval, None
