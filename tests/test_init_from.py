"""trainer.init_from and objective=mcmi fine-tuning a trained CE model (issue 14, item 1), with the
acceptance run on ../shared SST-2: MCMI from a trained CE run raises dev CMI, cmi_min lowers it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cmiexp.errors import ConfigError
from tests.conftest import GLUE_DIR, compose_config, warm_children

# All of this module's tests on one xdist worker (pyproject: --dist loadgroup): its module-scoped
# fixtures (trained runs) are built once, not once on each worker that draws one of its tests.
pytestmark = pytest.mark.xdist_group("init_from")


# ---------------------------------------------------------------------------------------------
# Configs (compose only, no training)
# ---------------------------------------------------------------------------------------------
def _kd_student(teacher_objective: str):
    return compose_config(["experiment=mcmi_kd", "task=glue/rte", "model=tiny-distilbert",
                           "objective.teacher_config.model=tiny-bert", "objective.teacher_config.trainer.epochs=1",
                           f"objective.teacher_config.objective={teacher_objective}", f"task.data_dir={GLUE_DIR}",
                           "task.max_train_samples=64", "paths.output_dir=/tmp/unused-init-out"])


def _teacher_cfg(student):
    from cmiexp.objectives.kd.teacher import compose_teacher_config

    return compose_teacher_config(student, OmegaConf.to_container(student.objective.teacher_config))


def test_mcmi_teacher_starts_from_the_ce_teacher_of_the_same_kd_experiment():
    """The chain CE teacher -> MCMI fine-tune -> KD students shares the CE run by content hash."""
    from cmiexp.objectives.kd.teacher import teacher_dir
    from cmiexp.train.init_from import start_run_config

    mcmi = _teacher_cfg(_kd_student("mcmi"))
    ce = _teacher_cfg(_kd_student("ce"))
    assert mcmi.objective.name == "mcmi" and mcmi.objective.start == "ce"
    start = start_run_config(mcmi)
    assert start.objective.name == "ce" and start.trainer.init_from is None
    assert start.trainer.epochs == 1 and start.model.name == "tiny-bert"
    assert teacher_dir(start) == teacher_dir(ce)
    assert teacher_dir(start).parts[-4:-1] == ("rte", "tiny-bert", "ce")
    # start_config changes the CE run (so its hash); task/model/objective cannot be changed.
    other = mcmi.copy()
    other.objective.start_config = {"trainer": {"epochs": 2}}
    assert start_run_config(other).trainer.epochs == 2 and teacher_dir(start_run_config(other)) != teacher_dir(ce)
    for bad, match in ([{"task": {"name": "x"}}, "objective.start_config.task is not allowed"],
                       [{"trainer.epochz": 1}, "objective.start_config.trainer.epochz: not a key"]):
        other.objective.start_config = bad
        with pytest.raises(ConfigError, match=match):
            start_run_config(other)


def test_objective_start_choices_and_schedule_keys_are_checked(tmp_path):
    from cmiexp.train.init_from import prepare_start

    cfg = compose_config(["objective=mcmi", "objective.start=bogus"])
    with pytest.raises(ConfigError, match=r"objective.start='bogus'; valid choices: ce, pretrained"):
        prepare_start(cfg, tmp_path)
    cfg = compose_config(["objective=mcmi", "objective.finetune_epochs=0"])
    with pytest.raises(ConfigError, match=r"objective.finetune_epochs=0 must be positive"):
        prepare_start(cfg, tmp_path)
    # pretrained (the old behaviour) and an explicit trainer.init_from leave the config alone.
    cfg = compose_config(["objective=mcmi", "objective.start=pretrained"])
    assert prepare_start(cfg, tmp_path) is cfg
    cfg = compose_config(["objective=mcmi", f"trainer.init_from={tmp_path}"])
    assert prepare_start(cfg, tmp_path) is cfg


def test_init_from_a_missing_or_unfinished_run_names_the_key(tmp_path, cache_dir):
    from cmiexp.train.runner import run_experiment

    base = ["task.num_train=32", "task.num_eval=16", "trainer.max_steps=1", "trainer.progress_bar=false",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    with pytest.raises(ConfigError, match=r"^trainer.init_from=/nonexistent: no such file or directory"):
        run_experiment(compose_config([*base, "trainer.init_from=/nonexistent"]), tmp_path / "a")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match=r"trainer.init_from=.*unfinished holds no teacher checkpoint .*finished"):
        run_experiment(compose_config([*base, f"trainer.init_from={tmp_path / 'unfinished'}"]), tmp_path / "b")
    assert not (tmp_path / "a" / "checkpoint").exists() and not (tmp_path / "b" / "checkpoint").exists()


# ---------------------------------------------------------------------------------------------
# Acceptance: ../shared SST-2, tiny-bert, seed 0, 3000 training rows, 400 dev rows.
# CE run A (2 epochs, 188 steps) is trained on demand by objective=mcmi (objective.start=ce), which
# then fine-tunes it for 1 epoch (94 steps). At matched steps it is compared with CE fine-tuned from A
# for the same 94 steps, and cmi_min (2 epochs from the pretrained model) with A itself (188 steps).
# The weights are test-sized to make the effects large: lam=1 for mcmi, lam=2 for cmi_min.
# ---------------------------------------------------------------------------------------------
SST2 = ["task=glue/sst2", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=3000", "task.max_eval_samples=400",
        "task.max_length=64", "trainer.epochs=2", "trainer.progress_bar=false", "seed=0"]


@pytest.fixture(scope="module")
def sst2_runs(tmp_path_factory, cache_dir):
    from cmiexp.train.runner import run_experiment

    out = tmp_path_factory.mktemp("init-from")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    handler = _ListHandler()
    logger = logging.getLogger("cmiexp")
    level = logger.level
    logger.setLevel(logging.INFO)  # the console lines a user sees
    logger.addHandler(handler)
    common = [*SST2, f"paths.output_dir={out}", f"paths.cache_dir={cache_dir}"]
    try:
        runs = {"out": out, "common": common}
        with warm_children():  # mcmi trains its CE starting model in a child process
            runs["mcmi"] = run_experiment(compose_config([*common, "objective=mcmi", "objective.lam=1.0"]), out / "mcmi")
        runs["log"] = list(handler.lines)
        runs["A_dir"] = Path(runs["mcmi"]["init_from"])
        runs["A"] = json.loads((runs["A_dir"] / "results.json").read_text())
        runs["ce_cont"] = run_experiment(compose_config(
            [*common, "objective=ce", f"trainer.init_from={runs['A_dir']}", "trainer.epochs=1"]), out / "ce_cont")
        runs["cmi_min"] = run_experiment(compose_config([*common, "objective=cmi_min", "objective.lam=2.0"]),
                                         out / "cmi_min")
        # The numbers behind the assertions (pytest -s shows them; README quotes one such run).
        for name in ("A", "mcmi", "ce_cont", "cmi_min"):
            r = runs[name]
            print(f"sst2-acceptance {name}: steps {r['global_step']}, final acc {_m(r)['accuracy']:.4f} cmi "
                  f"{_m(r)['cmi']:.4f}, best (step {r['best']['step']}) acc {_m(r, 'best')['accuracy']:.4f} cmi "
                  f"{_m(r, 'best')['cmi']:.4f}")
        yield runs
    finally:
        torch.set_num_threads(threads)
        logger.removeHandler(handler)
        logger.setLevel(level)


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _m(res: dict, which: str = "final") -> dict:
    return res[which]["metrics"]


@pytest.mark.slow
def test_mcmi_trains_its_ce_starting_model_first_and_says_so(sst2_runs):
    out, a_dir, a, mc = sst2_runs["out"], sst2_runs["A_dir"], sst2_runs["A"], sst2_runs["mcmi"]
    assert a_dir.parent == out / "teachers" / "glue" / "sst2" / "tiny-bert" / "ce" and len(a_dir.name) == 12
    assert a["status"] == "completed" and a["objective"] == "ce" and a["global_step"] == 188
    assert a["num_train_samples"] == 3000 and a["init_from"] is None
    assert any("training it first (objective=ce" in line and str(a_dir) in line for line in sst2_runs["log"])
    assert mc["status"] == "completed" and mc["objective"] == "mcmi" and mc["global_step"] == 94  # finetune_epochs=1
    cfg = OmegaConf.load(Path(mc["run_dir"]) / "config.yaml")
    assert cfg.trainer.init_from == str(a_dir) and cfg.trainer.epochs == 1
    # A second MCMI run with the same settings finds the CE run by its hash and trains nothing.
    from cmiexp.train.init_from import prepare_start

    stamp = (a_dir / "checkpoint" / "best" / "model.safetensors").stat().st_mtime_ns
    again = prepare_start(compose_config([*sst2_runs["common"], "objective=mcmi", "objective.lam=0.5"]),
                          out / "mcmi-again")
    assert again.trainer.init_from == str(a_dir)
    assert (a_dir / "checkpoint" / "best" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_mcmi_from_a_trained_ce_run_has_class_dependent_centroids_and_higher_dev_cmi(sst2_runs):
    a, mc, cont = sst2_runs["A"], sst2_runs["mcmi"], sst2_runs["ce_cont"]
    rows = torch.tensor(mc["objective_summary"]["centroid_rows"])
    # Q_y from the trained CE model: each class's centroid leans towards its own class.
    assert rows.shape == (2, 2) and bool((rows.diagonal() > 0.6).all()), rows
    assert mc["objective_summary"]["centroid_spread"] > 0.5
    assert cont["global_step"] == mc["global_step"] == 94 and cont["init_from"] == str(sst2_runs["A_dir"])
    assert _m(mc)["accuracy"] > 0.65 and _m(cont)["accuracy"] > 0.65  # both still solve the task
    assert mc["collapsed"] is False and cont["collapsed"] is False and sst2_runs["A"]["collapsed"] is False
    # Matched steps (94 after A): MCMI ends with a clearly higher dev CMI than CE, and than A.
    assert _m(mc)["cmi"] > 1.2 * _m(cont)["cmi"], (_m(mc)["cmi"], _m(cont)["cmi"])
    assert _m(mc)["cmi"] > 1.2 * _m(a)["cmi"], (_m(mc)["cmi"], _m(a)["cmi"])
    # The checkpoints kept as KD teachers (best dev accuracy) show it too.
    assert _m(mc, "best")["cmi"] > _m(a, "best")["cmi"]


@pytest.mark.slow
def test_cmi_min_ends_with_lower_dev_cmi_than_ce_at_matched_steps(sst2_runs):
    a, cm = sst2_runs["A"], sst2_runs["cmi_min"]
    assert cm["global_step"] == a["global_step"] == 188
    assert _m(cm)["accuracy"] > 0.65 and _m(a)["accuracy"] > 0.65 and cm["collapsed"] is False
    assert _m(cm)["cmi"] < 0.5 * _m(a)["cmi"], (_m(cm)["cmi"], _m(a)["cmi"])
    assert _m(cm, "best")["cmi"] < _m(a, "best")["cmi"]


@pytest.mark.slow
def test_init_from_refuses_a_run_of_another_task_before_training(sst2_runs, tmp_path):
    from cmiexp.train.runner import run_experiment

    common = [c for c in sst2_runs["common"] if not c.startswith("task=")]
    with pytest.raises(ConfigError, match=r"trainer.init_from: .* was trained on task=glue/sst2, but this run is "
                                          r"task=glue/cola"):
        run_experiment(compose_config([*common, "task=glue/cola", f"trainer.init_from={sst2_runs['A_dir']}"]),
                       tmp_path / "cola")
    with pytest.raises(ConfigError, match=r"trained with model=tiny-bert, but this run uses model=tiny-distilbert"):
        run_experiment(compose_config([*sst2_runs["common"], "model=tiny-distilbert",
                                       f"trainer.init_from={sst2_runs['A_dir']}"]), tmp_path / "distil")
    assert not (tmp_path / "cola" / "checkpoint").exists() and not (tmp_path / "distil" / "checkpoint").exists()
