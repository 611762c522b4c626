"""Samplers with known mutual information, for validating MI estimators.

Every task returns ``(x, y, true_mi)`` (float64 arrays [n, dx], [n, dy]; MI in nats) and is built
from a closed form, in the style of the Beyond-Normal benchmark (Czyz et al., NeurIPS 2023):

* jointly Gaussian pairs with I(X;Y) set directly (``gaussian``), dense and sparse multinormals;
* the same Gaussians pushed through invertible maps, which leave MI unchanged: half-cube,
  asinh, normal CDF (uniform margins), wiggly (x + a sin(bx) with ab < 1), bimodal margins
  (inverse CDF of a two-component mixture), spiral (a rotation whose angle grows with the
  radius), Swiss roll (an injective embedding of a 1-D variable in 2-D);
* the multivariate Student-t, whose MI is the Gaussian MI of its scale matrix plus a
  closed-form term in the degrees of freedom (dependence beyond correlation: positive even for
  an identity scale matrix);
* additive uniform noise, Y = X + U(-eps, eps), X ~ U(0, 1): I = eps - log(2 eps) for eps <= 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import digamma, gammaln, ndtr

from cmiexp.errors import ConfigError


def gaussian_mi_of_cov(cov: np.ndarray, dx: int) -> float:
    """I(X;Y) of N(0, cov) with X the first dx coordinates."""
    ld = lambda m: np.linalg.slogdet(m)[1]  # noqa: E731
    return 0.5 * float(ld(cov[:dx, :dx]) + ld(cov[dx:, dx:]) - ld(cov))


def _sample_normal(cov: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.multivariate_normal(np.zeros(len(cov)), cov, size=n, method="cholesky")


def gaussian(d: int, mi: float, n: int, seed: int, dy: int | None = None):
    """x ~ N(0, I_d), y_i = rho x_i + sqrt(1 - rho^2) e_i for i < min(d, dy): I = mi exactly."""
    dy = d if dy is None else dy
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rng.standard_normal((n, dy))
    m = min(d, dy)
    if mi > 0:
        rho = math.sqrt(-math.expm1(-2.0 * mi / m))
        y[:, :m] = rho * x[:, :m] + math.sqrt(1.0 - rho**2) * y[:, :m]
    return x, y, float(mi)


def dense_cov(dx: int, dy: int, corr: float) -> np.ndarray:
    """All off-diagonal entries of the joint covariance equal ``corr`` (equicorrelated)."""
    d = dx + dy
    return np.full((d, d), corr) + (1.0 - corr) * np.eye(d)


def sparse_cov(dx: int, dy: int, pairs: int, rho: float) -> np.ndarray:
    """x_i and y_i correlated with ``rho`` for i < pairs; every other pair independent."""
    c = np.eye(dx + dy)
    for i in range(pairs):
        c[i, dx + i] = c[dx + i, i] = rho
    return c


def multinormal(cov: np.ndarray, dx: int, n: int, seed: int):
    z = _sample_normal(cov, n, np.random.default_rng(seed))
    return z[:, :dx], z[:, dx:], gaussian_mi_of_cov(cov, dx)


def student_t_mi(cov: np.ndarray, dx: int, dof: float) -> float:
    """MI of the multivariate Student-t with scale ``cov`` and ``dof`` degrees of freedom:
    H(X) + H(Y) - H(X, Y) with H = 1/2 log det S + d/2 log(nu pi) + log G(nu/2) - log G((nu+d)/2)
    + (nu+d)/2 [psi((nu+d)/2) - psi(nu/2)]; the log det and log(nu pi) parts give the Gaussian MI."""
    nu = float(dof)

    def g(d: int) -> float:
        return float(gammaln(nu / 2) - gammaln((nu + d) / 2) + (nu + d) / 2 * (digamma((nu + d) / 2) - digamma(nu / 2)))

    d = len(cov)
    return gaussian_mi_of_cov(cov, dx) + g(dx) + g(d - dx) - g(d)


def student_t(cov: np.ndarray, dx: int, dof: float, n: int, seed: int):
    rng = np.random.default_rng(seed)
    z = _sample_normal(cov, n, rng)
    w = rng.chisquare(dof, size=(n, 1))
    t = z / np.sqrt(w / dof)
    return t[:, :dx], t[:, dx:], student_t_mi(cov, dx, dof)


def additive_uniform(eps: float, n: int, seed: int):
    """X ~ U(0, 1), Y = X + U(-eps, eps): h(Y) = eps (two linear ramps), h(N) = log 2 eps."""
    if not 0 < eps <= 0.5:
        raise ConfigError(f"additive_uniform needs 0 < eps <= 0.5, got {eps}")
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, 1))
    y = x + rng.uniform(-eps, eps, (n, 1))
    return x, y, float(eps - math.log(2 * eps))


# --------------------------------------------------------------------- invertible transforms


def half_cube(a: np.ndarray) -> np.ndarray:
    return np.sign(a) * np.abs(a) ** 1.5


def wiggly(a: np.ndarray) -> np.ndarray:
    # derivative 1 + 0.8 cos(2a) > 0: strictly increasing, so MI is unchanged
    return a + 0.4 * np.sin(2.0 * a)


def bimodal(a: np.ndarray) -> np.ndarray:
    """Phi(a) pushed through the inverse CDF of 0.5 N(-1.5, 0.5^2) + 0.5 N(1.5, 0.5^2)."""
    grid = np.linspace(-5.0, 5.0, 20001)
    cdf = 0.5 * ndtr((grid + 1.5) / 0.5) + 0.5 * ndtr((grid - 1.5) / 0.5)
    return np.interp(ndtr(a), cdf, grid)


def spiral(a: np.ndarray, speed: float = 0.5) -> np.ndarray:
    """Rotate the first two coordinates by speed * |a|^2 (norm-preserving, inverse rotates back)."""
    out = a.copy()
    theta = speed * (a**2).sum(1)
    c, s = np.cos(theta), np.sin(theta)
    out[:, 0] = c * a[:, 0] - s * a[:, 1]
    out[:, 1] = s * a[:, 0] + c * a[:, 1]
    return out


def swiss_roll(a: np.ndarray) -> np.ndarray:
    """A 1-D variable embedded injectively on a 2-D Swiss roll: t = 1.5 pi (1 + 2 Phi(a))."""
    t = 1.5 * math.pi * (1.0 + 2.0 * ndtr(a[:, 0]))
    return np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 21.0


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[int, int], tuple]  # (n, seed) -> (x, y, true_mi)


def _mapped(base: Callable[[int, int], tuple], fx=None, fy=None) -> Callable[[int, int], tuple]:
    def make(n: int, seed: int):
        x, y, mi = base(n, seed)
        return (fx(x) if fx else x), (fy(y) if fy else y), mi

    return make


def gaussian_tasks() -> list[Task]:
    """Correlated Gaussians: d in {1, 5, 20, 50}, I in {0, 2, 4, 6, 10} nats."""
    out = []
    for d in (1, 5, 20, 50):
        for mi in (0.0, 2.0, 4.0, 6.0, 10.0):
            out.append(Task(f"gauss d={d} I={mi:g}", lambda n, s, d=d, mi=mi: gaussian(d, mi, n, s)))
    return out


def beyond_normal_tasks() -> list[Task]:
    """Beyond-Normal-style tasks with closed-form MI (see the module docstring)."""
    dense3 = dense_cov(3, 3, 0.5)
    dense5 = dense_cov(5, 5, 0.5)
    sparse5 = sparse_cov(5, 5, 2, 0.8)
    sparse25 = sparse_cov(25, 25, 2, 0.8)
    g1 = lambda n, s: gaussian(1, 0.75, n, s)  # noqa: E731
    g3 = lambda n, s: multinormal(dense3, 3, n, s)  # noqa: E731
    t = [
        Task("multinormal dense 3x3", g3),
        Task("multinormal dense 5x5", lambda n, s: multinormal(dense5, 5, n, s)),
        Task("multinormal sparse 5x5", lambda n, s: multinormal(sparse5, 5, n, s)),
        Task("multinormal sparse 25x25", lambda n, s: multinormal(sparse25, 25, n, s)),
        Task("half-cube 3x3", _mapped(g3, half_cube, half_cube)),
        Task("asinh 3x3", _mapped(g3, np.arcsinh, np.arcsinh)),
        Task("normal CDF 3x3", _mapped(g3, ndtr, ndtr)),
        Task("wiggly 1x1", _mapped(g1, wiggly, wiggly)),
        Task("bimodal 1x1", _mapped(g1, bimodal, bimodal)),
        Task("spiral 3x3", _mapped(g3, spiral, None)),
        Task("swiss roll 2x1", _mapped(g1, swiss_roll, None)),
        Task("student-t 1x1 dof=1", lambda n, s: student_t(dense_cov(1, 1, 0.5), 1, 1.0, n, s)),
        Task("student-t 2x2 dof=2", lambda n, s: student_t(sparse_cov(2, 2, 2, 0.5), 2, 2.0, n, s)),
        Task("student-t 3x3 dof=3 (uncorrelated)", lambda n, s: student_t(np.eye(6), 3, 3.0, n, s)),
        Task("additive uniform eps=0.1", lambda n, s: additive_uniform(0.1, n, s)),
        Task("additive uniform eps=0.3", lambda n, s: additive_uniform(0.3, n, s)),
    ]
    return t


__all__ = [
    "Task", "additive_uniform", "beyond_normal_tasks", "bimodal", "dense_cov", "gaussian", "gaussian_mi_of_cov",
    "gaussian_tasks", "half_cube", "multinormal", "sparse_cov", "spiral", "student_t", "student_t_mi",
    "swiss_roll", "wiggly",
]
