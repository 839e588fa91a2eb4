"""Validation of the MI estimators against closed-form ground truths (issue #5 points 1-2).

Ground truths: fairseq_mamba.analysis.ground_truth (correlated Gaussians, Gaussians mixed from a
low-dimensional latent, overlapping Gaussian mixtures, noisy well-separated clusters). Each
assertion is either "within 10% of the truth" or the documented bias of the method; the
estimators of the layer_mi command are also checked at that command's sample size.
"""
import math
from functools import lru_cache

import pytest
import torch

from fairseq_mamba.analysis import ground_truth
from fairseq_mamba.analysis.ground_truth import noisy_clusters
from fairseq_mamba.analysis import layer_mi
from fairseq_mamba.analysis.mutual_information import MIEstimate, _split, estimate_mi, flatten_frames, mi_profile
from fairseq_mamba.analysis.reconstruction import layer0_codes, permuted

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
    """x, y: (n, d) with I(x; y) = mi nats exactly (cached: several tests share pairs)."""
    return ground_truth.gaussian_pair(mi, d, n, seed)


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
    x, y, true = noisy_clusters(k, n, flip)
    est = estimate_mi(x, y, method="plugin", n_codes=64)
    assert est.value == pytest.approx(true, rel=0.1), est
    assert est.upper_bound == pytest.approx(math.log(k), rel=0.02)
    assert est.value <= est.upper_bound + 1e-6


def test_mine_with_discrete_labels():
    x, y, true = noisy_clusters(8, 8000)
    est = estimate_mi(x, y, method="mine", **NEURAL)
    assert est.value == pytest.approx(true, rel=0.1), est


# ---------------------------------------------------------------- the layer_mi estimators at its sample size
N_ANALYSIS = 9085  # valid 50 Hz frames of the bundled test split


@pytest.mark.parametrize("case,low", [
    ("gaussian 2 nats d=8", 0.9), ("gaussian 5 nats d=8", 0.9),
    # MI in a 16-d latent mixed into 128 noisy dims (true 1.84 nats): PCA finds it, 22% low seen
    ("mixed 128-d", 0.7),
    # 50 overlapping classes (true 3.29 nats, Monte Carlo): 8% low seen
    ("mixture K=50", 0.85),
])
def test_analysis_estimators_recover_known_mi(case, low):
    """layer_mi.ESTIMATORS on ground truths with as many samples as the analysis has: within the
    bias the README states, and never above the truth (a lower bound)."""
    if case.startswith("gaussian"):
        mi = float(case.split()[1])
        (x, y), true = ground_truth.gaussian_pair(mi, 8, N_ANALYSIS), mi
    elif case == "mixed 128-d":
        x, y, true = ground_truth.mixed_gaussian_pair(2.0, N_ANALYSIS)
    else:
        x, y, true, _ = ground_truth.gaussian_mixture(50, 32, 0.6, N_ANALYSIS)
    method, options = layer_mi.ESTIMATORS["units" if case == "mixture K=50" else "mfcc"]
    est = estimate_mi(x, y, method=method, **options)
    assert low * true <= est.value <= true, (case, true, est)


def test_analysis_estimators_give_zero_for_independence_where_plugin_does_not():
    g = torch.Generator().manual_seed(5)
    x, y, labels = (torch.randn(N_ANALYSIS, 32, generator=g), torch.randn(N_ANALYSIS, 32, generator=g),
                    torch.randint(50, (N_ANALYSIS,), generator=g))
    for target, y_ in (("mfcc", y), ("units", labels)):
        method, options = layer_mi.ESTIMATORS[target]
        assert abs(estimate_mi(x, y_, method=method, **options).value) < 0.02
    # why the plug-in is not used there: 256 codes x 50 labels on ~4500 held-out frames
    assert estimate_mi(x, labels, method="plugin", pca=32, n_codes=256).value > 0.3


def test_grouped_split_holds_out_whole_groups():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, 200, (60,), generator=g)
    groups = torch.repeat_interleave(torch.arange(60) * 7, sizes)  # any integer ids
    fit, test = _split(len(groups), 0.3, torch.Generator().manual_seed(1), groups)
    assert len(fit) + len(test) == len(groups) and not set(groups[fit].tolist()) & set(groups[test].tolist())
    assert abs(len(test) - 0.3 * len(groups)) <= int(sizes.max())
    again = _split(len(groups), 0.3, torch.Generator().manual_seed(1), groups)
    assert torch.equal(again[1], test)
    with pytest.raises(ValueError, match=r"groups must be \(N,\) integer ids"):
        estimate_mi(torch.randn(100, 3), torch.randn(100, 3), groups=torch.zeros(99, dtype=torch.long))


# ---------------------------------------------------------------- the layer0 target: layer 0's code
@pytest.mark.parametrize("noise", [0.3, 1.0])
def test_sign_bit_information_matches_a_histogram_of_draws(noise):
    """The quantised_channel truth per coded coordinate, against the plug-in MI of 2e6 draws of
    (h + noise e, sign h) in 400 bins of y (binning and sampling error ~1e-3 nats)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    y = h + noise * torch.randn(len(h), generator=g, dtype=torch.float64)
    bins = ((y + 6) / 12 * 400).long().clamp(0, 399)
    joint = torch.bincount(bins * 2 + (h > 0).long(), minlength=800).view(400, 2).double() / len(h)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    empirical = float((joint * (joint / outer).log()).nan_to_num().sum())
    assert ground_truth.sign_bit_information(noise) == pytest.approx(empirical, abs=3e-3)
    _, _, code, true = ground_truth.quantised_channel(20000, bits=6, lost=2, noise=noise)
    assert true == pytest.approx(4 * empirical, abs=0.012)
    assert torch.bincount(code).tolist() == pytest.approx([20000 / 64] * 64, rel=0.25)  # 64 equiprobable codes


@pytest.mark.parametrize("case,kw,low", [
    ("invertible map of layer 0", {}, 0.75),  # 20% low seen: all of H = 4.16 nats kept
    ("4 of the 6 coded coordinates discarded", dict(lost=4), 0.72),  # 22% low seen, true 1.39
    ("noise 1 on every coordinate", dict(noise=1.0), 0.8),  # 13% low seen, true 1.16
])
def test_layer0_estimator_recovers_coded_information(case, kw, low):
    """layer_mi.ESTIMATORS["layer0"] at the analysis's N on quantised_channel, whose
    I(layer k; code of layer 0) is exact: within the stated under-reading, never above."""
    _, layer, code, true = ground_truth.quantised_channel(N_ANALYSIS, **kw)
    method, options = layer_mi.ESTIMATORS["layer0"]
    est = estimate_mi(layer, code, method=method, **options)
    assert low * true <= est.value <= true + 0.02, (case, true, est)


def test_layer0_curve_separates_keeping_from_discarding():
    """The analysis's own target (layer0_codes: 64 k-means cells of layer 0) on a 32-d layer 0:
    the k = 0 point is near H(c0) and far below InfoNCE's log N ceiling; an invertible map keeps
    nearly as much; a layer that kept 8 of 32 directions reads a small fraction; the permuted
    codes (the null) read ~0."""
    h0, warped, _, _ = ground_truth.quantised_channel(N_ANALYSIS)
    codes, entropy = layer0_codes(h0)
    assert math.log(64) - 0.05 < entropy <= math.log(64)
    g = torch.Generator().manual_seed(1)
    kept8 = torch.cat([h0[:, :8], torch.randn(N_ANALYSIS, 24, generator=g)], 1)
    method, options = layer_mi.ESTIMATORS["layer0"]
    est = {name: estimate_mi(x, c, method=method, **options)
           for name, x, c in (("layer 0", h0, codes), ("invertible", warped, codes), ("kept 8 of 32", kept8, codes),
                              ("null", h0, permuted(codes)))}
    assert 0.8 * entropy <= est["layer 0"].value <= entropy  # 15% low seen
    assert est["layer 0"].value < 0.5 * est["layer 0"].upper_bound  # log N_heldout = 7.9
    assert est["invertible"].value >= 0.75 * entropy  # 19% low seen
    assert est["kept 8 of 32"].value <= 0.3 * entropy  # 0.17 H seen
    assert abs(est["null"].value) < 0.02


def test_layer0_codes_refuses_too_many_cells():
    with pytest.raises(ValueError, match=r"n_codes=64 must be in \[2, N/10 = 30\] for 300 frames.*--layer0-codes"):
        layer0_codes(torch.randn(300, 8))


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
