"""Non-neural MI estimators with closed forms: the Gaussian (CCA) estimate and the Gaussian copula.

* ``gaussian_mi``: I(X;Y) of the jointly Gaussian law with the sample covariance of (x, y),
  -1/2 log det(I - R^2) over the canonical correlations R. Exact (up to sampling noise) when
  (X, Y) is jointly Gaussian; for other laws it is the MI of the Gaussian with the same second
  moments, which can be too low (dependence beyond correlation) or too high (e.g. near-discrete
  data). Each log-determinant is bias-corrected with the Wishart expectation
  E[log det S] = log det Sigma + sum_i psi((n - i) / 2) + d log(2 / (n - 1)), so independent
  variables give ~0 instead of the familiar + dx*dy / (2n) bias.
* ``copula_normalize``: the rank transform of every column to standard-normal scores. MI is
  invariant under strictly monotone maps of each coordinate, so after it the Gaussian estimate
  is exact for every Gaussian copula (half-cube, asinh, CDF, wiggly, bimodal margins).
* ``GaussianCritic``: log p(x, y) / (p(x) p(y)) of the fitted Gaussian, as a critic f(x, y)
  scoring [B, B] pairs. A fixed critic plugged into DV on data it was not fitted on is a lower
  bound on the true MI, so the closed form can be compared with neural critics on one scale
  (see :func:`cmiexp.mi.estimate.estimate_mi`, estimator ``auto``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import digamma, ndtri
from scipy.stats import rankdata

from cmiexp.errors import DataError


def _as_2d_float64(a, name: str) -> np.ndarray:
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{name} must be 1-D [n] or 2-D [n, d], got shape {arr.shape}")
    return arr


def copula_normalize(a) -> np.ndarray:
    """Each column replaced by Phi^-1(rank / (n + 1)) (average ranks for ties)."""
    arr = _as_2d_float64(a, "x")
    n = arr.shape[0]
    ranks = rankdata(arr, axis=0, method="average")
    return ndtri(ranks / (n + 1.0))


def wishart_logdet_bias(n: int, d: int) -> float:
    """E[log det S] - log det Sigma for the sample covariance S (divisor n - 1) of n Gaussian rows."""
    if n - d < 1:
        raise DataError(f"the Gaussian MI estimate needs more samples than dimensions (n={n}, d={d})")
    i = np.arange(1, d + 1)
    return float(digamma((n - i) / 2.0).sum() + d * math.log(2.0 / (n - 1)))


def _logdet(c: np.ndarray) -> float:
    sign, val = np.linalg.slogdet(c)
    if sign <= 0:
        return -math.inf
    return float(val)


def gaussian_mi(x, y, bias_correct: bool = True) -> float:
    """MI (nats) of the Gaussian with the sample covariance of (x, y); see the module docstring.

    Constant columns carry no information and are dropped; perfectly collinear columns (a
    singular joint covariance) mean the Gaussian MI is infinite, returned as ``inf``.
    """
    xa, ya = _as_2d_float64(x, "x"), _as_2d_float64(y, "y")
    if xa.shape[0] != ya.shape[0]:
        raise DataError(f"x and y must have the same number of rows, got {xa.shape[0]} and {ya.shape[0]}")
    xa = xa[:, xa.std(0) > 1e-12]
    ya = ya[:, ya.std(0) > 1e-12]
    if xa.shape[1] == 0 or ya.shape[1] == 0:
        return 0.0
    n, dx, dy = xa.shape[0], xa.shape[1], ya.shape[1]
    c = np.cov(np.concatenate([xa, ya], axis=1), rowvar=False).reshape(dx + dy, dx + dy)
    # correlation scale: the determinants are scale-free and this keeps them well conditioned
    s = np.sqrt(np.diag(c))
    c = c / s[:, None] / s[None, :]
    lx, ly, lxy = _logdet(c[:dx, :dx]), _logdet(c[dx:, dx:]), _logdet(c)
    if not math.isfinite(lxy):
        return math.inf
    mi = 0.5 * (lx + ly - lxy)
    if bias_correct:
        mi -= 0.5 * (wishart_logdet_bias(n, dx) + wishart_logdet_bias(n, dy) - wishart_logdet_bias(n, dx + dy))
    return float(mi)


class GaussianCritic:
    """f(x, y) = log N([x; y]; mu, C) - log N(x; mu_x, C_x) - log N(y; mu_y, C_y), fitted on data.

    Called on [B, dx] and [B, dy] tensors it returns the [B, B] score matrix (rows x_i, columns
    y_j), like the neural critics of :mod:`cmiexp.mi.critics`. The quadratic form is expanded so
    the B x B pairs cost one matmul: f = a(x) + b(y) + x^T W y + const.
    """

    def __init__(self, x, y, ridge: float = 0.0):
        xa, ya = _as_2d_float64(x, "x"), _as_2d_float64(y, "y")
        dx = xa.shape[1]
        joint = np.concatenate([xa, ya], axis=1)
        mu = joint.mean(0)
        c = np.cov(joint, rowvar=False).reshape(joint.shape[1], joint.shape[1])
        # no ridge by default: near-deterministic dependence (conditional variance ~1e-9 of the
        # marginal at 10 nats) is exactly what a ridge would blur; one is added only if C is singular
        scale = np.trace(c) / len(c)
        for eps in (ridge, 1e-12, 1e-9, 1e-6):
            ce = c + eps * scale * np.eye(len(c))
            try:
                np.linalg.cholesky(ce)
                c = ce
                break
            except np.linalg.LinAlgError:
                continue
        p = np.linalg.inv(c)  # joint precision
        px, py = np.linalg.inv(c[:dx, :dx]), np.linalg.inv(c[dx:, dx:])
        # -1/2 z^T P z + 1/2 x^T Px x + 1/2 y^T Py y, z = [x; y] centred
        self.mu_x, self.mu_y = torch.from_numpy(mu[:dx]), torch.from_numpy(mu[dx:])
        self.ax = torch.from_numpy(0.5 * (px - p[:dx, :dx]))
        self.ay = torch.from_numpy(0.5 * (py - p[dx:, dx:]))
        self.w = torch.from_numpy(-p[:dx, dx:])
        self.const = 0.5 * (_logdet(c[:dx, :dx]) + _logdet(c[dx:, dx:]) - _logdet(c))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xc = x.double() - self.mu_x
        yc = y.double() - self.mu_y
        qa = ((xc @ self.ax) * xc).sum(1)
        qb = ((yc @ self.ay) * yc).sum(1)
        return (qa[:, None] + qb[None, :] + xc @ self.w @ yc.T + self.const).float()


__all__ = ["GaussianCritic", "copula_normalize", "gaussian_mi", "wishart_logdet_bias"]
