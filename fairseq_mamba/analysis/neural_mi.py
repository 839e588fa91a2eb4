"""Neural (variational) mutual-information lower bounds: MINE (Donsker-Varadhan) and InfoNCE.

Both share one separable critic ``T(x, y) = f(x) . g(y)`` (Poole et al., 2019): ``f`` and ``g``
are small MLPs (``g`` is an embedding table, i.e. a linear map of the one-hot code, when
``y`` is discrete). Separable critics score every (x_i, y_j) pair of a batch with one matrix
product, so the "shuffled" (product-of-marginals) pairs are *all* off-diagonal pairs of the
batch - every shuffle of y at once - instead of one random permutation; this lowers the
variance of the marginal term at no cost.

Protocol per estimate (and per repeat): a FRESH critic is initialised from ``seed``; it is
trained on the fit split, early-stopped on a validation slice of the fit split, and the bound
is evaluated once on the held-out split, which the critic never saw. The reported value is
therefore an honest held-out estimate of the bound for the learnt critic (no selection on the
numbers that are reported).

Known failure modes (see Belghazi et al. 2018; Poole et al. 2019; McAllester & Stratos 2020):

* MINE / DV: high variance, and an *upward* bias at small held-out N, because
  ``log mean exp T`` over marginal pairs is a concave function of a noisy mean (Jensen); the
  held-out evaluation removes over-fitting but not that bias. Large MI (>~ 5 nats) needs
  exponentially many samples (``exp(I)`` pairs) to be estimated at all.
* Both: the learnt critic under-fits / over-fits. Seen on correlated Gaussians with N=2e4:
  ~5% low at (0.5 nats, d=8), ~15% low at (2 nats, d=32), and ~0 instead of 5 nats at
  d=256 (a d x d interaction needs N >> d^2 samples): reduce dimension (e.g. PCA) first. At
  the layer-MI analysis's N=9085 (``python -m fairseq_mamba.analysis.validate_estimators``):
  InfoNCE 4-8% low in d=8, 10-28% low in d=16, 22-82% low when the MI is spread evenly over
  d=32, 16-67% low for 128-d pairs mixed from a 16-d latent, 8-61% low for 50-72 overlapping
  classes (the larger errors at the smaller MI); ~0 (|I| < 0.01) at independence.
* MINE / DV at large MI: 25-52% low at 5 nats (N=9085), where InfoNCE is 7-16% low.
* InfoNCE: a lower bound that can never exceed ``log B`` (B = number of held-out samples the
  bound is evaluated on); it is accurate only while ``I << log B`` and saturates below it.
  No estimator does better there: a distribution-free high-confidence lower bound on MI from
  N samples cannot exceed O(log N) (McAllester & Stratos 2020).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


# Output layers start at this fraction of PyTorch's default init: scores ~0, so the bound starts
# at ~0 instead of at the negative Jensen gap of random scores (-0.1 to -0.25 nats were seen at
# zero MI), and a critic that learns nothing reports ~0, not a negative number.
INIT_SCALE = 0.1


class SeparableCritic(nn.Module):
    """``T(x, y) = f(x) . g(y) / sqrt(embed) + a(x) + b(y)``.

    x: (N, dx) float; y: (N, dy) float or (N,) long in [0, n_classes). ``a`` and ``b`` are
    extra scalar outputs of ``f`` and ``g``: marginal terms the log-density ratio needs (for a
    Gaussian, -c |x|^2) and which a pure dot product learns only through slow products of
    small weights. The 1/sqrt(embed) and the small output layers (``INIT_SCALE``) keep initial
    scores near 0; large random initial scores make the log-mean-exp term explode.
    """

    def __init__(self, dx: int, dy: Optional[int], n_classes: Optional[int], hidden: int, embed: int):
        super().__init__()
        self.f = _mlp(dx, hidden, embed + 1)
        self.g = nn.Embedding(n_classes, embed + 1) if dy is None else _mlp(dy, hidden, embed + 1)
        self.scale = embed ** -0.5
        with torch.no_grad():
            for net in (self.f, self.g):
                layers = [net] if isinstance(net, nn.Embedding) else [net.linear] + ([net.mlp[-1]] if net.mlp else [])
                for layer in layers:
                    layer.weight.mul_(INIT_SCALE)

    def embed(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        """Returns fx, gy: (N, embed + 2) each, with ``fx @ gy.T`` = the (N, N) score matrix T(x_i, y_j)."""
        fx, gy = self.f(x), self.g(y)
        one = torch.ones_like(fx[:, :1])
        return (torch.cat([fx[:, :-1] * self.scale, fx[:, -1:], one], 1),
                torch.cat([gy[:, :-1], one, gy[:, -1:]], 1))


class _mlp(nn.Module):
    """Linear map of [x, x^2 - 1] plus a one-hidden-layer SiLU MLP of x: (N, d_in) -> (N, d_out).

    With standardised inputs the squared features let the linear path represent any
    second-order (e.g. Gaussian) log-density ratio exactly; the MLP models what is left.
    ``hidden=0`` drops the MLP (a quadratic critic: fewer parameters, less over-fitting)."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(2 * d_in, d_out)
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out)) if hidden else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(torch.cat([x, x * x - 1], dim=1))
        return out if self.mlp is None else out + self.mlp(x)


def _offdiag_logmeanexp(fx: Tensor, gy: Tensor, chunk: int = 2048) -> Tensor:
    """log of the mean of exp(fx_i . gy_j) over all i != j; fx, gy: (N, e). Chunked over rows."""
    n = fx.shape[0]
    row_lse = []
    for start in range(0, n, chunk):
        s = fx[start:start + chunk] @ gy.T
        idx = torch.arange(s.shape[0])
        s[idx, idx + start] = float("-inf")
        row_lse.append(torch.logsumexp(s, dim=1))
    return torch.logsumexp(torch.cat(row_lse), dim=0) - math.log(n * (n - 1))


def _nce_rows(fx: Tensor, gy: Tensor, chunk: int = 2048) -> Tensor:
    """Per-row InfoNCE terms ``s_ii - logsumexp_j s_ij``, shape (N,). Chunked over rows."""
    out = []
    for start in range(0, fx.shape[0], chunk):
        s = fx[start:start + chunk] @ gy.T
        idx = torch.arange(s.shape[0])
        out.append(s[idx, idx + start] - torch.logsumexp(s, dim=1))
    return torch.cat(out)


def bound(kind: str, fx: Tensor, gy: Tensor) -> float:
    """Evaluate the bound (nats) on embedded pairs fx, gy: (N, e).

    ``dv``: mean_i s_ii - log mean_{i!=j} exp(s_ij). ``nce``: mean_i [s_ii - lse_j s_ij] + log N (<= log N).
    """
    if kind == "dv":
        return float((fx * gy).sum(1).mean() - _offdiag_logmeanexp(fx, gy))
    return float(_nce_rows(fx, gy).mean() + math.log(fx.shape[0]))


def train_and_evaluate(
    kind: str,
    x_fit: Tensor, y_fit: Tensor, x_test: Tensor, y_test: Tensor,
    n_classes: Optional[int], generator: torch.Generator,
    hidden: int = 128, embed: int = 128, batch_size: int = 512, lr: float = 1e-3,
    weight_decay: float = 0.0, max_steps: int = 1000, eval_every: int = 50, patience: int = 4,
    val_fraction: float = 0.2, ema_alpha: float = 0.01,
) -> float:
    """Train a fresh critic for ``kind`` in {"dv", "nce"} and return its bound on the test split.

    x_*: (N, dx) float, already standardised; y_*: (N, dy) float (standardised) or (N,) long.
    A ``val_fraction`` slice of the fit split is used for early stopping only (best-state
    restore after ``patience`` evaluations without improvement; the initial critic counts). For ``dv`` the training loss
    uses MINE's bias-corrected gradient: the gradient of ``log mean exp T_marg`` is
    ``grad(mean exp T_marg) / EMA(mean exp T_marg)`` (EMA rate ``ema_alpha``, kept in log space).
    The critic is initialised from ``generator``, so results do not depend on global RNG state.
    """
    n_val = max(2, int(round(val_fraction * x_fit.shape[0])))
    perm = torch.randperm(x_fit.shape[0], generator=generator)
    val, tr = perm[:n_val], perm[n_val:]
    x_val, y_val, x_tr, y_tr = x_fit[val], y_fit[val], x_fit[tr], y_fit[tr]
    batch_size = min(batch_size, x_tr.shape[0])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        critic = SeparableCritic(x_fit.shape[1], None if n_classes else y_fit.shape[1], n_classes,
                                 hidden, embed)
    opt = torch.optim.Adam(critic.parameters(), lr=lr, weight_decay=weight_decay)
    log_ema: Optional[Tensor] = None
    with torch.no_grad():  # the near-constant initial critic (bound ~ 0) is a candidate too
        best, best_state, stale = bound(kind, *critic.embed(x_val, y_val)), copy.deepcopy(critic.state_dict()), 0
    for step in range(1, max_steps + 1):
        idx = torch.randint(x_tr.shape[0], (batch_size,), generator=generator)
        fx, gy = critic.embed(x_tr[idx], y_tr[idx])
        if kind == "dv":
            lme = _offdiag_logmeanexp(fx, gy)
            cur = lme.detach()
            log_ema = cur if log_ema is None else torch.logaddexp(
                log_ema + math.log1p(-ema_alpha), cur + math.log(ema_alpha))
            loss = -(fx * gy).sum(1).mean() + torch.exp(lme - log_ema)
        else:
            loss = -_nce_rows(fx, gy).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == max_steps:
            with torch.no_grad():
                score = bound(kind, *critic.embed(x_val, y_val))
            if score > best:
                best, best_state, stale = score, copy.deepcopy(critic.state_dict()), 0
            else:
                stale += 1
                if stale >= patience:
                    break
    critic.load_state_dict(best_state)
    with torch.no_grad():
        return bound(kind, *critic.embed(x_test, y_test))


__all__ = ["SeparableCritic", "bound", "train_and_evaluate"]
