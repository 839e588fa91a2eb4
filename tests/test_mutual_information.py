"""Validation of the MI estimators against closed-form ground truths (issue #5 points 1-2).

Continuous: x, y in R^d with d independent component pairs of correlation rho, so
I = -d/2 log(1 - rho^2). Discrete: well-separated Gaussian clusters x | c, labels y = c
(I = log K) or y = c passed through a symmetric noisy channel (I = log K - H_b(e) - e log(K-1)).
Each assertion is either "within 10% of the truth" or the documented bias of the method.
"""
import math
from functools import lru_cache

import pytest
import torch

from fairseq_mamba.analysis.mutual_information import MIEstimate, estimate_mi, flatten_frames, mi_profile

N_GAUSS = 20000


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The critics are tiny: one intra-op thread is ~5x faster than two on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def gaussian_pair(mi: float, d: int, n: int = N_GAUSS, seed: int = 0):
    """x, y: (n, d) with I(x; y) = mi nats exactly (per-component correlation rho)."""
    g = torch.Generator().manual_seed(seed)
    rho = math.sqrt(1 - math.exp(-2 * mi / d))
    x = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=g)


def clusters(k: int, n: int, flip: float = 0.0, d: int = 16, seed: int = 0):
    """x: (n, d) class-conditional Gaussians 20 sigma apart; y: (n,) labels, y != c with prob ``flip``.

    Returns x, y, the true I(x; y) = I(c; y) (x determines c up to negligible overlap)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(k, (n,), generator=g)
    centres = 20 * torch.randn(k, d, generator=g) / math.sqrt(2)
    x = centres[c] + torch.randn(n, d, generator=g)
    other = (c + torch.randint(1, k, (n,), generator=g)) % k
    y = torch.where(torch.rand(n, generator=g) < flip, other, c)
    h_noise = 0.0 if flip == 0 else -(flip * math.log(flip) + (1 - flip) * math.log(1 - flip))
    return x, y, math.log(k) - h_noise - flip * math.log(k - 1)


# ---------------------------------------------------------------- continuous ground truths
NEURAL = dict(hidden=64, embed=64, max_steps=600)


@pytest.mark.parametrize("mi,d", [(0.5, 8), (2.0, 32)])
@pytest.mark.parametrize("method", ["mine", "infonce"])
def test_neural_recovers_gaussian_mi(method, mi, d):
    est = estimate_mi(*gaussian_pair(mi, d), method=method, **NEURAL)
    # Documented bias: the critic learnt from 14k samples under-fits the tiny x_i^2 terms of
    # the Gaussian log-ratio (the bilinear-only optimum is 11% low), so allow up to 20% low.
    assert 0.8 * mi <= est.value <= 1.1 * mi, est
    if method == "infonce":
        assert est.upper_bound == pytest.approx(math.log(est.n_heldout))
        assert est.value <= est.upper_bound


@pytest.mark.parametrize("method", ["mine", "infonce"])
def test_neural_high_dimension_underestimates(method):
    """(5 nats, d=256): learning a 256x256 bilinear form needs N >> d^2. With N=2e4 the critic
    does not generalise at all (held-out ~0.03 nats seen): a documented failure, asserted as
    its direction only so that a better critic would still pass."""
    est = estimate_mi(*gaussian_pair(5.0, 256), method=method, **NEURAL)
    assert est.value < 5.0, est
    assert est.upper_bound is None or est.value <= est.upper_bound


@pytest.mark.parametrize("mi,d", [(0.5, 1), (0.5, 2), (2.0, 2)])
def test_ksg_recovers_low_dimensional_mi(mi, d):
    est = estimate_mi(*gaussian_pair(mi, d), method="ksg", n_samples=4000)
    assert est.value == pytest.approx(mi, rel=0.1), est


@pytest.mark.parametrize("mi,d", [(0.5, 8), (2.0, 32), (5.0, 256)])
def test_ksg_underestimates_in_high_dimension(mi, d):
    est = estimate_mi(*gaussian_pair(mi, d), method="ksg", n_samples=1000)
    assert -0.05 < est.value < 0.8 * mi, est


# ---------------------------------------------------------------- discrete ground truths
@pytest.mark.parametrize("k,flip,n", [(8, 0.0, 8000), (32, 0.0, 8000), (8, 0.2, 20000), (4, 0.3, 8000)])
def test_plugin_recovers_cluster_mi(k, flip, n):
    x, y, true = clusters(k, n, flip)
    est = estimate_mi(x, y, method="plugin", n_codes=64)
    assert est.value == pytest.approx(true, rel=0.1), est
    assert est.upper_bound == pytest.approx(math.log(k), rel=0.02)
    assert est.value <= est.upper_bound + 1e-6


def test_mine_with_discrete_labels():
    x, y, true = clusters(8, 8000)
    est = estimate_mi(x, y, method="mine", **NEURAL)
    assert est.value == pytest.approx(true, rel=0.1), est


# ---------------------------------------------------------------- independence, determinism
def test_independence_gives_zero():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6000, 8, generator=g), torch.randn(6000, 8, generator=g)
    labels = torch.randint(8, (6000,), generator=g)
    assert abs(estimate_mi(x, y, method="mine", **NEURAL).value) < 0.05
    assert abs(estimate_mi(x, y, method="ksg").value) < 0.05
    assert abs(estimate_mi(x, labels, method="plugin", n_codes=64).value) < 0.05


def test_fresh_critic_and_seed_determinism():
    small = dict(hidden=32, embed=32, max_steps=100)
    x, y = gaussian_pair(1.0, 4, n=3000)
    first = estimate_mi(x, y, method="mine", seed=7, **small)
    estimate_mi(*gaussian_pair(2.0, 32, n=3000), method="mine", seed=7, **small)  # trains another critic
    torch.manual_seed(12345)  # global RNG state must not matter
    again = estimate_mi(x, y, method="mine", seed=7, **small)
    assert again.values == first.values
    other = estimate_mi(x, y, method="mine", seed=8, repeats=2, **small)
    assert other.values[0] != first.values[0] and other.values[0] != other.values[1]
    assert other.std > 0 and len(other.values) == 2 and isinstance(other, MIEstimate)


# ---------------------------------------------------------------- helpers and input checks
def test_mi_profile_orders_layers():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3000, 2, generator=g)
    layers = [base, base + 0.3 * torch.randn(3000, 2, generator=g), torch.randn(3000, 2, generator=g)]
    prof = mi_profile(layers, reference=0, method="ksg")
    assert len(prof) == 3 and prof[0].value > prof[1].value > 0.5 > 0.05 > prof[2].value


def test_flatten_frames_drops_padding_and_keeps_alignment():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float).view(2, 3, 2)
    targets = torch.arange(6).view(2, 3)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    assert flatten_frames(hidden, pad).tolist() == [[0, 1], [2, 3], [6, 7]]
    h = flatten_frames(hidden, pad, max_frames=2, seed=1)
    t = flatten_frames(targets, pad, max_frames=2, seed=1)
    assert (h[:, 0] / 2).long().tolist() == t.tolist()


@pytest.mark.parametrize("x,y,method,options,match", [
    (torch.randn(100, 3), torch.randn(99, 3), "mine", {}, "different N"),
    (torch.full((100, 3), float("nan")), torch.randn(100, 3), "mine", {}, "NaN"),
    (torch.randn(60, 3), torch.randn(60, 3), "mine", {}, "too small"),
    (torch.randn(100, 3), torch.randn(100, 3), "mutual", {}, "unknown method 'mutual'"),
    (torch.randn(100, 3), torch.randn(100, 3), "mine", {"hiden": 3}, "hiden"),
    (torch.randn(100, 3), torch.randn(100, 3), "plugin", {}, "discrete labels"),
    (torch.randn(100, 3), torch.randint(3, (100,)), "ksg", {}, "continuous y"),
    (torch.randn(100, 3), torch.randint(3, (100,)).int(), "plugin", {}, "int32"),
])
def test_input_errors(x, y, method, options, match):
    with pytest.raises(ValueError, match=match):
        estimate_mi(x, y, method=method, **options)
