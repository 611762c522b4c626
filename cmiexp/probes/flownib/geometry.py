"""FlowNIB geometry: effective dimensions of representations, the alpha schedule and the
Optimal Information Coordinate (OIC) of an information-plane trajectory. Pure functions."""

from __future__ import annotations

import numpy as np
import torch

from cmiexp.errors import ConfigError, DataError


def _as_2d(z, name: str = "z") -> torch.Tensor:
    t = z.detach().cpu() if isinstance(z, torch.Tensor) else torch.as_tensor(np.asarray(z))
    # float32 activations keep float32 for the one big matmul (4x cheaper on 5000 x 768 inputs,
    # ~1e-6 relative error); anything else is computed in float64.
    t = t if t.dtype == torch.float32 else t.double()
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] < 2:
        raise DataError(f"{name} must be [n, d] with n >= 2, got shape {tuple(t.shape)}")
    return t


def _scatter_matrix(z) -> tuple[torch.Tensor, int]:
    """(n-1) * covariance in float64, or the n x n Gram matrix when n < d (same nonzero
    eigenvalues, cheaper)."""
    t = _as_2d(z)
    c = t - t.mean(0, keepdim=True)
    n, d = c.shape
    m = (c @ c.T) if n < d else (c.T @ c)
    return m.double(), n


def covariance_eigenvalues(z) -> np.ndarray:
    """Eigenvalues (descending, clipped at 0) of the sample covariance of z [n, d]."""
    m, n = _scatter_matrix(z)
    lam = torch.linalg.eigvalsh(m / (n - 1)).clamp_min(0.0)
    return lam.flip(0).numpy()


def _pr_from_eigenvalues(lam: np.ndarray) -> float:
    s2 = float((lam * lam).sum())
    return 0.0 if s2 <= 0.0 else float(lam.sum()) ** 2 / s2


def _shannon_from_eigenvalues(lam: np.ndarray) -> float:
    s = lam.sum()
    if s <= 0:
        return 0.0
    p = lam[lam > 0] / s
    return float(np.exp(-(p * np.log(p)).sum()))


def participation_ratio(z) -> float:
    """(sum lambda)^2 / sum lambda^2 of the covariance eigenvalues = tr(C)^2 / ||C||_F^2.

    0.0 for constant data (no variance at all).
    """
    m, _ = _scatter_matrix(z)  # the (n-1) scale cancels in the ratio
    fro2 = float((m * m).sum())
    return 0.0 if fro2 <= 0.0 else float(torch.trace(m)) ** 2 / fro2


def shannon_effective_dim(z) -> float:
    """exp(entropy of the normalised covariance eigenvalues); 0.0 for constant data."""
    return _shannon_from_eigenvalues(covariance_eigenvalues(z))


def effective_dims(z) -> tuple[float, float]:
    """(participation ratio, Shannon effective dimension) from one eigendecomposition."""
    lam = covariance_eigenvalues(z)
    return _pr_from_eigenvalues(lam), _shannon_from_eigenvalues(lam)


def alpha_schedule(T: int, delta: float = 0.001) -> np.ndarray:
    """alpha(t) for t = 0..T-1: alpha(0) = 1, alpha(t+1) = max(0, alpha(t) - delta)."""
    if int(T) < 1:
        raise ConfigError(f"steps must be >= 1, got {T}")
    if delta < 0:
        raise ConfigError(f"delta must be >= 0, got {delta}")
    return np.maximum(0.0, 1.0 - float(delta) * np.arange(int(T), dtype=np.float64))


def select_oic(ix, iy) -> tuple[int, float, float, float]:
    """Optimal Information Coordinate of a trajectory.

    gamma = R_y / (R_x + R_y) with R = max - min over the trajectory (gamma = 0.5 when both
    ranges are 0, i.e. all points coincide); returns the first t maximising
    gamma * ix[t] + (1 - gamma) * iy[t], as (t, ix[t], iy[t], gamma).
    """
    ix = np.asarray(ix, dtype=np.float64).reshape(-1)
    iy = np.asarray(iy, dtype=np.float64).reshape(-1)
    if ix.size == 0 or ix.shape != iy.shape:
        raise DataError(f"OIC needs two non-empty trajectories of equal length, got {ix.size} and {iy.size}")
    if not (np.isfinite(ix).all() and np.isfinite(iy).all()):
        raise DataError("OIC trajectory contains NaN or infinite values")
    rx = ix.max() - ix.min()
    ry = iy.max() - iy.min()
    gamma = 0.5 if rx + ry == 0 else ry / (rx + ry)
    t = int(np.argmax(gamma * ix + (1.0 - gamma) * iy))
    return t, float(ix[t]), float(iy[t]), float(gamma)


__all__ = ["alpha_schedule", "covariance_eigenvalues", "effective_dims", "participation_ratio", "select_oic",
           "shannon_effective_dim"]
