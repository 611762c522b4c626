"""The speed levers of issue 16: length-grouped batching, online centroids, no per-step host sync."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cmiexp.data.length_grouping import LengthGroupedSampler, length_grouped_order, padded_tokens
from cmiexp.objectives import TrainContext, build_objective
from cmiexp.objectives.centroids import torch_distributed_sum
from tests.conftest import GLUE_DIR, REPO, compose_config, find_run_dirs, run_cli

C = 3


# --------------------------------------------------------------------------------------------
# Length-grouped order
# --------------------------------------------------------------------------------------------
def _lengths(n=1000, seed=0):
    g = np.random.default_rng(seed)
    return [int(v) for v in g.integers(3, 128, size=n)]


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    lengths = _lengths(1000)
    a = length_grouped_order(lengths, 32, seed=1, epoch=0)
    assert sorted(a) == list(range(1000))  # every row exactly once
    assert a == length_grouped_order(lengths, 32, seed=1, epoch=0)  # a function of (seed, epoch)
    assert a != length_grouped_order(lengths, 32, seed=1, epoch=1)
    assert a != length_grouped_order(lengths, 32, seed=2, epoch=0)
    rand = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    # Padded tokens against an independent count (sum over batches of max length x rows).
    want = sum(max(lengths[i] for i in a[s:s + 32]) * len(a[s:s + 32]) for s in range(0, 1000, 32))
    assert padded_tokens(lengths, a, 32) == want
    assert want < 0.7 * padded_tokens(lengths, rand, 32)
    # Still shuffled: the batches are not in length order across the epoch.
    maxes = [max(lengths[i] for i in a[s:s + 32]) for s in range(0, 992, 32)]
    assert maxes != sorted(maxes) and maxes != sorted(maxes, reverse=True)


def test_short_tail_batch_stays_last_and_global_batches_are_the_same_for_any_split():
    lengths = _lengths(72, seed=3)
    order = length_grouped_order(lengths, 32, seed=0, epoch=2)
    sampler = LengthGroupedSampler(lengths, 32, seed=0)
    sampler.set_epoch(2)
    assert list(sampler) == order and len(sampler) == 72
    # The 8-row tail is the last global batch: the rows no full batch of 32 holds.
    full = [order[0:32], order[32:64]]
    assert sorted(order[64:]) == sorted(set(range(72)) - set(full[0]) - set(full[1]))
    # Per-process batches of 16 on 2 processes are consecutive halves of the global batches of 32
    # (Accelerate deals local batch j to rank j % 2), i.e. the same rows as 1 process x 32.
    local = [order[s:s + 16] for s in range(0, 72, 16)]
    assert sorted(local[0] + local[1]) == sorted(full[0]) and sorted(local[2] + local[3]) == sorted(full[1])


# --------------------------------------------------------------------------------------------
# Online centroids: the class means of the softmax outputs the loss saw
# --------------------------------------------------------------------------------------------
def _task():
    from cmiexp.data.base import TaskData

    return TaskData(name="toy", train=None, eval_splits={}, text_fields=("sentence",),
                    label_names=[f"c{i}" for i in range(C)], metrics=["accuracy"], primary_metric="accuracy")


def _ctx(reduce=lambda t, op: t):
    acc = SimpleNamespace(num_processes=1, process_index=0, reduce=reduce, device=torch.device("cpu"))
    return TrainContext(accelerator=acc, model=None, task=_task(), cfg=None, run_dir=None)


def _online(name="cmi_min"):
    base = OmegaConf.to_container(compose_config([f"objective={name}"]).objective)
    base["centroids"] = "online"
    return build_objective(OmegaConf.create({"objective": base}), _ctx())


def _epoch_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=g) * 2
    y = torch.arange(n) % C
    return z, y[torch.randperm(n, generator=g)]


def _np_means(z, y):
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.stack([p[y == k].mean(0) for k in range(C)])


@pytest.mark.parametrize("name", ["cmi_min", "mcmi"])
def test_online_centroids_are_the_class_means_of_the_epochs_outputs(name):
    obj, ctx = _online(name), _ctx()
    obj.on_epoch_start(ctx, 0)
    z0, y0 = _epoch_data(seed=0)
    for s in range(0, 40, 8):
        obj.loss({"labels": y0[s:s + 8]}, SimpleNamespace(logits=z0[s:s + 8]), ctx)
        # First epoch: Q is the running mean of the outputs seen so far (this batch included).
        seen_y = y0[:s + 8].numpy()
        running = obj.estimator.online_running().numpy()
        for k in set(seen_y.tolist()):
            p = np.exp(z0[:s + 8].numpy() - z0[:s + 8].numpy().max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            np.testing.assert_allclose(running[k], p[seen_y == k].mean(0), atol=1e-6)
    assert obj.summary()["centroid_passes"] == 0  # no full pass, ever
    obj.on_epoch_start(ctx, 1)
    np.testing.assert_allclose(obj.estimator.centroids.numpy(), _np_means(z0.numpy(), y0.numpy()), atol=1e-6)
    assert obj.estimator.counts.tolist() == [float((y0 == k).sum()) for k in range(C)]
    # Epoch 1 trains with epoch 0's means and collects its own for epoch 2.
    z1, y1 = _epoch_data(seed=1)
    for s in range(0, 40, 8):
        obj.loss({"labels": y1[s:s + 8]}, SimpleNamespace(logits=z1[s:s + 8]), ctx)
    np.testing.assert_allclose(obj.estimator.centroids.numpy(), _np_means(z0.numpy(), y0.numpy()), atol=1e-6)
    # A checkpoint taken now and restored into a fresh objective ends epoch 1 identically.
    state = obj.state_dict()
    other = _online(name)
    other.load_state_dict(state)
    for o in (obj, other):
        o.on_epoch_start(ctx, 2)
        np.testing.assert_allclose(o.estimator.centroids.numpy(), _np_means(z1.numpy(), y1.numpy()), atol=1e-6)


def test_online_centroids_skip_a_padding_only_batch():
    obj, ctx = _online(), _ctx()
    obj.on_epoch_start(ctx, 0)
    z, y = _epoch_data(seed=4)
    obj.loss({"labels": y[:30]}, SimpleNamespace(logits=z[:30]), ctx)
    ctx.extra["batch_weight"] = 0.0  # this process holds only repeated rows of the last global batch
    obj.loss({"labels": y[30:]}, SimpleNamespace(logits=z[30:] + 5), ctx)
    obj.on_epoch_start(ctx, 1)
    np.testing.assert_allclose(obj.estimator.centroids.numpy(), _np_means(z[:30].numpy(), y[:30].numpy()), atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _online_worker(rank, world, out_dir):
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        obj = _online()
        ctx = _ctx(reduce=lambda t, op: torch_distributed_sum(t))
        obj.on_epoch_start(ctx, 0)
        z, y = _epoch_data(seed=0)
        running = []
        for s in range(0, 40, 8):  # global batch of 8: rank r holds rows s + 4r .. s + 4r + 3
            lo = s + 4 * rank
            obj.loss({"labels": y[lo:lo + 4]}, SimpleNamespace(logits=z[lo:lo + 4]), ctx)
            running.append(obj.estimator.online_running().clone())
        obj.on_epoch_start(ctx, 1)
        torch.save({"centroids": obj.estimator.centroids, "running": running}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_online_centroids_on_two_processes_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    mp.spawn(_online_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    obj, ctx = _online(), _ctx()
    obj.on_epoch_start(ctx, 0)
    z, y = _epoch_data(seed=0)
    running = []
    for s in range(0, 40, 8):
        obj.loss({"labels": y[s:s + 8]}, SimpleNamespace(logits=z[s:s + 8]), ctx)
        running.append(obj.estimator.online_running().clone())
    obj.on_epoch_start(ctx, 1)
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt")
        torch.testing.assert_close(got["centroids"], obj.estimator.centroids, rtol=0, atol=1e-7)
        for a, b in zip(got["running"], running):  # the first epoch's per-step Q too
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    np.testing.assert_allclose(obj.estimator.centroids.numpy(), _np_means(z.numpy(), y.numpy()), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Whole runs: 1 vs 2 processes and resume, with length grouping and online centroids
# --------------------------------------------------------------------------------------------
COMMON = ["task=glue/sst2", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=72", "task.max_eval_samples=40",
          "task.max_length=64", "trainer.epochs=2", "model.dropout=0.0", "trainer.progress_bar=false", "seed=5",
          "trainer.group_by_length=true", "objective=cmi_min", "objective.centroids=online"]


@pytest.mark.slow
def test_length_grouped_online_cmi_run_is_the_same_on_two_processes(cmiexp_env, tmp_path):
    single_env = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(tmp_path / "single"))
    multi_env = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(tmp_path / "multi"))
    run_cli([*COMMON, "trainer.batch_size=32"], single_env)  # 72 rows: global batches 32, 32, 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cmiexp",
           *COMMON, "trainer.batch_size=16"]
    proc = subprocess.run(cmd, env=multi_env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (single_dir,) = find_run_dirs(tmp_path / "single")
    (multi_dir,) = find_run_dirs(tmp_path / "multi")
    single = json.loads((single_dir / "results.json").read_text())
    multi = json.loads((multi_dir / "results.json").read_text())
    assert multi["num_processes"] == 2 and multi["global_step"] == single["global_step"] == 6
    for k in ("loss", "accuracy", "cmi", "gamma"):
        assert multi["final"]["metrics"][k] == pytest.approx(single["final"]["metrics"][k], abs=1e-5), k
    s_sum, m_sum = single["objective_summary"], multi["objective_summary"]
    assert s_sum["centroids"] == "online" and s_sum["centroid_passes"] == m_sum["centroid_passes"] == 0
    np.testing.assert_allclose(m_sum["centroid_rows"], s_sum["centroid_rows"], atol=1e-5)
    s_state = load_file(str(single_dir / "checkpoint" / "latest" / "objective_state.safetensors"))
    m_state = load_file(str(multi_dir / "checkpoint" / "latest" / "objective_state.safetensors"))
    # The last epoch's sums count each of the 72 training rows once (no padding duplicates).
    assert float(s_state["centroids.online"][:, -1].sum()) == float(m_state["centroids.online"][:, -1].sum()) == 72
    # Sums of up to 36 probabilities: fp32 training on 1 vs 2 processes agrees to ~1e-6 relative.
    torch.testing.assert_close(m_state["centroids.online"], s_state["centroids.online"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_online_cmi_run_resumes_exactly_mid_epoch(cmiexp_env, tmp_path):
    args = [a for a in COMMON if not a.startswith("task.max_train_samples")] + [
        "task.max_train_samples=96", "trainer.batch_size=16", "trainer.save_every=2"]
    env = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(tmp_path / "resumed"))
    first = run_cli([*args, "trainer.stop_after_steps=4"], env)  # 6 steps per epoch: stops mid-epoch 0
    assert "stopped after 4 steps" in first.stdout + first.stderr
    run_cli(args, env)
    env2 = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(tmp_path / "straight"))
    run_cli(args, env2)
    (resumed_dir,) = find_run_dirs(tmp_path / "resumed")
    (straight_dir,) = find_run_dirs(tmp_path / "straight")
    res = json.loads((resumed_dir / "results.json").read_text())
    straight = json.loads((straight_dir / "results.json").read_text())
    assert res["status"] == straight["status"] == "completed" and res["global_step"] == 12
    for k in ("loss", "accuracy", "cmi"):
        assert res["final"]["metrics"][k] == pytest.approx(straight["final"]["metrics"][k], abs=1e-6), k
    np.testing.assert_allclose(res["objective_summary"]["centroid_rows"],
                               straight["objective_summary"]["centroid_rows"], atol=1e-6)
