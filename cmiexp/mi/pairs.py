"""Data plumbing shared by the MI estimators and the FlowNIB probe: tensors, one-hot labels,
splits, standardisation and minibatch streams. Deterministic given the generators passed in."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from cmiexp.errors import ConfigError, DataError


@contextlib.contextmanager
def flush_denormals():
    """Flush subnormal floats to zero while critics train (restored to torch's default, off, after).

    Saturated sigmoids and Adam's second moments of vanishing gradients produce subnormal floats,
    which CPUs handle up to ~100x slower: measured 2.7x on a whole 1-D estimate. Values that small
    (< 1e-38) carry nothing an MI estimate needs."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def as_tensor_2d(a, name: str) -> torch.Tensor:
    """numpy/torch/list -> tensor [n, d] (a 1-D input becomes [n, 1]); keeps integer dtypes."""
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError) as e:
            raise DataError(f"{name} must be a numeric array, got {type(a).__name__}: {e}") from None
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise DataError(f"{name} must be 1-D [n] or 2-D [n, d], got shape {tuple(t.shape)}")
    return t


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex()


def one_hot_labels(y: torch.Tensor, num_classes: int | None, name: str = "y") -> tuple[torch.Tensor, int]:
    """Integer labels [n] or [n, 1] -> float one-hot [n, C]; class ids are never used as numbers."""
    y = y.reshape(-1)
    if y.is_floating_point():
        if not torch.all(y == y.round()):
            raise DataError(f"{name} was declared discrete but holds non-integer values")
        y = y.long()
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{name} holds negative class ids (min {int(y.min())}); unlabelled rows must be removed")
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.numel() and int(y.max()) >= c:
        raise DataError(f"{name} holds class id {int(y.max())} but num_classes={c}")
    return torch.nn.functional.one_hot(y, c).float(), c


def split_indices(n: int, heldout_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n_ho = int(round(n * heldout_fraction))
    if n_ho < 2 or n - n_ho < 2:
        raise DataError(f"need at least 2 train and 2 held-out samples; got n={n} with "
                        f"heldout_fraction={heldout_fraction}")
    perm = torch.randperm(n, generator=gen)
    return perm[n_ho:], perm[:n_ho]


def split_three(n: int, val_fraction: float, test_fraction: float,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint train / validation / test index sets: the critic trains on the first, model
    selection (early stopping, estimator choice) reads the second, the reported number the third,
    so neither the fit nor the selection can inflate the estimate."""
    for key, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < v < 1.0:
            raise ConfigError(f"{key} must be in (0, 1), got {v}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if min(n_val, n_test, n - n_val - n_test) < 2:
        raise DataError(f"need at least 2 train, 2 validation and 2 test samples; got n={n} with "
                        f"val_fraction={val_fraction}, test_fraction={test_fraction}")
    perm = torch.randperm(n, generator=gen)
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]


def standardizer(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the train part (constant features get std 1)."""
    mean = train.mean(0)
    std = train.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean, std


def batch_stream(n: int, batch_size: int, gen: torch.Generator):
    """Endless minibatches of distinct indices (epoch-wise shuffling, no repeats inside a batch:
    a repeated sample would put a positive pair among the off-diagonal negatives)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch_size + 1, batch_size):
            yield perm[s:s + batch_size]


def eval_chunks(n: int, eval_batch_size: int) -> list[torch.Tensor]:
    """Split range(n) into nearly equal consecutive chunks of about ``eval_batch_size``."""
    k = max(1, n // max(2, eval_batch_size))
    return [c for c in torch.arange(n).tensor_split(k) if len(c) >= 2]


def prepare_pair(x, y, discrete_y=None, num_classes=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Tensors [n, dx] float and [n, dy] float (one-hot if y is discrete) plus the discreteness flag."""
    xt = as_tensor_2d(x, "x")
    yt = as_tensor_2d(y, "y")
    if xt.shape[0] != yt.shape[0]:
        raise DataError(f"x and y must have the same number of rows, got {xt.shape[0]} and {yt.shape[0]}")
    if discrete_y is None:
        discrete_y = _is_integer(yt) and yt.shape[1] == 1
    if discrete_y:
        if yt.shape[1] != 1:
            raise DataError(f"discrete y must be 1-D class ids, got shape {tuple(yt.shape)}")
        yt, _ = one_hot_labels(yt, num_classes)
    xt = xt.float()
    yt = yt.float()
    for name, t in (("x", xt), ("y", yt)):
        if not torch.isfinite(t).all():
            raise DataError(f"{name} contains NaN or infinite values")
    return xt, yt, bool(discrete_y)


__all__ = ["as_tensor_2d", "flush_denormals", "batch_stream", "eval_chunks", "one_hot_labels", "prepare_pair", "split_indices", "split_three", "standardizer"]
