"""objective=kd: the loss against hand-worked values, teacher configs, reuse, the logit cache, errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cmiexp.errors import ConfigError, DataError
from cmiexp.objectives.kd import kd_loss
from tests.conftest import GLUE_DIR, compose_config, run_cli, warm_children

# All of this module's tests on one xdist worker (pyproject: --dist loadgroup): its module-scoped
# fixtures (trained runs) are built once, not once on each worker that draws one of its tests.
pytestmark = pytest.mark.xdist_group("kd")

# ---------------------------------------------------------------------------------------------
# The loss (pure)
# ---------------------------------------------------------------------------------------------
S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
Y = [1, 2]
CE_GOLD = 0.2651263439326872  # mean of -log softmax(s)[y]
# KL(softmax(t/T) || softmax(s/T)), batch mean, written out by hand (math.exp/log loops):
KL_GOLD = {4.0: 0.05965750908927328, 2.0: 0.23951965412124243, 1.0: 0.8664324831105251}


def _numpy_kd(s, t, y, alpha, temp):
    """An independent KD loss: explicit numpy loops over rows and classes."""
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    ce = kl = 0.0
    for i in range(len(s)):
        ls = s[i] - np.log(np.sum(np.exp(s[i])))
        ce -= ls[y[i]]
        ps_t = np.exp(s[i] / temp) / np.sum(np.exp(s[i] / temp))
        pt_t = np.exp(t[i] / temp) / np.sum(np.exp(t[i] / temp))
        for c in range(len(s[i])):
            kl += pt_t[c] * (np.log(pt_t[c]) - np.log(ps_t[c]))
    ce, kl = ce / len(s), kl / len(s)
    return (1 - alpha) * ce + alpha * temp**2 * kl, ce, kl


@pytest.mark.parametrize("temp", [4.0, 2.0, 1.0])
@pytest.mark.parametrize("alpha", [0.9, 0.5, 0.0, 1.0])
def test_kd_loss_matches_golden_values(temp, alpha):
    loss, parts = kd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), alpha=alpha, temperature=temp)
    expected = (1 - alpha) * CE_GOLD + alpha * temp**2 * KL_GOLD[temp]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["supervised"].item() == pytest.approx(CE_GOLD, rel=1e-6)
    assert parts["distill"].item() == pytest.approx(temp**2 * KL_GOLD[temp], rel=1e-6)  # the T^2 factor
    ref, ce, kl = _numpy_kd(S, T, Y, alpha, temp)
    assert (ce, kl) == (pytest.approx(CE_GOLD, rel=1e-12), pytest.approx(KL_GOLD[temp], rel=1e-12))
    assert loss.item() == pytest.approx(ref, rel=1e-6)


def test_kd_loss_defaults_value():
    # The documented defaults T=4, alpha=0.9: 0.1 * 0.26513 + 0.9 * 16 * 0.059658 = 0.88558
    loss, _ = kd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), alpha=0.9, temperature=4.0)
    assert loss.item() == pytest.approx(0.8855807652788039, rel=1e-6)


def test_kd_loss_regression_uses_mse_to_teacher():
    s, t, y = [[0.5], [2.0], [-1.0]], [[1.0], [1.5], [0.0]], [0.0, 2.5, -0.5]
    # MSE(y, s) = (0.25+0.25+0.25)/3 = 0.25; MSE(t, s) = (0.25+0.25+1)/3 = 0.5; 0.1*0.25 + 0.9*0.5 = 0.475
    loss, parts = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=0.9, temperature=4.0,
                          is_regression=True)
    assert loss.item() == pytest.approx(0.475, rel=1e-6)
    assert parts["supervised"].item() == pytest.approx(0.25) and parts["distill"].item() == pytest.approx(0.5)


def test_kd_loss_fp32_from_half_logits_and_teacher_gets_no_gradient():
    s = (torch.tensor(S) * 40).to(torch.bfloat16).requires_grad_(True)
    t = (torch.tensor(T) * 40).to(torch.bfloat16).requires_grad_(True)
    loss, _ = kd_loss(s, t, torch.tensor(Y), alpha=0.9, temperature=4.0)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad.float()).all() and t.grad is None


# ---------------------------------------------------------------------------------------------
# Teacher configs, hashing and the idx lookup (no training)
# ---------------------------------------------------------------------------------------------
def test_split_teacher_config():
    from cmiexp.objectives.kd.teacher import split_teacher_config

    groups, values = split_teacher_config(
        {"objective": {"name": "mcmi", "lam": 0.2}, "model": "tiny-bert", "trainer": {"epochs": 1}, "seed": 3})
    assert groups == ["objective=mcmi", "model=tiny-bert"]
    assert values == [("objective.lam", 0.2), ("trainer.epochs", 1), ("seed", 3)]
    with pytest.raises(ConfigError, match="objective.teacher_config.task is not allowed"):
        split_teacher_config({"task": "glue/mrpc"})


def _student(*extra):
    return compose_config(["objective=kd", "model=tiny-distilbert", "task=glue/rte", f"task.data_dir={GLUE_DIR}",
                           "task.max_train_samples=128", "paths.output_dir=/tmp/unused-kd-out",
                           "objective.teacher_config={model: tiny-bert, objective: ce}", *extra])


def _teacher_dir(student):
    from omegaconf import OmegaConf

    from cmiexp.objectives.kd.teacher import compose_teacher_config, teacher_dir

    return teacher_dir(compose_teacher_config(student, OmegaConf.to_container(student.objective.teacher_config)))


def test_teacher_dir_is_a_hash_of_what_the_teacher_trains():
    base = _teacher_dir(_student())
    assert base.parent == Path("/tmp/unused-kd-out/teachers/glue/rte/tiny-bert/ce") and len(base.name) == 12
    # Student-only settings and run-reporting keys do not change the teacher ...
    assert _teacher_dir(_student("seed=5", "trainer.lr=1e-4", "trainer.progress_bar=false")) == base
    # ... but anything the teacher trains with does.
    assert _teacher_dir(_student("+objective.teacher_config.seed=2")) != base
    assert _teacher_dir(_student("+objective.teacher_config.trainer={epochs: 1}")) != base
    assert _teacher_dir(_student("task.max_train_samples=64")) != base  # the task is the student's
    other = _teacher_dir(_student("objective.teacher_config={model: tiny-bert, objective: mcmi}"))
    assert other.parent.name == "mcmi"


def test_teacher_config_errors_name_the_key():
    from cmiexp.objectives.kd.teacher import compose_teacher_config

    s = _student()
    with pytest.raises(ConfigError, match="objective.teacher_config.trainer.epochz"):
        compose_teacher_config(s, {"objective": "ce", "trainer": {"epochz": 1}})
    with pytest.raises(ConfigError, match="objective/nope"):
        compose_teacher_config(s, {"objective": "nope"})


def test_logit_cache_lookup_by_idx():
    from cmiexp.objectives.kd.logit_cache import LogitCache, index_map

    cache = LogitCache(torch.tensor([7, 2, 5]), torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]))
    assert cache(torch.tensor([5, 7, 2, 7])).tolist() == [[4.0, 5.0], [0.0, 1.0], [2.0, 3.0], [0.0, 1.0]]
    with pytest.raises(DataError, match=r"idx \[3\]"):
        cache(torch.tensor([2, 3]))
    with pytest.raises(DataError, match="duplicate idx"):
        index_map(torch.tensor([1, 1, 2]))


def _fake_checkpoint(path: Path, num_labels: int, id2label=None, problem_type=None) -> Path:
    path.mkdir(parents=True)
    cfg = {"model_type": "bert", "num_labels": num_labels}
    cfg["id2label"] = id2label or {str(i): f"LABEL_{i}" for i in range(num_labels)}
    if problem_type:
        cfg["problem_type"] = problem_type
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_incompatible_checkpoints_are_refused(tmp_path):
    from cmiexp.objectives.kd.teacher import check_compatible, load_teacher_info

    rte = SimpleNamespace(name="glue/rte", num_labels=2, is_regression=False,
                          label_names=["entailment", "not_entailment"])
    three = load_teacher_info(_fake_checkpoint(tmp_path / "three", 3))
    with pytest.raises(ConfigError, match="has 3 output labels, but task=glue/rte has 2"):
        check_compatible(three, rte)
    named = load_teacher_info(_fake_checkpoint(tmp_path / "named", 2, {"0": "negative", "1": "positive"}))
    with pytest.raises(ConfigError, match=r"predicts labels \['negative', 'positive'\]"):
        check_compatible(named, rte)
    reg = load_teacher_info(_fake_checkpoint(tmp_path / "reg", 1, {"0": "score"}, "regression"))
    with pytest.raises(ConfigError, match="is a regression model"):
        check_compatible(reg, rte)
    generic = load_teacher_info(_fake_checkpoint(tmp_path / "generic", 2))
    check_compatible(generic, rte)  # generic label names and no run metadata: nothing to object to
    with pytest.raises(ConfigError, match="holds no teacher checkpoint"):
        load_teacher_info(tmp_path)
    with pytest.raises(ConfigError, match="objective.teacher=.*no such file"):
        load_teacher_info(tmp_path / "missing")


def test_regression_teacher_must_share_the_target_scale(tmp_path):
    from cmiexp.objectives.kd.teacher import check_compatible, load_teacher_info

    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoint" / "best", 1, {"0": "score"}, "regression")
    (run / "config.yaml").write_text("task: {name: glue/stsb}\nmodel: {name: tiny-bert}\nobjective: {name: ce}\n")
    scale = {"method": "zscore", "shift": 2.5, "scale": 1.5}
    (run / "results.json").write_text(json.dumps({"status": "completed", "task": "glue/stsb", "target_scale": scale}))
    info = load_teacher_info(run)
    assert (info.task, info.model, info.objective, info.is_regression) == ("glue/stsb", "tiny-bert", "ce", True)
    stsb = SimpleNamespace(name="glue/stsb", num_labels=1, is_regression=True, label_names=None, extra={})
    with pytest.raises(ConfigError, match="regression targets scaled"):
        check_compatible(info, stsb)
    check_compatible(info, SimpleNamespace(**{**vars(stsb), "extra": {"target_scale": dict(scale)}}))


# ---------------------------------------------------------------------------------------------
# Real runs (in-process: imports once): on-demand teacher, reuse, cached == online
# ---------------------------------------------------------------------------------------------
SMALL = ["task.max_train_samples=128", "task.max_eval_samples=64", "task.max_length=64", "trainer.epochs=1",
         "trainer.progress_bar=false", f"task.data_dir={GLUE_DIR}"]
TEACHER_CFG = "objective.teacher_config={model: tiny-bert, objective: ce}"


@pytest.fixture(scope="module")
def kd_runs(tmp_path_factory, cache_dir):
    """One teacher (trained on demand by the first student) and three students on RTE."""
    from cmiexp.train.runner import run_experiment

    out = tmp_path_factory.mktemp("kd-out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared CPU, and results are unchanged
    old_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    common = ["objective=kd", "model=tiny-distilbert", "task=glue/rte", *SMALL, f"paths.output_dir={out}",
              f"paths.cache_dir={cache_dir}"]
    try:
        runs = {"out": out}
        with warm_children():
            runs["cached0"] = run_experiment(compose_config([*common, TEACHER_CFG, "seed=0"]), out / "cached0")
        teacher = Path(runs["cached0"]["objective_summary"]["teacher"]["dir"])
        cache = Path(runs["cached0"]["objective_summary"]["cache_file"])
        runs["teacher"], runs["cache"] = teacher, cache
        runs["stamps"] = {p: p.stat().st_mtime_ns for p in (teacher / "results.json", cache,
                                                             teacher / "checkpoint/best/model.safetensors")}
        runs["cached1"] = run_experiment(compose_config([*common, TEACHER_CFG, "seed=1"]), out / "cached1")
        runs["online0"] = run_experiment(
            compose_config([*common, f"objective.teacher={teacher}", "objective.teacher_cache=false", "seed=0"]),
            out / "online0")
        runs["common"] = common
        yield runs
    finally:
        torch.set_num_threads(threads)
        for k, v in old_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_teacher_is_trained_once_and_reused(kd_runs):
    out, teacher = kd_runs["out"], kd_runs["teacher"]
    teachers = sorted(p.parent for p in (out / "teachers").rglob("results.json"))
    assert teachers == [teacher]
    assert teacher.relative_to(out / "teachers").parts[:4] == ("glue", "rte", "tiny-bert", "ce")
    res = json.loads((teacher / "results.json").read_text())
    assert res["status"] == "completed" and res["model"] == "tiny-bert" and res["objective"] == "ce"
    assert res["task"] == "glue/rte" and res["num_train_samples"] == 128  # the student's task settings
    assert res["overrides"] == ["model=tiny-bert", "objective=ce"]  # its own, not the student's
    spec = json.loads((teacher / "teacher_spec.json").read_text())
    assert spec["hash"] == teacher.name
    s0, s1 = kd_runs["cached0"]["objective_summary"], kd_runs["cached1"]["objective_summary"]
    assert s0["teacher"]["source"] == "trained" and s0["cache_built"] is True and s0["cache_build_s"] > 0
    assert s1["teacher"]["source"] == "reused" and s1["cache_built"] is False
    assert s1["cache_file"] == s0["cache_file"] == str(kd_runs["cache"])
    assert kd_runs["cache"].parent == teacher / "kd_cache"  # the cache lives with the teacher
    # The second student touched neither the teacher nor its logit cache.
    assert {p: p.stat().st_mtime_ns for p in kd_runs["stamps"]} == kd_runs["stamps"]
    from safetensors.torch import load_file

    cache = load_file(str(kd_runs["cache"]))
    assert sorted(cache["idx"].tolist()) == sorted(set(cache["idx"].tolist())) and len(cache["idx"]) == 128
    assert cache["logits"].shape == (128, 2) and cache["logits"].dtype == torch.float32
    for r in (kd_runs["cached0"], kd_runs["cached1"]):
        assert r["status"] == "completed" and r["objective"] == "kd"
        assert (r["teacher_objective"], r["teacher_model"]) == ("ce", "tiny-bert")
        assert r["objective_summary"]["relative_cost_vs_ce_estimate"] >= 1.0
        assert r["objective_summary"]["teacher_s_per_epoch"] >= 0.0


@pytest.mark.slow
def test_cached_teacher_matches_online_teacher(kd_runs):
    cached, online = kd_runs["cached0"], kd_runs["online0"]
    assert online["objective_summary"]["teacher_cache"] is False
    assert online["objective_summary"]["teacher"]["source"] == "path"
    assert online["objective_summary"]["teacher_s_per_epoch"] > 0
    # Teacher objective/model of a path teacher are read from its run (not from the config).
    assert (online["teacher_objective"], online["teacher_model"]) == ("ce", "tiny-bert")
    # A path teacher and the same teacher given as a config are named alike (results.json and folder).
    teacher = kd_runs["teacher"]
    named = {"objective": "ce", "hash": teacher.name[:8], "run_dir": str(teacher.resolve())}
    assert online["teacher"] == cached["teacher"] == named
    path_cfg = compose_config([*kd_runs["common"], f"objective.teacher={teacher}"], return_hydra_config=True)
    assert str(path_cfg.hydra.run.dir).endswith(f"-from-ce-{teacher.name[:8]}")
    a, b = cached["best"]["metrics"], online["best"]["metrics"]
    assert a["accuracy"] == b["accuracy"] and a["num_samples"] == b["num_samples"] == 64
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
    assert cached["global_step"] == online["global_step"] == 4


@pytest.mark.slow
def test_teacher_for_another_task_is_refused_before_training(kd_runs, tmp_path):
    from cmiexp.train.runner import run_experiment

    common = [c.replace("task=glue/rte", "task=glue/wnli") for c in kd_runs["common"]]
    run_dir = tmp_path / "wnli"
    with pytest.raises(ConfigError, match=r"was trained on task=glue/rte, but the student runs task=glue/wnli"):
        run_experiment(compose_config([*common, f"objective.teacher={kd_runs['teacher']}"]), run_dir)
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoint").exists()


@pytest.mark.slow
def test_missing_teacher_path_exits_1_before_training(cmiexp_env, output_dir, cache_dir):
    env = dict(cmiexp_env, OMP_NUM_THREADS="1")
    proc = run_cli(["objective=kd", "model=tiny-distilbert", "task=glue/rte", *SMALL,
                    "objective.teacher=/nonexistent/teacher-run"], env, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("cmiexp: error: objective.teacher=/nonexistent/teacher-run: no such file"), err
    assert not list(output_dir.rglob("metrics.jsonl")) and not list(output_dir.rglob("checkpoint"))
    (res,) = list(output_dir.rglob("results.json"))
    assert json.loads(res.read_text())["status"] == "failed"


@pytest.mark.slow
def test_regression_kd_end_to_end(kd_runs, tmp_path):
    """STS-B: one-output teacher cache and the MSE distillation term in a real run."""
    from cmiexp.train.runner import run_experiment

    common = [c for c in kd_runs["common"] if not c.startswith(("task=", "task.max_train", "task.max_eval"))]
    res = run_experiment(compose_config([*common, "task=glue/stsb", "task.max_train_samples=64",
                                         "task.max_eval_samples=32", TEACHER_CFG]), tmp_path / "stsb")
    assert res["status"] == "completed" and res["task_type"] == "regression"
    from safetensors.torch import load_file

    cache = load_file(res["objective_summary"]["cache_file"])
    assert cache["logits"].shape == (64, 1) and torch.isfinite(cache["logits"]).all()
    assert math.isfinite(res["best"]["metrics"]["pearson"])


@pytest.mark.parametrize("override, message", [
    ("objective.alpha=1.5", "objective.alpha"),
    ("objective.temperature=0", "objective.temperature=0 must be a positive number"),
    ("objective.teacher_cache=maybe", "objective.teacher_cache='maybe' must be true or false"),
    ("objective.teacher=null", "objective=kd needs a teacher"),
])
def test_kd_settings_are_checked_before_the_teacher_is_loaded(override, message):
    from cmiexp.objectives.kd.objective import check_kd_settings

    cfg = compose_config(["objective=kd", "objective.teacher=/some/run", override])
    with pytest.raises(ConfigError) as e:
        check_kd_settings(cfg.objective)
    assert message in str(e.value)
    assert check_kd_settings(compose_config(["objective=kd", "objective.teacher=/some/run"]).objective) == (
        pytest.approx(compose_config(["objective=kd"]).objective.alpha),
        pytest.approx(compose_config(["objective=kd"]).objective.temperature))
