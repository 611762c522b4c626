"""Centroid estimator: class sums, the three modes, checkpoint state, padding mask, and a real
two-process gloo all-reduce."""

from __future__ import annotations

import datetime
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cmiexp.errors import CheckpointError, DataError
from cmiexp.objectives.centroids import CentroidEstimator, class_sums, torch_distributed_sum

C = 3


def _np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_class_means(z, y, c):
    p = _np_softmax(z)
    out = np.zeros((c, p.shape[1]))
    for k in range(c):
        rows = [p[i] for i in range(len(y)) if y[i] == k]
        out[k] = np.sum(rows, axis=0) / len(rows)
    return out


def _dataset(n=23, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    y = torch.arange(n) % c  # every class present
    y = y[torch.randperm(n, generator=g)]
    return z, y


def _full_pass(est, z, y, bs=5):
    for i in range(0, len(y), bs):
        est.accumulate(z[i : i + bs], y[i : i + bs])
    return est.finalize()


def test_class_sums_against_numpy():
    rng = np.random.default_rng(0)
    p = rng.random((11, 4))
    y = rng.integers(0, 5, size=11)
    sums, counts = class_sums(torch.tensor(p), torch.tensor(y), 5)
    want_s, want_c = np.zeros((5, 4)), np.zeros(5)
    for i in range(11):
        want_s[y[i]] += p[i]
        want_c[y[i]] += 1
    assert sums.shape == (5, 4) and counts.shape == (5,)
    np.testing.assert_allclose(sums.numpy(), want_s, atol=1e-12)
    np.testing.assert_array_equal(counts.numpy(), want_c)


def test_fixed_mode():
    z, y = _dataset()
    est = CentroidEstimator(C, mode="fixed")
    assert not est.initialized and est.needs_full_pass(0)
    cent = _full_pass(est, z, y)
    assert cent.dtype == torch.float32 and cent.shape == (C, C)
    np.testing.assert_allclose(cent.numpy(), _np_class_means(z.numpy(), y.numpy(), C), atol=1e-7)
    np.testing.assert_array_equal(est.counts.numpy(), np.bincount(y.numpy(), minlength=C))
    assert not est.needs_full_pass(0) and not est.needs_full_pass(1)
    with pytest.raises(RuntimeError, match="fixed"):
        est.ema_update(z, y)


def test_epoch_mode_recomputes_every_epoch():
    z, y = _dataset()
    est = CentroidEstimator(C, mode="epoch")
    for epoch in range(3):
        assert est.needs_full_pass(epoch)
        cent = _full_pass(est, z * (epoch + 1), y)  # a "different model" each epoch
        np.testing.assert_allclose(cent.numpy(), _np_class_means(z.numpy() * (epoch + 1), y.numpy(), C), atol=1e-7)


def test_ema_mode():
    z, y = _dataset()
    est = CentroidEstimator(C, mode="ema", momentum=0.8)
    assert est.needs_full_pass(0)
    with pytest.raises(RuntimeError, match="full pass"):
        est.ema_update(z, y)
    old = _full_pass(est, z, y).clone()
    assert not est.needs_full_pass(0) and not est.needs_full_pass(5)
    # A batch without class 2: class 2 keeps its centroid; the others move by the EMA rule.
    zb = torch.randn(6, C)
    yb = torch.tensor([0, 1, 0, 1, 1, 0])
    new = est.ema_update(zb, yb)
    means = _np_class_means(zb.numpy(), yb.numpy(), 2)
    for k in (0, 1):
        np.testing.assert_allclose(new[k].numpy(), 0.8 * old[k].numpy() + 0.2 * means[k], atol=1e-7)
    assert torch.equal(new[2], old[2])
    np.testing.assert_allclose(new.sum(1).numpy(), np.ones(C), atol=1e-6)


def test_absent_class_raises_and_keeps_state():
    z, y = _dataset()
    keep = y != 2
    est = CentroidEstimator(C, mode="epoch")
    before = est.centroids.clone()
    with pytest.raises(DataError, match=r"^class 2 has no training examples; CMI centroids need every class$"):
        _full_pass(est, z[keep], y[keep])
    assert torch.equal(est.centroids, before) and not est.initialized
    assert torch.isfinite(est.centroids).all()
    est2 = CentroidEstimator(4, mode="fixed")
    with pytest.raises(DataError, match="classes 2, 3 have no training examples"):
        est2.accumulate(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))
        est2.finalize()


def test_valid_mask_excludes_padded_duplicates():
    z, y = _dataset()
    ref = _full_pass(CentroidEstimator(C), z, y).clone()
    est = CentroidEstimator(C)
    est.accumulate(z[:20], y[:20])
    # A tail batch padded with sample 0 again: only the padding row is masked out.
    tail = torch.cat([torch.arange(20, 23), torch.tensor([0])])
    est.accumulate(z[tail], y[tail], valid=torch.tensor([True, True, True, False]))
    # A batch made only of padding (all masked out).
    est.accumulate(z[:4], y[:4], valid=torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(est.finalize(), ref, rtol=0, atol=1e-7)
    # Without the mask the duplicates change the centroids.
    est.accumulate(z, y)
    est.accumulate(z[:4], y[:4])
    assert not torch.allclose(est.finalize(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="valid mask shape"):
        est.accumulate(z[:4], y[:4], valid=torch.ones(3, dtype=torch.bool))


def test_state_dict_round_trip_through_safetensors(tmp_path):
    z, y = _dataset()
    est = CentroidEstimator(C, mode="fixed")
    _full_pass(est, z, y)
    path = tmp_path / "objective.safetensors"
    save_file(est.state_dict(), str(path))
    fresh = CentroidEstimator(C, mode="fixed")
    fresh.load_state_dict(load_file(str(path)))
    assert torch.equal(fresh.centroids, est.centroids)
    assert torch.equal(fresh.counts, est.counts)
    assert fresh.initialized
    assert not fresh.needs_full_pass(0)  # resumed: no new full pass with the trained model
    # An uninitialised estimator round-trips as uninitialised.
    blank = CentroidEstimator(C, mode="ema")
    again = CentroidEstimator(C, mode="ema")
    again.load_state_dict(blank.state_dict())
    assert not again.initialized and again.needs_full_pass(0)
    with pytest.raises(CheckpointError, match="'centroids' has shape"):
        CentroidEstimator(4).load_state_dict(est.state_dict())
    with pytest.raises(CheckpointError, match="missing the key 'counts'"):
        CentroidEstimator(C).load_state_dict({"centroids": est.centroids, "initialized": torch.tensor(1)})


def test_reduce_fn_sums_before_dividing():
    # Two fake "ranks" with very different shard sizes: summing sums and counts before dividing
    # gives the full-data means (a mean of per-rank means would not).
    z, y = _dataset(n=30)
    a, b = CentroidEstimator(C), CentroidEstimator(C)
    a.accumulate(z[:4], y[:4])
    a.accumulate(z[4:7], y[4:7])
    b.accumulate(z[7:], y[7:])
    other = torch.cat([b._sums, b._counts.unsqueeze(1)], dim=1)
    calls = []

    def fake_reduce(t):
        calls.append(t.shape)
        return t + other

    got = a.finalize(fake_reduce)
    assert calls == [(C, C + 1)]
    np.testing.assert_allclose(got.numpy(), _np_class_means(z.numpy(), y.numpy(), C), atol=1e-7)
    # In-place reducers that return None (torch.distributed.all_reduce style) work too.
    est = CentroidEstimator(C)
    est.accumulate(z, y)
    assert torch.allclose(est.finalize(lambda t: None), got)
    # Outside an initialised process group the helper is the identity.
    t = torch.arange(4.0)
    assert torch.equal(torch_distributed_sum(t), torch.arange(4.0))


# --------------------------------------------------------------------------------------------
# Real two-process test (gloo on CPU)
# --------------------------------------------------------------------------------------------
N_DIST, BS, WORLD = 23, 4, 2


def _rank_batches(rank, world, n, bs):
    """Mimic accelerate's BatchSamplerShard (sequential sampler, even_batches=True): global
    batch k goes to rank k % world and the tail is padded by cycling from the dataset start.
    Returns (indices, valid) per local batch; valid = global position < n."""
    n_batches = -(-n // bs)
    n_batches = -(-n_batches // world) * world
    out = []
    for k in range(rank, n_batches, world):
        pos = torch.arange(k * bs, (k + 1) * bs)
        out.append((pos % n, pos < n))
    return out


def _dist_worker(rank, world, out_dir):
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        z, y = _dataset(n=N_DIST)
        est = CentroidEstimator(C, mode="epoch")
        for idx, valid in _rank_batches(rank, world, N_DIST, BS):
            est.accumulate(z[idx], y[idx], valid=valid)
        est.finalize(torch_distributed_sum)
        torch.save({"centroids": est.centroids, "counts": est.counts}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(tmp_path, monkeypatch):
    # The sharding really pads: the two ranks see more rows than the dataset has.
    seen = sum(int(v.numel()) for r in range(WORLD) for _, v in _rank_batches(r, WORLD, N_DIST, BS))
    assert seen > N_DIST
    assert sum(int(v.sum()) for r in range(WORLD) for _, v in _rank_batches(r, WORLD, N_DIST, BS)) == N_DIST

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    mp.spawn(_dist_worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=True)

    z, y = _dataset(n=N_DIST)
    single = CentroidEstimator(C)
    single.accumulate(z, y)
    ref = single.finalize()
    np.testing.assert_allclose(ref.numpy(), _np_class_means(z.numpy(), y.numpy(), C), atol=1e-7)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert torch.equal(results[0]["centroids"], results[1]["centroids"])
    for res in results:
        assert torch.allclose(res["centroids"], ref, rtol=0, atol=1e-7)
        assert torch.equal(res["counts"], single.counts)
