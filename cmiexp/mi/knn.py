"""Kraskov-Stoegbauer-Grassberger (KSG) nearest-neighbour MI estimator (estimator 1 of
Kraskov et al., Phys. Rev. E 69, 066138, 2004).

    I(X;Y) = psi(k) + psi(n) - < psi(n_x(i) + 1) + psi(n_y(i) + 1) >

where eps_i is the max-norm distance from sample i to its k-th neighbour in the joint space and
n_x(i), n_y(i) count the other samples strictly within eps_i in each marginal space. It needs no
training and is the most accurate choice in low dimension (d_x + d_y up to ~10) at moderate MI;
it underestimates large MI in high dimension (its error grows with e^{I/d}-style neighbourhood
shrinkage), where critics or the Gaussian closed forms do better.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma

from cmiexp.errors import ConfigError, DataError


def ksg_mi(x, y, k: int = 5, seed: int = 0, standardize: bool = True, jitter: float = 1e-10) -> float:
    """KSG estimate (nats). Columns are standardised; a tiny seeded jitter breaks exact ties,
    which the estimator's derivation assumes away (repeated values would inflate the counts)."""
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    xa = xa[:, None] if xa.ndim == 1 else xa
    ya = ya[:, None] if ya.ndim == 1 else ya
    n = xa.shape[0]
    if ya.shape[0] != n:
        raise DataError(f"x and y must have the same number of rows, got {n} and {ya.shape[0]}")
    if int(k) < 1 or int(k) >= n:
        raise ConfigError(f"k must be in [1, n - 1], got k={k} with n={n}")
    if standardize:
        for a in (xa, ya):
            sd = a.std(0)
            a -= a.mean(0)
            a /= np.where(sd > 1e-12, sd, 1.0)
    rng = np.random.default_rng(seed)
    xa = xa + jitter * rng.standard_normal(xa.shape)
    ya = ya + jitter * rng.standard_normal(ya.shape)
    joint = np.concatenate([xa, ya], axis=1)
    # k + 1 neighbours: the point itself comes first at distance 0
    dist, _ = cKDTree(joint).query(joint, k=int(k) + 1, p=np.inf)
    eps = dist[:, -1]
    # strictly inside eps: shrink the radius by one ulp-scale step; the count includes the point
    r = np.nextafter(eps, 0)
    nx = cKDTree(xa).query_ball_point(xa, r, p=np.inf, return_length=True) - 1
    ny = cKDTree(ya).query_ball_point(ya, r, p=np.inf, return_length=True) - 1
    return float(digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1)))


__all__ = ["ksg_mi"]
