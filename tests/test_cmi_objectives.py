"""objective=cmi_min and objective=mcmi wired into the runner.

Unit level: the full-pass padding mask against accelerate's real BatchSamplerShard, the full
pass against numpy class means (1 process, and 2 real gloo processes through accelerate), the
loss wiring against a numpy computation, EMA updates, config validation, regression refusal.
Run level (real runner, tiny-bert, synthetic task, same seed and steps): cmi_min lowers and
mcmi raises the dev CMI relative to ce; a resumed run reuses its checkpointed centroids.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from cmiexp.data.base import TaskData
from cmiexp.errors import CmiexpError, ConfigError
from cmiexp.objectives import TrainContext, build_objective
from cmiexp.objectives.centroids import CentroidEstimator
from cmiexp.objectives.cmi_objectives import full_pass_centroids, full_pass_valid_mask
from tests.conftest import GLUE_DIR, compose_config, find_run_dirs, run_cli

# All of this module's tests on one xdist worker (pyproject: --dist loadgroup): its module-scoped
# fixtures (trained runs) are built once, not once on each worker that draws one of its tests.
pytestmark = pytest.mark.xdist_group("cmi_objectives")

C, F_DIM = 3, 5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # On a shared 2-core machine, torch's default 2 intra-op threads contend with other processes
    # and make every tiny-bert step ~10x slower; one thread keeps these runs at a few seconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------
def _np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_class_means(p, y, c):
    return np.stack([np.mean([p[i] for i in range(len(y)) if y[i] == k], axis=0) for k in range(c)])


# --------------------------------------------------------------------------------------------
# A toy "model" and dataset for the full pass
# --------------------------------------------------------------------------------------------
def _toy_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, F_DIM, generator=g)
    y = (torch.arange(n) % C)[torch.randperm(n, generator=g)]
    return x, y


class _ToyModel(torch.nn.Module):
    """Linear logits; records whether each forward ran in train mode / with grad enabled."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(F_DIM, C, generator=g) * 2)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return SimpleNamespace(logits=x @ self.w)


def _toy_rows(x, y):
    return [{"x": x[i], "labels": int(y[i]), "idx": i} for i in range(len(y))]


def _toy_reference(x, y):
    with torch.no_grad():
        p = _np_softmax((x @ _ToyModel().w).numpy())
    return _np_class_means(p, y.numpy(), C)


def _fake_accelerator(num_processes=1, process_index=0, reduce=lambda t, op: t):
    return SimpleNamespace(num_processes=num_processes, process_index=process_index, reduce=reduce,
                           device=torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# The padding mask
# --------------------------------------------------------------------------------------------
def test_valid_mask_hand_worked_example():
    # 5 samples, batch 2, 2 processes. Accelerate deals global batches [0,1] [2,3] [4,(pad 0)]
    # round-robin and pads to a multiple of 2 batches: rank 0 sees [0,1] [4,0], rank 1 sees
    # [2,3] [1,2]. Real rows: rank 0 -> TT, TF; rank 1 -> TT, FF.
    want = {(0, 0): [True, True], (0, 1): [True, False], (1, 0): [True, True], (1, 1): [False, False]}
    for (rank, j), mask in want.items():
        assert full_pass_valid_mask(j, rank, 2, 2, 2, 5).tolist() == mask


@pytest.mark.parametrize("n,bs,world", [(5, 2, 2), (23, 4, 2), (24, 4, 2), (3, 4, 2), (10, 3, 3), (7, 2, 4), (9, 4, 1)])
def test_valid_mask_keeps_every_sample_once_under_accelerate_sharding(n, bs, world):
    """Against accelerate's own BatchSamplerShard (what ``prepare`` wraps an unshuffled loader in)."""
    from accelerate.data_loader import BatchSamplerShard

    kept, dropped = [], []
    for rank in range(world):
        sampler = BatchSampler(SequentialSampler(range(n)), bs, drop_last=False)
        shard = BatchSamplerShard(sampler, num_processes=world, process_index=rank) if world > 1 else sampler
        batch_size = None
        for j, idx in enumerate(shard):
            batch_size = batch_size or len(idx)
            mask = full_pass_valid_mask(j, rank, world, batch_size, len(idx), n).tolist()
            kept += [i for i, m in zip(idx, mask) if m]
            dropped += [i for i, m in zip(idx, mask) if not m]
    assert sorted(kept) == list(range(n)), "every training example must be counted exactly once"
    total_seen = len(kept) + len(dropped)
    # The dropped rows are exactly the padding accelerate added (a multiple of world * bs in all).
    assert total_seen == (n if world == 1 else -(-n // (world * bs)) * world * bs)


# --------------------------------------------------------------------------------------------
# The full pass
# --------------------------------------------------------------------------------------------
def test_full_pass_single_process_matches_numpy_and_restores_train_mode():
    x, y = _toy_data(23)
    model = _ToyModel()
    model.train()
    loader = DataLoader(_toy_rows(x, y), batch_size=4, shuffle=False)
    est = CentroidEstimator(C, mode="fixed")
    out = full_pass_centroids(est, model, loader, _fake_accelerator(), 23, input_keys={"x"})
    np.testing.assert_allclose(out.numpy(), _toy_reference(x, y), rtol=0, atol=1e-6)
    assert est.counts.tolist() == [float((y == k).sum()) for k in range(C)]
    assert len(model.calls) == 6 and all(call == (False, False) for call in model.calls), "eval mode, no grad"
    assert model.training, "the model's train mode must be restored"
    assert est.initialized and est.centroids.dtype == torch.float32


def test_full_pass_rejects_a_sharding_it_does_not_understand():
    # A loader that is NOT sharded, but run as rank 0 of 2 whose all-reduce doubles the sums (as
    # if both ranks had seen everything): the count check must catch the wrong total.
    x, y = _toy_data(23)
    loader = DataLoader(_toy_rows(x, y), batch_size=4, shuffle=False)
    acc = _fake_accelerator(num_processes=2, process_index=0, reduce=lambda t, op: t * 2)
    with pytest.raises(CmiexpError, match="counted 24 training examples .* expected 23"):
        full_pass_centroids(CentroidEstimator(C), _ToyModel(), loader, acc, 23, input_keys={"x"})


N_DIST, BS_DIST, WORLD = 23, 4, 2


def _gloo_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    try:
        assert acc.num_processes == world
        x, y = _toy_data(N_DIST)
        loader = acc.prepare(DataLoader(_toy_rows(x, y), batch_size=BS_DIST, shuffle=False))
        model = acc.prepare(_ToyModel())
        est = CentroidEstimator(C, mode="fixed")
        # Which idx each rank's loader yields, to show the padding really happens.
        seen = [int(i) for b in loader for i in b["idx"]]
        full_pass_centroids(est, model, loader, acc, N_DIST, input_keys={"x"})
        torch.save({"centroids": est.centroids, "counts": est.counts, "seen": seen}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_full_pass_through_accelerate_matches_single_process(tmp_path):
    """A real 2-process gloo run: accelerate-prepared unshuffled loader, padded tail, all-reduce."""
    mp.spawn(_gloo_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    seen = res[0]["seen"] + res[1]["seen"]
    assert len(seen) == 24 and sorted(set(seen)) == list(range(N_DIST)), "23 rows padded to 24 across 2 ranks"
    x, y = _toy_data(N_DIST)
    ref = _toy_reference(x, y)
    for r in res:
        np.testing.assert_allclose(r["centroids"].numpy(), ref, rtol=0, atol=1e-6)
        assert r["counts"].tolist() == [float((y == k).sum()) for k in range(C)]
    assert torch.equal(res[0]["centroids"], res[1]["centroids"])


# --------------------------------------------------------------------------------------------
# Objective construction, config validation, loss wiring
# --------------------------------------------------------------------------------------------
def _task(regression=False, num_labels=C, name="toy"):
    return TaskData(name=name, train=None, eval_splits={}, text_fields=("sentence",),
                    label_names=None if regression else [f"c{i}" for i in range(num_labels)],
                    metrics=["accuracy"], primary_metric="accuracy", is_regression=regression)


def _ctx(task, accelerator=None, model=None, loader=None, n=0):
    return TrainContext(accelerator=accelerator or _fake_accelerator(), model=model, task=task, cfg=None,
                        run_dir=None, full_train_loader=loader, num_train_examples=n)


def _objective(name, ctx, **knobs):
    base = OmegaConf.to_container(compose_config([f"objective={name}"]).objective)
    base.update(knobs)
    return build_objective(OmegaConf.create({"objective": base}), ctx)


@pytest.mark.parametrize("name", ["cmi_min", "mcmi"])
def test_regression_task_is_refused(name):
    with pytest.raises(ConfigError, match=rf"objective={name} needs class probabilities.*task=glue/stsb is a regression"):
        _objective(name, _ctx(_task(regression=True, name="glue/stsb")))


def test_regression_task_is_refused_by_the_runner(tmp_path, cache_dir):
    cfg = compose_config(["task=glue/stsb", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=32",
                          "task.max_eval_samples=16", "objective=cmi_min", "trainer.progress_bar=false",
                          f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    from cmiexp.train.runner import run_experiment

    with pytest.raises(ConfigError) as e:
        run_experiment(cfg, tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and "objective=cmi_min" in msg and "glue/stsb" in msg and "regression" in msg


@pytest.mark.parametrize("knob,value,pattern", [
    ("centroids", "weekly", r"objective.centroids='weekly'; valid choices: fixed, epoch, ema"),
    ("lam", -0.1, r"objective.lam=-0.1 must be >= 0.0"),
    ("lam", "big", r"objective.lam='big' must be a number"),
    ("beta", float("nan"), r"objective.beta=nan must be >= 0.0"),
    ("momentum", 1.0, r"objective.momentum=1.0 must be in \[0.0, 1.0\)"),
])
def test_bad_knobs_are_one_line_config_errors(knob, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _objective("cmi_min", _ctx(_task()), **{knob: value})


def test_defaults_from_the_yaml_files():
    cm = _objective("cmi_min", _ctx(_task()))
    assert (cm.lam, cm.beta, cm.mode, cm.momentum) == (0.1, 0.01, "epoch", 0.9)
    mc = _objective("mcmi", _ctx(_task()))
    assert (mc.lam, mc.mode) == (0.15, "fixed") and not hasattr(mc, "beta")
    assert type(cm).requires_classification and type(mc).requires_classification


def _set_centroids(obj, q):
    obj.estimator.centroids = torch.tensor(q, dtype=torch.float32)
    obj.estimator.initialized = True


Z = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.5, 0.2, 1.7], [1.2, 1.1, -0.3], [0.0, -1.0, 0.4]]
Y = [0, 1, 2, 1, 0]
Q = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]]


def _np_terms(z, y, q):
    p = _np_softmax(z)
    lp = np.log(p)
    ce = -np.mean([lp[i, y[i]] for i in range(len(y))])
    kl = np.mean([np.sum(p[i] * (lp[i] - np.log(q[y[i]]))) for i in range(len(y))])
    pairs = [-np.sum(p[i] * lp[j]) for i in range(len(y)) for j in range(len(y)) if y[i] != y[j]]
    return ce, kl, np.mean(pairs)


def test_cmi_min_loss_matches_numpy_and_logs_its_parts():
    obj = _objective("cmi_min", _ctx(_task()), lam=0.3, beta=0.2)
    _set_centroids(obj, Q)
    loss, parts = obj.loss({"labels": torch.tensor(Y)}, SimpleNamespace(logits=torch.tensor(Z)), _ctx(_task()))
    ce, kl, gamma = _np_terms(Z, Y, np.array(Q))
    assert loss.item() == pytest.approx(ce + 0.3 * kl - 0.2 * gamma, abs=1e-5)
    assert parts["ce"] == pytest.approx(ce, abs=1e-5) and parts["kl"] == pytest.approx(kl, abs=1e-5)
    assert parts["lam_kl"] == pytest.approx(0.3 * kl, abs=1e-5) and parts["gamma"] == pytest.approx(gamma, abs=1e-5)
    assert parts["beta_gamma"] == pytest.approx(0.2 * gamma, abs=1e-5)
    # Detached 0-d tensors, read by the loop at log time (no host synchronisation per step).
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in parts.values())
    # epoch mode: the loss never moves the centroids
    assert torch.allclose(obj.estimator.centroids, torch.tensor(Q))


def test_mcmi_loss_matches_numpy_and_pushes_away_from_centroids():
    obj = _objective("mcmi", _ctx(_task()))
    _set_centroids(obj, Q)
    z = torch.tensor(Z, requires_grad=True)
    loss, parts = obj.loss({"labels": torch.tensor(Y)}, SimpleNamespace(logits=z), _ctx(_task()))
    ce, kl, _ = _np_terms(Z, Y, np.array(Q))
    assert loss.item() == pytest.approx(ce - 0.15 * kl, abs=1e-5)
    assert set(parts) == {"ce", "kl", "lam_kl"} and parts["lam_kl"] == pytest.approx(0.15 * kl, abs=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_ema_mode_moves_centroids_towards_the_batch_class_means():
    obj = _objective("cmi_min", _ctx(_task()), centroids="ema", momentum=0.75)
    _set_centroids(obj, Q)
    z = torch.tensor(Z, requires_grad=True)
    obj.loss({"labels": torch.tensor(Y)}, SimpleNamespace(logits=z), _ctx(_task()))
    p = _np_softmax(Z)
    want = np.array(Q, dtype=np.float64)
    for k in range(C):
        rows = [p[i] for i in range(len(Y)) if Y[i] == k]
        want[k] = 0.75 * want[k] + 0.25 * np.mean(rows, axis=0)
    np.testing.assert_allclose(obj.estimator.centroids.numpy(), want, rtol=0, atol=1e-6)
    assert not obj.estimator.centroids.requires_grad


def test_loss_before_any_full_pass_is_a_clear_error():
    obj = _objective("mcmi", _ctx(_task()))
    with pytest.raises(RuntimeError, match="before the centroid full pass"):
        obj.loss({"labels": torch.tensor(Y)}, SimpleNamespace(logits=torch.tensor(Z)), _ctx(_task()))


def test_full_pass_schedule_and_state_round_trip():
    x, y = _toy_data(23)
    model = _ToyModel()
    loader = DataLoader(_toy_rows(x, y), batch_size=5, shuffle=False)
    ctx = _ctx(_task(), model=model, loader=loader, n=23)
    ctx.extra["input_keys"] = {"x"}

    fixed = _objective("mcmi", ctx)
    for epoch in range(3):
        fixed.on_epoch_start(ctx, epoch)
    assert fixed.summary()["centroid_passes"] == 1  # fixed: once, before training
    np.testing.assert_allclose(fixed.estimator.centroids.numpy(), _toy_reference(x, y), atol=1e-6)

    per_epoch = _objective("cmi_min", ctx)
    for epoch in range(3):
        per_epoch.on_epoch_start(ctx, epoch)
    assert per_epoch.summary()["centroid_passes"] == 3 and per_epoch.summary()["centroid_epoch"] == 2

    # The checkpointed state is tensors only and restores the centroids and the schedule.
    state = fixed.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = _objective("mcmi", ctx)
    again.load_state_dict(state)
    assert torch.equal(again.estimator.centroids, fixed.estimator.centroids)
    calls = len(model.calls)
    again.on_epoch_start(ctx, 1)
    assert len(model.calls) == calls, "a restored fixed objective must not recompute its centroids"
    assert again.summary()["centroid_passes"] == 1 and again.summary()["centroid_passes_this_session"] == 0

    resumed = _objective("cmi_min", ctx)
    resumed.load_state_dict(per_epoch.state_dict())
    resumed.on_epoch_start(ctx, 2)  # resumed mid-epoch 2: keep the centroids epoch 2 started with
    assert len(model.calls) == calls
    resumed.on_epoch_start(ctx, 3)  # a new epoch: recompute
    assert len(model.calls) > calls and resumed.summary()["centroid_passes"] == 4


# --------------------------------------------------------------------------------------------
# Real runs (tiny-bert, synthetic task)
# --------------------------------------------------------------------------------------------
# 1200 examples x 2 epochs at batch 16 = 150 steps: enough for ce to learn the task reliably
# (dev accuracy ~0.9) so its outputs have a real within-class spread to compare against.
# The weights are test-sized to make the effects large: lam=2 for cmi_min (CMI ~4x lower than
# ce over seeds 1-3) and lam=1 for mcmi (~2x higher).
EFFECT = ["task.num_train=1200", "task.num_eval=200", "trainer.epochs=2", "trainer.batch_size=16", "seed=1",
          "trainer.progress_bar=false"]
EFFECT_OBJECTIVES = {"ce": ["objective=ce"], "cmi_min": ["objective=cmi_min", "objective.lam=2.0"],
                     # start=pretrained: the loss on an untrained head, at the same steps as ce (the
                     # default start=ce fine-tunes a trained CE model: tests/test_init_from.py).
                     "mcmi": ["objective=mcmi", "objective.lam=1.0", "objective.start=pretrained"]}


def _run(overrides, out: Path, cache: Path, run_dir: Path):
    from cmiexp.train.runner import run_experiment

    cfg = compose_config([*overrides, f"paths.output_dir={out}", f"paths.cache_dir={cache}"])
    return run_experiment(cfg, run_dir)


@pytest.fixture(scope="module")
def effect_runs(tmp_path_factory, cache_dir):
    """Runs each objective once (lazily) with identical data, seed and steps."""
    out = tmp_path_factory.mktemp("cmi-effect")
    done: dict[str, dict] = {}

    def get(name):
        if name not in done:
            done[name] = _run([*EFFECT, *EFFECT_OBJECTIVES[name]], out, cache_dir, out / name)
        return done[name]

    return get


@pytest.mark.slow
def test_cmi_min_lowers_dev_cmi(effect_runs):
    ce, cm = effect_runs("ce"), effect_runs("cmi_min")
    assert ce["status"] == cm["status"] == "completed" and ce["global_step"] == cm["global_step"] == 150
    ce_m, cm_m = ce["final"]["metrics"], cm["final"]["metrics"]
    assert ce_m["accuracy"] > 0.7 and cm_m["accuracy"] > 0.7, (ce_m, cm_m)  # both really learned
    assert cm_m["cmi"] < 0.5 * ce_m["cmi"], (cm_m["cmi"], ce_m["cmi"])
    assert cm["best"]["metrics"]["cmi"] < 0.5 * ce["best"]["metrics"]["cmi"]
    summary = cm["objective_summary"]
    assert summary["objective"] == "cmi_min" and summary["lam"] == 2.0 and summary["beta"] == 0.01
    assert summary["centroids"] == "epoch" and summary["centroid_passes"] == 2  # one per epoch


@pytest.mark.slow
def test_mcmi_raises_dev_cmi(effect_runs):
    ce, mc = effect_runs("ce"), effect_runs("mcmi")
    ce_m, mc_m = ce["final"]["metrics"], mc["final"]["metrics"]
    assert mc["global_step"] == ce["global_step"] == 150 and mc_m["accuracy"] > 0.7, mc_m
    assert mc_m["cmi"] > 1.3 * ce_m["cmi"], (mc_m["cmi"], ce_m["cmi"])
    summary = mc["objective_summary"]
    assert summary["objective"] == "mcmi" and summary["lam"] == 1.0
    assert summary["centroids"] == "fixed" and summary["centroid_passes"] == 1


RESUME = ["task.num_train=48", "task.num_eval=48", "trainer.epochs=2", "trainer.batch_size=16",
          "trainer.eval_batch_size=16", "trainer.save_every=2", "trainer.progress_bar=false"]


def _objective_state(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoint" / "latest" / "objective_state.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("objective,passes_total,passes_after_resume", [("mcmi", 1, 0), ("cmi_min", 2, 1)])
def test_resume_restores_centroids(objective, passes_total, passes_after_resume, tmp_path, cache_dir):
    # 48 examples / batch 16 = 3 steps per epoch, 6 in all; the first attempt stops mid-epoch 0.
    run_dir = tmp_path / "run"
    # objective.start=pretrained: resuming the MCMI stage itself (its CE start is another run).
    RESUME_O = [*RESUME, *(["objective.start=pretrained"] if objective == "mcmi" else [])]
    first = _run([*RESUME_O, f"objective={objective}", "trainer.stop_after_steps=2"], tmp_path, cache_dir, run_dir)
    assert first["status"] == "interrupted" and first["global_step"] == 2
    saved = _objective_state(run_dir)
    assert int(saved["centroid_passes"]) == 1 and int(saved["centroid_epoch"]) == 0
    assert int(saved["centroids.initialized"]) == 1 and saved["centroids.centroids"].shape == (3, 3)
    np.testing.assert_allclose(saved["centroids.centroids"].sum(1).numpy(), 1.0, atol=1e-5)

    res = _run([*RESUME_O, f"objective={objective}"], tmp_path, cache_dir, run_dir)
    assert res["status"] == "completed" and res["global_step"] == 6
    summary = res["objective_summary"]
    assert summary["centroid_passes"] == passes_total
    assert summary["centroid_passes_this_session"] == passes_after_resume
    final = _objective_state(run_dir)
    # The same run without the interruption ends with the same centroids and metrics.
    straight = _run([*RESUME_O, f"objective={objective}"], tmp_path, cache_dir, tmp_path / "straight")
    assert straight["objective_summary"]["centroid_passes"] == passes_total
    torch.testing.assert_close(_objective_state(tmp_path / "straight")["centroids.centroids"],
                               final["centroids.centroids"], rtol=0, atol=1e-6)
    for key in ("accuracy", "cmi", "loss"):
        assert straight["final"]["metrics"][key] == pytest.approx(res["final"]["metrics"][key], abs=1e-6)
    if objective == "mcmi":  # fixed: the very same centroids, never recomputed
        assert torch.equal(final["centroids.centroids"], saved["centroids.centroids"])
    else:  # epoch: epoch 0 kept its centroids on resume, epoch 1 computed new ones
        assert int(final["centroid_epoch"]) == 1
        assert not torch.equal(final["centroids.centroids"], saved["centroids.centroids"])


# --------------------------------------------------------------------------------------------
# Experiment overlays
# --------------------------------------------------------------------------------------------
GLUE8 = ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli"]


@pytest.mark.parametrize("experiment,name,objective", [("cmi_glue", "cmi_glue", "cmi_min"),
                                                        ("mcmi_kd_teachers", "mcmi_kd", "mcmi")])
def test_experiment_overlays_compose_for_the_whole_grid(experiment, name, objective):
    from hydra import compose, initialize_config_dir

    from cmiexp.config import CONF_DIR

    # Every task of the sweep with the experiment's CMI objective, plus the ce baseline once.
    grid = [(task, objective) for task in GLUE8] + [("rte", "ce")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfgs = {(task, obj): OmegaConf.to_container(compose(config_name="config", overrides=[
            f"experiment={experiment}", f"task=glue/{task}", f"objective={obj}"]), resolve=True) for task, obj in grid}
        default_objective = compose(config_name="config", overrides=[f"experiment={experiment}"]).objective.name
    for (task, obj), cfg in cfgs.items():
        assert cfg["experiment_name"] == name and cfg["task"]["name"] == f"glue/{task}"
        assert cfg["objective"]["name"] == obj and cfg["model"]["name"] == "bert-base-uncased"
        t = cfg["trainer"]
        assert (t["lr"], t["batch_size"], t["epochs"], t["warmup_ratio"]) == (2e-5, 32, 3, 0.1)
        assert cfg["task"]["max_length"] == 128
    # Without objective=..., the teacher overlay trains the max-CMI teacher; cmi_glue keeps ce.
    assert default_objective == ("mcmi" if experiment == "mcmi_kd_teachers" else "ce")


@pytest.mark.parametrize("experiment", ["cmi_glue", "mcmi_kd_teachers", "mcmi_kd"])
@pytest.mark.parametrize("model,lr", [("tiny-bert", 1e-3), ("tiny-distilbert", 1e-3),
                                      ("bert-base-uncased", 2e-5), ("distilbert-base-uncased", 5e-5)])
def test_experiment_overlays_keep_the_models_learning_rate(experiment, model, lr):
    """An overlay sets the recipe, not the lr: trainer.lr stays the named model's own (issue 14, item 2)."""
    cfg = compose_config([f"experiment={experiment}", f"model={model}"])
    assert cfg.trainer.lr == lr and cfg.model.name == model


@pytest.mark.slow
def test_mcmi_teacher_experiment_runs_from_the_command_line(cmiexp_env, output_dir):
    env = dict(cmiexp_env, OMP_NUM_THREADS="1")
    proc = run_cli(["experiment=mcmi_kd_teachers", "task=glue/rte", f"task.data_dir={GLUE_DIR}", "model=tiny-bert",
                    "task.max_train_samples=64", "task.max_eval_samples=32", "trainer.max_steps=2",
                    "trainer.progress_bar=false"], env)
    # The chain: a CE run with the same settings (2 steps) first, in the teachers folder, then 1 epoch of MCMI.
    run_dir, start = find_run_dirs(output_dir)
    assert start.relative_to(output_dir).parts[:5] == ("teachers", "glue", "rte", "tiny-bert", "ce")
    assert f"training it first (objective=ce, this run's settings) into {start}" in proc.stdout
    assert json.loads((start / "results.json").read_text())["global_step"] == 2
    assert run_dir.relative_to(output_dir).parts[:6] == ("runs", "mcmi_kd", "glue", "rte", "tiny-bert", "mcmi")
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["experiment"] == "mcmi_kd" and res["objective"] == "mcmi"
    assert res["init_from"] == str(start) and res["global_step"] == 2  # finetune_epochs=1: 64 rows / batch 32
    assert res["objective_summary"]["lam"] == 0.15 and res["objective_summary"]["centroid_passes"] == 1
    assert math.isfinite(res["final"]["metrics"]["cmi"])
