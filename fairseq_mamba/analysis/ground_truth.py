"""Synthetic pairs with known mutual information, for validating the estimators.

* :func:`gaussian_pair`: x, y in R^d, d independent component pairs of correlation rho:
  I = -d/2 log(1 - rho^2) exactly.
* :func:`mixed_gaussian_pair`: a ``gaussian_pair`` in a low-dimensional latent space, mixed
  into many dimensions by random matrices plus noise, as real features concentrate their
  variance in a few directions; the true MI follows from the joint covariance.
* :func:`gaussian_mixture`: x | c ~ N(mu_c, I) with K random centres, y = c: I(x; y) =
  log K + E[log p(c | x)], computed by Monte Carlo with the exact posterior (its standard error
  is returned too). Overlapping classes, as phones and k-means units of speech frames are.
* :func:`noisy_clusters`: well separated clusters, y = c passed through a symmetric noisy
  channel: I = log K - H_b(e) - e log(K - 1) (x determines c up to negligible overlap).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor


def gaussian_pair(mi: float, d: int, n: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """x, y: (n, d) float with I(x; y) = mi nats exactly."""
    g = torch.Generator().manual_seed(seed)
    rho = math.sqrt(1 - math.exp(-2 * mi / d))
    x = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=g)


def mixed_gaussian_pair(mi_latent: float, n: int, d: int = 128, d_latent: int = 16, noise: float = 0.5,
                        seed: int = 0) -> Tuple[Tensor, Tensor, float]:
    """x = s_x A + noise e, y = s_y B + noise e' with (s_x, s_y) = gaussian_pair(mi_latent, d_latent).

    A, B: (d_latent, d) random with unit-variance columns of x and y's signal. Returns x, y: (n, d)
    and the exact I(x; y) = 1/2 (log det S_xx + log det S_yy - log det S) of the joint covariance S
    (below ``mi_latent``: the noise hides part of the latent)."""
    s_x, s_y = gaussian_pair(mi_latent, d_latent, n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    a, b = (torch.randn(d_latent, d, generator=g, dtype=torch.float64) / math.sqrt(d_latent) for _ in range(2))
    x = s_x @ a.float() + noise * torch.randn(n, d, generator=g)
    y = s_y @ b.float() + noise * torch.randn(n, d, generator=g)
    rho = math.sqrt(1 - math.exp(-2 * mi_latent / d_latent))
    eye = noise ** 2 * torch.eye(d, dtype=torch.float64)
    s_xx, s_yy, s_xy = a.T @ a + eye, b.T @ b + eye, rho * a.T @ b
    joint = torch.cat([torch.cat([s_xx, s_xy], 1), torch.cat([s_xy.T, s_yy], 1)])
    true = 0.5 * float(torch.logdet(s_xx) + torch.logdet(s_yy) - torch.logdet(joint))
    return x, y, true


def gaussian_mixture(k: int, d: int, scale: float, n: int, seed: int = 0,
                     n_truth: int = 200_000) -> Tuple[Tensor, Tensor, float, float]:
    """x: (n, d) float, y: (n,) long uniform over k classes with centres ~ N(0, scale^2 I).

    Returns x, y, the true I(x; y) in nats and its Monte-Carlo standard error (n_truth draws)."""
    g = torch.Generator().manual_seed(seed)
    centres = scale * torch.randn(k, d, generator=g)

    def draw(m: int) -> Tuple[Tensor, Tensor]:
        c = torch.randint(k, (m,), generator=g)
        return centres[c] + torch.randn(m, d, generator=g), c

    x_mc, c_mc = draw(n_truth)
    log_post = torch.log_softmax(-0.5 * torch.cdist(x_mc, centres) ** 2, dim=1).gather(1, c_mc[:, None])[:, 0]
    x, y = draw(n)
    return x, y, math.log(k) + float(log_post.mean()), float(log_post.std()) / math.sqrt(n_truth)


def noisy_clusters(k: int, n: int, flip: float = 0.0, d: int = 16, seed: int = 0) -> Tuple[Tensor, Tensor, float]:
    """x: (n, d) class-conditional Gaussians ~20 sigma apart; y: (n,) labels, y != c with prob ``flip``.

    Returns x, y and the true I(x; y) = I(c; y)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(k, (n,), generator=g)
    centres = 20 * torch.randn(k, d, generator=g) / math.sqrt(2)
    x = centres[c] + torch.randn(n, d, generator=g)
    other = (c + torch.randint(1, k, (n,), generator=g)) % k
    y = torch.where(torch.rand(n, generator=g) < flip, other, c)
    h_noise = 0.0 if flip == 0 else -(flip * math.log(flip) + (1 - flip) * math.log(1 - flip))
    return x, y, math.log(k) - h_noise - flip * math.log(k - 1)


def sign_bit_information(noise: float) -> float:
    """I(h + noise e; sign h) in nats for h, e ~ N(0, 1) independent.

    The posterior P(h > 0 | y) is Phi(u / noise) with u = y / sqrt(1 + noise^2) ~ N(0, 1), so
    I = log 2 - E_u[H_b(Phi(u / noise))], integrated here on a fine grid (error < 1e-6)."""
    if noise == 0:
        return math.log(2)
    u = torch.linspace(-9, 9, 200_001, dtype=torch.float64)
    p = torch.special.ndtr(u / noise).clamp(1e-300, 1 - 1e-16)
    h_b = -(p * p.log() + (1 - p) * torch.log1p(-p))
    weight = torch.exp(-0.5 * u ** 2) / math.sqrt(2 * math.pi)
    return math.log(2) - float((weight * h_b).sum() * (u[1] - u[0]))


def quantised_channel(n: int, d: int = 32, bits: int = 6, lost: int = 0, noise: float = 0.0, warp: bool = True,
                      seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, float]:
    """A "layer 0", its discrete code and a "layer k" made from it, with I(layer k; code) known exactly.

    h0: (n, d) ~ N(0, I); code: (n,) long, the sign pattern of h0's first ``bits`` coordinates
    (2**bits equiprobable codes, H = bits log 2). Layer k: the first ``lost`` of those
    coordinates replaced by fresh N(0, 1) draws (information discarded), every coordinate plus
    ``noise`` * N(0, 1), then mixed by a random rotation and, with ``warp``, the invertible
    nonlinearity t + 0.8 tanh(2t) and a second rotation. Rotations and the warp are invertible,
    so I(layer k; code) = (bits - lost) * sign_bit_information(noise); with lost = 0 and
    noise = 0 layer k is an invertible function of h0 and keeps all of H(code).
    Returns h0, layer k (n, d), code and the true I(layer k; code) in nats."""
    if not 0 <= lost <= bits <= d:
        raise ValueError(f"need 0 <= lost <= bits <= d, got lost={lost} bits={bits} d={d}")
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(n, d, generator=g)
    code = ((h0[:, :bits] > 0).long() * (2 ** torch.arange(bits))).sum(1)
    z = h0.clone()
    z[:, :lost] = torch.randn(n, lost, generator=g)
    z = z + noise * torch.randn(n, d, generator=g)
    rotations = [torch.linalg.qr(torch.randn(d, d, generator=g))[0] for _ in range(2)]
    layer = z @ rotations[0]
    if warp:
        layer = (layer + 0.8 * torch.tanh(2 * layer)) @ rotations[1]
    return h0, layer, code, (bits - lost) * sign_bit_information(noise)
