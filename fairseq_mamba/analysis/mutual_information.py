"""Mutual-information estimators for layer-wise analysis (arXiv 2409.07273, issue #5).

``estimate_mi(x, y, method, seed, **options) -> MIEstimate`` with x: (N, dx) float and y either
(N, dy) float (continuous) or (N,) long (discrete labels). Values are in nats.

Methods and what each is known to get wrong:

* ``"mine"`` - Donsker-Varadhan bound with MINE's moving-average gradient correction, fresh
  critic per estimate/repeat, held-out evaluation (see :mod:`.neural_mi`). Continuous or
  discrete y. High variance; upward bias of the DV log-mean-exp term at small held-out N;
  needs ~exp(I) samples, so large MI is underestimated by the learnt critic.
* ``"infonce"`` - InfoNCE on the same critic; continuous or discrete y. Can never exceed
  ``log N_heldout`` (returned as ``upper_bound``) and saturates below it when I approaches it.
* ``"ksg"`` - Kraskov-Stoegbauer-Grassberger k-NN estimator (algorithm 1, max-norm), no
  training. Continuous y only. Good in low dimension; strongly *underestimates* in high
  dimension / high MI (k-NN balls become uninformative; 47-94% low in d = 8..32 on 2000
  samples), so treat it as a sanity check there.
* ``"mine_utterance"`` - the seed paper's procedure (:mod:`.utterance_mine`): a DV bound per
  utterance (``groups``), in-sample by default, averaged over utterances. Continuous y only.
  Over-reads at independence (in-sample over-fitting) and cannot certify more than ~log(frames
  per utterance).
* ``"plugin"`` - discrete y only: quantise x with a k-means codebook (fit split), then the
  plug-in MI of the (code, label) histogram on the held-out split with Miller-Madow bias
  correction. Depends on K; biased upward at small N (residual after Miller-Madow: +0.75 nats
  at zero MI with 256 codes, 50 labels and ~4500 held-out samples; +0.14 with 64 codes), and by
  data processing I(code; y) <= I(x; y), i.e. bounded below the truth by the quantiser.
  ``upper_bound`` is the plug-in H(y) (MI of discrete y cannot exceed it).

Frames from padded batches must be trimmed before estimation: use :func:`flatten_frames`. The
layer-wise analysis (:mod:`.layer_mi`) uses InfoNCE on 32 principal components for every target,
chosen by :mod:`.validate_estimators`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .neural_mi import train_and_evaluate
from .utterance_mine import mine_utterance, utterance_dv

MIN_SPLIT = 32  # minimum number of samples on each side of a fit / held-out split


@dataclass
class MIEstimate:
    """One MI estimate in nats.

    value: mean over repeats; std: spread (population std) over repeats; values: per repeat.
    n_fit / n_heldout: samples used to fit (critic or codebook) and to evaluate per repeat
    (``n_fit = 0`` for ksg, which has no fitting). upper_bound: a ceiling the method cannot
    exceed (InfoNCE: log n_heldout; plugin: H(y)), else None.
    """

    value: float
    std: float
    values: Tuple[float, ...]
    method: str
    n_fit: int
    n_heldout: int
    upper_bound: Optional[float] = None
    options: Dict[str, object] = field(default_factory=dict)


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"x and y must be torch tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor of shape (N, dx), got dtype={x.dtype} shape={tuple(x.shape)}")
    if y.is_floating_point():
        if y.dim() != 2:
            raise ValueError(f"continuous y must have shape (N, dy), got shape={tuple(y.shape)}")
    elif y.dtype != torch.long or y.dim() != 1:
        raise ValueError(f"y must be float (N, dy) or long labels (N,), got dtype={y.dtype} shape={tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different N: {x.shape[0]} != {y.shape[0]}")
    for name, t in (("x", x), ("y", y)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name} contains {bad} NaN/Inf values")
    if not y.is_floating_point() and y.numel() and int(y.min()) < 0:
        raise ValueError(f"labels y must be >= 0, got min label {int(y.min())}")


def _split(n: int, held_out: float, gen: torch.Generator, groups: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Random (fit, held-out) index split, a ``held_out`` fraction of the N samples held out.

    groups: optional (N,) ids (e.g. the utterance of each frame); whole groups are then held out
    (as many random groups as come closest to the fraction), so no held-out frame has a
    neighbour from its own utterance in the fit split."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    if groups is None:
        n_test = int(round(held_out * n))
        perm = torch.randperm(n, generator=gen)
        fit, test = perm[n_test:], perm[:n_test]
    else:
        if groups.shape != (n,) or groups.is_floating_point():
            raise ValueError(f"groups must be (N,) integer ids with N={n}, got dtype={groups.dtype} "
                             f"shape={tuple(groups.shape)}")
        _, inverse = torch.unique(groups, return_inverse=True)
        order = torch.randperm(int(inverse.max()) + 1, generator=gen)
        cum = torch.bincount(inverse)[order].cumsum(0)
        n_groups = int((cum - held_out * n).abs().argmin()) + 1
        is_test = torch.isin(inverse, order[:n_groups])
        fit, test = (~is_test).nonzero()[:, 0], is_test.nonzero()[:, 0]
    if min(len(test), len(fit)) < MIN_SPLIT:
        raise ValueError(f"N={n} is too small for held_out={held_out}: each split needs >= {MIN_SPLIT} samples")
    return fit, test


def _standardise(fit: Tensor, *others: Tensor) -> List[Tensor]:
    """Z-score every tensor with the statistics of ``fit`` (N, d); constant columns stay at 0."""
    mean, std = fit.mean(0), fit.std(0).clamp_min(1e-8)
    return [(t - mean) / std for t in (fit, *others)]


def pca_reduce(fit: Tensor, *others: Tensor, pca: Optional[int] = None) -> List[Tensor]:
    """Z-score with ``fit``'s statistics, then (if ``pca`` < d) project every tensor onto the
    top-``pca`` principal axes of the z-scored ``fit`` rows and z-score the projections.

    fit: (N, d), others: (M, d) -> tensors of (., min(pca, d)). The axes come from ``fit`` only,
    so held-out rows never shape the projection."""
    if pca is not None and pca < 1:
        raise ValueError(f"pca must be a number of dimensions >= 1, got {pca}")
    out = _standardise(fit, *others)
    if pca is None or pca >= fit.shape[1]:
        return out
    cov = out[0].T.double() @ out[0].double() / max(1, fit.shape[0] - 1)
    axes = torch.linalg.eigh(cov).eigenvectors[:, -pca:].flip(1).to(fit.dtype)  # (d, pca), largest first
    return _standardise(*(t @ axes for t in out))


def _neural(kind: str) -> Callable:
    def run(x: Tensor, y: Tensor, gen: torch.Generator, held_out: float = 0.3, pca: Optional[int] = None,
            groups: Optional[Tensor] = None, **train_options):
        fit, test = _split(x.shape[0], held_out, gen, groups)
        x_fit, x_test = pca_reduce(x[fit].float(), x[test].float(), pca=pca)
        if y.is_floating_point():
            y_fit, y_test = pca_reduce(y[fit].float(), y[test].float(), pca=pca)
            n_classes = None
        else:
            y_fit, y_test, n_classes = y[fit], y[test], int(y.max()) + 1
        value = train_and_evaluate(kind, x_fit, y_fit, x_test, y_test, n_classes, gen, **train_options)
        upper = math.log(len(test)) if kind == "nce" else None
        return value, len(fit), len(test), upper
    return run


def _digamma(v: np.ndarray) -> np.ndarray:
    return torch.special.digamma(torch.as_tensor(v, dtype=torch.float64)).numpy()


def _chebyshev(a: Tensor) -> Tensor:
    """Max-norm distance matrix of a: (N, d) -> (N, N), rows computed in ~128 MiB chunks."""
    chunk = max(1, 2**25 // (a.shape[0] * a.shape[1]))
    return torch.cat([(a[i:i + chunk, None, :] - a[None, :, :]).abs().amax(-1) for i in range(0, len(a), chunk)])


def _ksg(x: Tensor, y: Tensor, gen: torch.Generator, k: int = 3, n_samples: int = 2000, pca: Optional[int] = None):
    """KSG algorithm 1 on a random subset of ``n_samples`` points (all points if N is smaller).

    eps_i = distance to the k-th neighbour in the joint max-norm; n_x(i), n_y(i) = points
    strictly closer than eps_i in each marginal; I = psi(k) + psi(N) - <psi(n_x+1) + psi(n_y+1)>.
    Inputs are z-scored per dimension first (and reduced to ``pca`` principal components of the
    subset when given). Cost O(N^2 (dx + dy)).
    """
    if not y.is_floating_point():
        raise ValueError("method 'ksg' needs continuous y of shape (N, dy); use 'plugin' or 'mine' for labels")
    if k < 1 or k >= min(n_samples, x.shape[0]):
        raise ValueError(f"k={k} must be in [1, n_samples)")
    idx = torch.randperm(x.shape[0], generator=gen)[:n_samples]
    xs, ys = pca_reduce(x[idx].float(), pca=pca)[0], pca_reduce(y[idx].float(), pca=pca)[0]
    dx, dy = _chebyshev(xs), _chebyshev(ys)
    dxy = torch.maximum(dx, dy)
    dxy.fill_diagonal_(float("inf"))
    eps = dxy.kthvalue(k, dim=1).values[:, None]
    nx = (dx < eps).sum(1) - 1
    ny = (dy < eps).sum(1) - 1
    n = len(idx)
    value = _digamma(np.array(k)) + _digamma(np.array(n)) - (_digamma(nx.numpy() + 1) + _digamma(ny.numpy() + 1)).mean()
    return float(value), 0, n, None


def entropy_miller_madow(counts: np.ndarray) -> float:
    """Plug-in entropy (nats) of a histogram with the Miller-Madow correction (m - 1) / (2N)."""
    counts = counts[counts > 0]
    n = counts.sum()
    p = counts / n
    return float(-(p * np.log(p)).sum() + (len(counts) - 1) / (2 * n))


def _plugin(x: Tensor, y: Tensor, gen: torch.Generator, held_out: float = 0.5, n_codes: int = 128,
            batch_size: int = 2048, pca: Optional[int] = None, groups: Optional[Tensor] = None):
    """k-means codebook (MiniBatchKMeans, ``n_codes``) fit on the fit split (optionally on its
    ``pca`` principal components); Miller-Madow plug-in I(code; y) = H(code) + H(y) - H(code, y)
    on the held-out split."""
    from sklearn.cluster import MiniBatchKMeans

    if y.is_floating_point():
        raise ValueError("method 'plugin' needs discrete labels y of shape (N,) long")
    fit, test = _split(x.shape[0], held_out, gen, groups)
    if n_codes < 2 or n_codes > len(fit):
        raise ValueError(f"n_codes={n_codes} must be in [2, n_fit={len(fit)}]")
    x_fit, x_test = (t.double().numpy() for t in pca_reduce(x[fit].double(), x[test].double(), pca=pca))
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    km = MiniBatchKMeans(n_clusters=n_codes, batch_size=batch_size, n_init=3, random_state=seed).fit(x_fit)
    codes, labels = km.predict(x_test), y[test].numpy()
    n_y = int(y.max()) + 1
    joint = np.bincount(codes * n_y + labels, minlength=n_codes * n_y).reshape(n_codes, n_y)
    h_y = entropy_miller_madow(joint.sum(0))
    value = entropy_miller_madow(joint.sum(1)) + h_y - entropy_miller_madow(joint.ravel())
    return value, len(fit), len(test), h_y


METHODS: Dict[str, Callable] = {"mine": _neural("dv"), "infonce": _neural("nce"), "ksg": _ksg, "plugin": _plugin,
                                "mine_utterance": mine_utterance}


def estimate_mi(x: Tensor, y: Tensor, method: str = "mine", seed: int = 0, repeats: int = 1,
                **options) -> MIEstimate:
    """Estimate I(x; y) in nats. x: (N, dx) float; y: (N, dy) float or (N,) long labels.

    Each repeat r draws its own split / subset and (for neural methods) a fresh critic from
    ``seed`` and r only, so equal seeds give equal results regardless of earlier calls or the
    global RNG. ``options`` go to the method (held_out, hidden, embed, batch_size, lr,
    max_steps, ... for mine/infonce; k, n_samples for ksg; held_out, n_codes for plugin;
    ``pca``: reduce continuous x and y to that many principal components, fitted on the fit
    split, for every method; ``groups``: (N,) ids such as utterance numbers, for mine, infonce
    and plugin: whole groups are held out, so correlated neighbours never straddle the split).
    Raises ValueError for bad inputs, unknown methods and unknown options.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    _check_inputs(x, y)
    fn = METHODS[method]
    allowed = set(inspect.signature(fn).parameters) - {"x", "y", "gen", "train_options"}
    if method in ("mine", "infonce"):
        allowed |= set(inspect.signature(train_and_evaluate).parameters) - {
            "kind", "x_fit", "y_fit", "x_test", "y_test", "n_classes", "generator"}
    if method == "mine_utterance":
        allowed |= set(inspect.signature(utterance_dv).parameters) - {"x", "y", "generator"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; allowed: {sorted(allowed)}")
    x, y = x.detach().cpu(), y.detach().cpu()
    results = [fn(x, y, torch.Generator().manual_seed(seed * 1_000_003 + r), **options) for r in range(repeats)]
    values = tuple(r[0] for r in results)
    _, n_fit, n_heldout, upper = results[0]
    return MIEstimate(value=float(np.mean(values)), std=float(np.std(values)), values=values, method=method,
                      n_fit=n_fit, n_heldout=n_heldout, upper_bound=upper, options=dict(options, repeats=repeats))


def mi_profile(layers: Sequence[Tensor], reference: Union[int, Tensor], method: str = "mine", seed: int = 0,
               **options) -> List[MIEstimate]:
    """One estimate of I(layers[k]; reference) per layer.

    layers: sequence of (N, d_k) float tensors (frames aligned across layers); reference: an
    int index into ``layers``, an (N, d) float tensor, or (N,) long targets. Every layer uses the
    same ``seed`` - hence the same splits - with a fresh critic, so differences between layers
    are paired comparisons. Against another layer of the same network itself (the paper's
    MI with layer 0) the true MI is near-infinite and every estimate sits at its method's ceiling;
    the layer-wise analysis uses layer 0's k-means code instead (:mod:`.reconstruction`).
    """
    if isinstance(reference, int):
        if not -len(layers) <= reference < len(layers):
            raise ValueError(f"reference index {reference} out of range for {len(layers)} layers")
        reference = layers[reference]
    return [estimate_mi(h, reference, method=method, seed=seed, **options) for h in layers]


def flatten_frames(hidden: Tensor, padding_mask: Optional[Tensor] = None, max_frames: Optional[int] = None,
                   seed: int = 0) -> Tensor:
    """(B, T, ...) per-frame tensor -> (N, ...) real frames; padding_mask (B, T), True = pad, dropped.

    Works for hidden states (B, T, D) and frame targets (B, T) alike. With ``max_frames`` a
    seeded random subset (kept in order) is returned; the subset depends only on N, the mask
    and ``seed``, so equal arguments keep rows aligned across layers and targets.
    """
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (B, T, ...), got shape={tuple(hidden.shape)}")
    if padding_mask is not None and padding_mask.shape != hidden.shape[:2]:
        raise ValueError(f"padding_mask shape {tuple(padding_mask.shape)} != (B, T) {tuple(hidden.shape[:2])}")
    frames = hidden.flatten(0, 1) if padding_mask is None else hidden[~padding_mask.bool()]
    if max_frames is not None and frames.shape[0] > max_frames:
        keep = torch.randperm(frames.shape[0], generator=torch.Generator().manual_seed(seed))[:max_frames]
        frames = frames[keep.sort().values]
    return frames
