"""Tests for cmiexp-report. Every expected number below is worked out by hand in comments."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from cmiexp.errors import ConfigError
from cmiexp.report import (
    build_table,
    collect_runs,
    default_reference_path,
    default_references,
    load_reference,
    main,
    mean_std,
    parse_metric_spec,
    render_csv,
    render_latex,
    render_markdown,
    task_key,
)

EXP = "cmi_glue"
BERT = "bert-base-uncased"


def _run_dir(root: Path, task: str, model: str, objective: str, seed: int, exp: str = EXP, suffix: str = "") -> Path:
    d = root / "runs" / exp / task / model / objective / f"seed{seed}{suffix}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_result(
    root: Path,
    task: str,
    objective: str,
    seed: int,
    metrics: dict | None,
    *,
    model: str = BERT,
    status: str = "completed",
    error: str | None = None,
    exp: str = EXP,
    teacher_objective: str | None = None,
    task_type: str = "classification",
    primary: str = "accuracy",
    overrides: list[str] | None = None,
    suffix: str = "",
) -> Path:
    d = _run_dir(root, task, model, objective + (f"-{teacher_objective}" if teacher_objective else ""), seed, exp, suffix)
    data = {
        "schema": 1,
        "status": status,
        "error": error,
        "experiment": exp,
        "task": task,
        "task_type": task_type,
        "model": model,
        "objective": objective,
        "teacher_objective": teacher_objective,
        "teacher_model": None,
        "seed": seed,
        "primary_metric": primary,
        "final": {"step": 10, "epoch": 1, "metrics": metrics or {}},
        "wall_time_s": 1.0,
        "overrides": overrides or [f"task={task}", f"seed={seed}"],
        "run_dir": str(d),
    }
    if metrics is not None:
        data["best"] = {"step": 5, "epoch": 1, "metrics": metrics}
    (d / "results.json").write_text(json.dumps(data), encoding="utf-8")
    # Real runs carry Hydra's config copy; the report must ignore it when results.json exists.
    (d / ".hydra").mkdir(exist_ok=True)
    (d / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump(
            {"experiment_name": exp, "task": {"name": task}, "model": {"name": model}, "objective": {"name": objective}, "seed": seed}
        )
    )
    return d


def write_config_only(root: Path, task: str, objective: str, seed: int, *, hydra: bool = True, model: str = BERT) -> Path:
    d = _run_dir(root, task, model, objective, seed)
    cfg = {
        "experiment_name": EXP,
        "task": {"name": task, "task_type": "regression"},
        "model": {"name": model},
        "objective": {"name": objective},
        "seed": seed,
    }
    target = d / ".hydra" / "config.yaml" if hydra else d / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return d


def stsb(p: float, s: float, **extra) -> dict:
    return {"pearson": p, "spearman": s, "mse": 0.5, "mae": 0.4, **extra}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 methods x 3 tasks x 3 seeds; one failed run, one missing run, one corrupt file.

    Report metric (x100), by hand:
      CoLA MCC    ce:      50, 52, 54          -> 52.0 ± 2.0 (n=3)
                  cmi_min: 55, 57, 59          -> 57.0 ± 2.0 (n=3)
      STS-B (P+S)/2 ce:   81, 85, 89          -> 85.0 ± 4.0 (n=3)   std = sqrt((16+0+16)/2) = 4
                  cmi_min: 87, 89, seed3 missing -> 88.0 ± 1.4 (n=2)  std = sqrt(2) = 1.414
      RTE acc     ce:      70, 72, 74          -> 72.0 ± 2.0 (n=3)
                  cmi_min: 73, 75, seed3 failed -> 74.0 ± 1.4 (n=2)
      Average     ce: (52+85+72)/3 = 69.67 -> 69.7; cmi_min: (57+88+74)/3 = 73.0
      Δ           CoLA +5.0, STS-B +3.0, RTE +2.0, Average 10/3 = +3.3
      BERT-base (ref):  56.3, 89.0, 69.3 -> avg 214.6/3 = 71.53 -> 71.5
      DistilBERT (ref): 51.3, 86.9, 59.9 -> avg 198.1/3 = 66.03 -> 66.0
    """
    root = tmp_path / "outputs"
    # Decoy metrics (accuracy on CoLA, f1 on RTE) must not be picked by the defaults.
    for seed, v in zip((1, 2, 3), (0.50, 0.52, 0.54)):
        write_result(root, "glue/cola", "ce", seed, {"matthews_correlation": v, "accuracy": 0.8, "cmi": 0.3})
    for seed, v in zip((1, 2, 3), (0.55, 0.57, 0.59)):
        write_result(root, "glue/cola", "cmi_min", seed, {"matthews_correlation": v, "accuracy": 0.9, "cmi": 0.2})
    for seed, (p, s) in zip((1, 2, 3), ((0.80, 0.82), (0.84, 0.86), (0.88, 0.90))):
        write_result(root, "glue/stsb", "ce", seed, stsb(p, s), task_type="regression", primary="pearson")
    for seed, (p, s) in zip((1, 2), ((0.86, 0.88), (0.88, 0.90))):
        write_result(root, "glue/stsb", "cmi_min", seed, stsb(p, s), task_type="regression", primary="pearson")
    write_config_only(root, "glue/stsb", "cmi_min", 3)
    # RTE cmi values 0.10/0.12/0.14 -> 0.120 ± 0.020 (unscaled diagnostics table).
    for seed, v, c in zip((1, 2, 3), (0.70, 0.72, 0.74), (0.10, 0.12, 0.14)):
        write_result(root, "glue/rte", "ce", seed, {"accuracy": v, "f1": 0.5, "cmi": c})
    for seed, v in zip((1, 2), (0.73, 0.75)):
        write_result(root, "glue/rte", "cmi_min", seed, {"accuracy": v, "f1": 0.6, "cmi": 0.05})
    write_result(root, "glue/rte", "cmi_min", 3, None, status="failed", error="CUDA out of memory\nTraceback ...")
    bad = _run_dir(root, "glue/rte", BERT, "cmi_min", 9)
    (bad / "results.json").write_text('{"schema": 1, "status": "comp', encoding="utf-8")
    return root


EXPECTED_MAIN = """\
| Method | CoLA | STS-B | RTE | Average |
| --- | --- | --- | --- | --- |
| BERT-base (Sanh et al. 2019) | 56.3 | 89.0 | 69.3 | 71.5 |
| DistilBERT (Sanh et al. 2019) | 51.3 | 86.9 | 59.9 | 66.0 |
| bert-base-uncased / ce | 52.0 ± 2.0 (n=3) | 85.0 ± 4.0 (n=3) | 72.0 ± 2.0 (n=3) | 69.7 |
| bert-base-uncased / cmi_min | 57.0 ± 2.0 (n=3) | 88.0 ± 1.4 (n=2, 1 missing) | 74.0 ± 1.4 (n=2, 1 failed) | 73.0 |
"""

EXPECTED_DELTA = """\
### Δ vs baseline

| Method | Baseline | CoLA | STS-B | RTE | Average |
| --- | --- | --- | --- | --- | --- |
| bert-base-uncased / cmi_min | bert-base-uncased / ce | +5.0 | +3.0 | +2.0 | +3.3 |
"""

CMI_RUN = "runs/cmi_glue/glue/rte/bert-base-uncased/cmi_min"


def test_mean_std_hand_values():
    assert mean_std([]) == (None, None)
    assert mean_std([71.2]) == (71.2, None)
    m, s = mean_std([70.0, 72.0, 74.0])
    assert m == pytest.approx(72.0) and s == pytest.approx(2.0)
    # 1, 2, 3, 4: mean 2.5, squared deviations 2.25+0.25+0.25+2.25 = 5, /3 -> sqrt(5/3)
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx((5 / 3) ** 0.5)


def test_task_key_and_metric_spec():
    assert task_key("glue/sst-2") == "sst2"
    assert task_key("glue/STS-B") == "stsb"
    assert task_key("rte") == "rte"
    assert task_key("cot/gsm8k") == "cot/gsm8k"
    spec = parse_metric_spec("mean(spearman, pearson)")
    assert spec.name == "mean(pearson,spearman)" and spec.scaled
    assert spec.value({"pearson": 0.8, "spearman": 0.9}) == pytest.approx(0.85)
    assert spec.value({"pearson": 0.8}) is None
    assert spec.value({"pearson": 0.8, "spearman": float("nan")}) is None
    assert not parse_metric_spec("cmi").scaled
    with pytest.raises(ConfigError, match="invalid metric"):
        parse_metric_spec("mean()")


def test_collect_runs_statuses(sweep: Path):
    recs = collect_runs([sweep])
    by_status = {}
    for r in recs:
        by_status.setdefault(r.status, []).append(r)
    assert len(by_status["completed"]) == 16
    assert [(r.task, r.objective, r.seed) for r in by_status["failed"]] == [("glue/rte", "cmi_min", 3)]
    assert by_status["failed"][0].error == "CUDA out of memory Traceback ..."  # one line
    (missing,) = by_status["missing"]
    assert (missing.task, missing.model, missing.objective, missing.seed, missing.experiment) == (
        "glue/stsb", BERT, "cmi_min", 3, EXP)  # fmt: skip
    assert missing.path.name == "config.yaml" and missing.path.parent.name == ".hydra"
    (corrupt,) = by_status["corrupt"]
    assert corrupt.display_path == f"{CMI_RUN}/seed9/results.json"
    assert "not valid JSON" in corrupt.error and not corrupt.identified
    # The same tree passed twice (and a sub-folder) is read once.
    assert len(collect_runs([sweep, sweep / "runs"])) == len(recs)


def test_markdown_table_exact(sweep: Path):
    table = build_table(collect_runs([sweep]), references=default_references())
    md = render_markdown(table)
    assert md.startswith("## Results (dev split, best.metrics), mean ± std over seeds\n\n" + EXPECTED_MAIN + "\n")
    assert EXPECTED_DELTA in md
    assert (
        "Metric per task: CoLA = matthews_correlation ×100; STS-B = mean(pearson,spearman) ×100; "
        "RTE = accuracy ×100." in md
    )
    assert "Published score: BERT-base 79.5, DistilBERT 77.0." in md
    assert "arXiv:1910.01108" in md
    # Problems are listed with their messages and files; none dropped.
    assert "### Failed, missing and unreadable runs (3)" in md
    assert (
        f"- failed: bert-base-uncased / cmi_min, RTE, seed 3: CUDA out of memory Traceback ... "
        f"(`{CMI_RUN}/seed3/results.json`)" in md
    )
    assert (
        "- missing: bert-base-uncased / cmi_min, STS-B, seed 3: no results.json (crashed or not finished) "
        "(`runs/cmi_glue/glue/stsb/bert-base-uncased/cmi_min/seed3/.hydra/config.yaml`)" in md
    )
    assert "- corrupt: results.json is not valid JSON" in md and f"(`{CMI_RUN}/seed9/results.json`)" in md


def test_csv_rows(sweep: Path):
    table = build_table(collect_runs([sweep]), references=default_references())
    rows = list(csv.DictReader(io.StringIO(render_csv(table))))
    # 4 rows (2 refs + 2 methods) x (3 tasks + average)
    assert len(rows) == 16
    get = {(r["method"], r["task"]): r for r in rows}
    r = get[("bert-base-uncased / cmi_min", "rte")]
    assert (r["kind"], r["metric"], r["scale"], r["n"], r["failed"], r["missing"], r["seeds"]) == (
        "run", "accuracy", "100", "2", "1", "0", "1 2")  # fmt: skip
    assert float(r["mean"]) == pytest.approx(74.0) and float(r["std"]) == pytest.approx(2**0.5)
    assert r["baseline"] == "bert-base-uncased / ce" and float(r["delta"]) == pytest.approx(2.0)
    r = get[("bert-base-uncased / cmi_min", "stsb")]
    assert (r["metric"], r["n"], r["missing"]) == ("mean(pearson,spearman)", "2", "1")
    assert float(r["mean"]) == pytest.approx(88.0)
    r = get[("bert-base-uncased / ce", "stsb")]
    assert float(r["mean"]) == pytest.approx(85.0) and float(r["std"]) == pytest.approx(4.0)
    assert r["baseline"] == "" and r["delta"] == ""
    r = get[("bert-base-uncased / cmi_min", "average")]
    assert float(r["mean"]) == pytest.approx(73.0) and r["n"] == "3"
    assert float(r["delta"]) == pytest.approx(10 / 3)
    r = get[("BERT-base (Sanh et al. 2019)", "cola")]
    assert (r["kind"], r["mean"], r["std"], r["n"]) == ("reference", "56.3", "", "1")


def test_latex_escapes_labels(sweep: Path):
    table = build_table(collect_runs([sweep]), references=default_references())
    tex = render_latex(table)
    assert r"\begin{tabular}{lrrrr}" in tex
    assert r"Method & CoLA & STS-B & RTE & Average \\" in tex
    assert r"bert-base-uncased / cmi\_min & 57.0 $\pm$ 2.0 (n=3) & 88.0 $\pm$ 1.4 (n=2, 1 missing) & " in tex
    assert r"74.0 $\pm$ 2.0" not in tex and r"74.0 $\pm$ 1.4 (n=2, 1 failed) & 73.0 \\" in tex
    assert r"BERT-base (Sanh et al. 2019) & 56.3 & 89.0 & 69.3 & 71.5 \\" in tex
    assert r"bert-base-uncased / cmi\_min & bert-base-uncased / ce & +5.0 & +3.0 & +2.0 & +3.3 \\" in tex
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))  # comments are free text
    assert "cmi_min" not in body.replace(r"cmi\_min", "")  # every underscore escaped ...
    assert "—" not in body and "±" not in body  # ... and no raw unicode for pdflatex
    assert f"% failed: bert-base-uncased / cmi_min, RTE, seed 3: CUDA out of memory Traceback ... ({CMI_RUN}/seed3/results.json)" in tex


def test_failed_only_and_missing_only_cells(tmp_path: Path):
    root = tmp_path / "sweep"
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.70})
    write_result(root, "glue/rte", "mcmi", 1, None, status="failed", error="loss is NaN")
    write_result(root, "glue/rte", "mcmi", 2, {"accuracy": 0.9}, status="failed", error="killed")
    write_result(root, "glue/mrpc", "ce", 1, {"accuracy": 0.80, "f1": 0.9})
    write_config_only(root, "glue/mrpc", "mcmi", 1, hydra=False)
    write_result(root, "glue/mrpc", "ce", 2, None, status="running")
    md = render_markdown(build_table(collect_runs([root])))
    # A failed run's metrics never enter a mean, even if it wrote some.
    assert (
        "| Method | MRPC | RTE | Average |\n"
        "| --- | --- | --- | --- |\n"
        "| bert-base-uncased / ce | 80.0 (n=1, 1 running) | 70.0 (n=1) | 75.0 |\n"
        "| bert-base-uncased / mcmi | — (1 missing) | — (2 failed) | — |\n"
    ) in md
    assert "| bert-base-uncased / mcmi | bert-base-uncased / ce | — | — | — |" in md
    assert "- running: bert-base-uncased / ce, MRPC, seed 2: status is still 'running'" in md
    assert "- failed: bert-base-uncased / mcmi, RTE, seed 1: loss is NaN" in md


def test_corrupt_results_with_config_is_counted_in_its_cell(tmp_path: Path):
    root = tmp_path / "sweep"
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.70})
    write_result(root, "glue/rte", "ce", 2, {"accuracy": 0.74})
    d = write_result(root, "glue/rte", "ce", 3, {"accuracy": 0.99})
    (d / "results.json").write_text("[1, 2]", encoding="utf-8")
    future = tmp_path / "sweep" / "elsewhere"
    future.mkdir()
    (future / "results.json").write_text('{"schema": 2, "task": "glue/rte"}', encoding="utf-8")
    table = build_table(collect_runs([root]))
    md = render_markdown(table)
    # 70 and 74: mean 72, std sqrt(8) = 2.83
    assert "| bert-base-uncased / ce | 72.0 ± 2.8 (n=2, 1 failed) | 72.0 |" in md
    assert "- corrupt: bert-base-uncased / ce, RTE, seed 3: results.json does not hold a JSON object" in md
    assert "- corrupt: results.json has schema 2, expected 1 (`elsewhere/results.json`)" in md


def test_average_marks_missing_tasks(tmp_path: Path):
    root = tmp_path / "sweep"
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.70})
    write_result(root, "glue/sst2", "ce", 1, {"accuracy": 0.90})
    write_result(root, "glue/rte", "cmi_min", 1, {"accuracy": 0.76})
    md = render_markdown(build_table(collect_runs([root])))
    assert "| Method | SST-2 | RTE | Average |" in md
    assert "| bert-base-uncased / ce | 90.0 (n=1) | 70.0 (n=1) | 80.0 |" in md
    assert "| bert-base-uncased / cmi_min | — | 76.0 (n=1) | 76.0 (1/2 tasks) |" in md
    # Δ only where both have a value: RTE 76 - 70 = +6.0, average over that one task.
    assert "| bert-base-uncased / cmi_min | bert-base-uncased / ce | — | +6.0 | +6.0 (1/2 tasks) |" in md


def test_kd_students_compare_teacher_objectives(tmp_path: Path):
    root = tmp_path / "sweep"
    db = "distilbert-base-uncased"
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.60}, model=db, exp="kd")
    write_result(root, "glue/rte", "kd", 1, {"accuracy": 0.62}, model=db, exp="kd", teacher_objective="ce")
    write_result(root, "glue/rte", "kd", 1, {"accuracy": 0.65}, model=db, exp="kd", teacher_objective="mcmi")
    table = build_table(collect_runs([root]))
    assert [r.label for r in table.rows] == [
        f"{db} / ce",
        f"{db} / kd (teacher: ce)",
        f"{db} / kd (teacher: mcmi)",
    ]
    # kd with a CE teacher has no CE row with a CE teacher, so only the MCMI student gets a Δ:
    # 65 - 62 = +3.0 against the CE-taught student.
    (d,) = table.deltas
    assert (d.label, d.baseline) == (f"{db} / kd (teacher: mcmi)", f"{db} / kd (teacher: ce)")
    assert d.deltas["rte"] == pytest.approx(3.0)
    assert r"distilbert-base-uncased / kd (teacher: mcmi)" in render_latex(table)


def test_metric_override_and_reference_metric_mismatch(sweep: Path):
    recs = collect_runs([sweep])
    table = build_table(recs, metric_overrides={"rte": "f1"}, references=default_references())
    md = render_markdown(table)
    # RTE now reports f1 (0.5 for every ce seed, 0.6 for cmi_min); the paper's RTE numbers are
    # accuracy, so the reference rows show — there and average the other two columns:
    # BERT (56.3+89.0)/2 = 72.65, DistilBERT (51.3+86.9)/2 = 69.1.
    assert "| BERT-base (Sanh et al. 2019) | 56.3 | 89.0 | — | 72.7 (2/3 tasks) |" in md
    assert "| DistilBERT (Sanh et al. 2019) | 51.3 | 86.9 | — | 69.1 (2/3 tasks) |" in md
    assert "| bert-base-uncased / ce | 52.0 ± 2.0 (n=3) | 85.0 ± 4.0 (n=3) | 50.0 ± 0.0 (n=3) |" in md
    assert "RTE = f1 ×100" in md


def test_primary_metric_mode(tmp_path: Path):
    root = tmp_path / "sweep"
    write_result(root, "glue/stsb", "ce", 1, stsb(0.80, 0.90), task_type="regression", primary="pearson")
    write_result(root, "glue/stsb", "ce", 2, stsb(0.84, 0.90), task_type="regression", primary="pearson")
    md = render_markdown(build_table(collect_runs([root]), use_primary=True))
    # pearson only: 80, 84 -> 82.0 ± 2.8 (sqrt(8))
    assert "| bert-base-uncased / ce | 82.0 ± 2.8 (n=2) | 82.0 |" in md
    # Default: mean(pearson, spearman): 85, 87 -> 86.0 ± 1.4
    md = render_markdown(build_table(collect_runs([root])))
    assert "| bert-base-uncased / ce | 86.0 ± 1.4 (n=2) | 86.0 |" in md


def test_non_glue_regression_uses_primary_metric_unscaled(tmp_path: Path):
    root = tmp_path / "sweep"
    write_result(root, "toy/reg", "ce", 1, {"mse": 0.25, "mae": 0.4}, task_type="regression", primary="mse")
    write_result(root, "toy/reg", "ce", 2, {"mse": 0.35, "mae": 0.5}, task_type="regression", primary="mse")
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.5})
    table = build_table(collect_runs([root]), references=default_references())
    md = render_markdown(table)
    # GLUE columns first, others after; mse unscaled with 3 decimals: mean 0.300, std sqrt(0.005) = 0.0707.
    # The Average spans the x100 score columns only (RTE), never mixing in an error.
    assert "| Method | RTE | toy/reg | Average |" in md
    assert "| bert-base-uncased / ce | 50.0 (n=1) | 0.300 ± 0.071 (n=2) | 50.0 |" in md
    assert "| BERT-base (Sanh et al. 2019) | 69.3 | — | 69.3 |" in md
    assert "toy/reg not averaged (not ×100 scores)" in md


def test_extra_metric_table_and_filters(sweep: Path):
    recs = collect_runs([sweep])
    cmi = build_table(recs, metric="cmi", tasks=["rte"], deltas=False, average=False, show_problems=False)
    md = render_markdown(cmi)
    assert md.startswith("## Diagnostics: cmi (dev split, best.metrics), mean ± std over seeds\n")
    # ce: 0.10/0.12/0.14 -> 0.120 ± 0.020; cmi_min 0.05/0.05 -> 0.050 ± 0.000
    assert (
        "| Method | RTE |\n| --- | --- |\n"
        "| bert-base-uncased / ce | 0.120 ± 0.020 (n=3) |\n"
        "| bert-base-uncased / cmi_min | 0.050 ± 0.000 (n=2, 1 failed) |\n"
    ) in md
    assert "Sanh" not in md and "Failed, missing" not in md
    assert "Metric: cmi." in render_markdown(build_table(recs, metric="cmi", average=False))
    assert build_table(recs, experiments=["other"]).columns == []


def test_multiple_experiments_prefix_labels_and_group_by(tmp_path: Path):
    root = tmp_path / "sweep"
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.70}, exp="a", overrides=["seed=1", "optimizer.lr=1e-05"])
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.80}, exp="a", overrides=["seed=1", "optimizer.lr=2e-05"], suffix="-0badcafe")
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.60}, exp="b")
    recs = collect_runs([root])
    # By default two learning rates are never averaged as if they were seeds: the rows are split
    # by the key that varies, and the note says so.
    table = build_table(recs)
    labels = [r.label for r in table.rows]
    assert labels == ["a: bert-base-uncased / ce [optimizer.lr=1e-05]", "a: bert-base-uncased / ce [optimizer.lr=2e-05]",
                      "b: bert-base-uncased / ce"]
    assert [r.cells["rte"].mean for r in table.rows] == [pytest.approx(70.0), pytest.approx(80.0), pytest.approx(60.0)]
    assert any(n.startswith("rows split by optimizer.lr") for n in table.notes)
    # Pooling them is an explicit request: (70+80)/2 = 75, and the duplicated seed is flagged.
    pooled = build_table(recs, average_over=["optimizer.lr"])
    assert [r.label for r in pooled.rows] == ["a: bert-base-uncased / ce", "b: bert-base-uncased / ce"]
    assert pooled.rows[0].cells["rte"].mean == pytest.approx(75.0)
    assert any("seed 1 were averaged" in n for n in pooled.notes)
    assert any("pooled as replicates on request" in n for n in pooled.notes)
    split = build_table(recs, group_by=["optimizer.lr"], experiments=["a"])
    assert [r.label for r in split.rows] == [
        "bert-base-uncased / ce [optimizer.lr=1e-05]",
        "bert-base-uncased / ce [optimizer.lr=2e-05]",
    ]
    assert split.notes == []


def test_checkpoint_config_copies_are_not_missing_runs(tmp_path: Path):
    root = tmp_path / "sweep"
    d = write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.70})
    ck = d / "checkpoints" / "best"
    ck.mkdir(parents=True)
    (ck / "config.yaml").write_text((d / ".hydra" / "config.yaml").read_text())
    # A sweep-level config above real runs is not a run either.
    (root / "config.yaml").write_text((d / ".hydra" / "config.yaml").read_text())
    recs = collect_runs([root])
    assert [(r.status, r.seed) for r in recs] == [("completed", 1)]


def test_shipped_reference_numbers():
    path = default_reference_path()
    data = yaml.safe_load(path.read_text())
    assert data["source"]["arxiv"] == "1910.01108" and "Table 1" in data["source"]["table"]
    assert data["source"]["authors"][0] == "Victor Sanh"
    assert "CMI paper" in data["note"]
    vals = {m["label"]: m["values"] for m in data["models"]}
    assert vals["BERT-base"] == {
        "score": 79.5, "cola": 56.3, "mnli": 86.7, "mrpc": 88.6, "qnli": 91.8,
        "qqp": 89.6, "rte": 69.3, "sst2": 92.7, "stsb": 89.0, "wnli": 53.5,
    }  # fmt: skip
    assert vals["DistilBERT"] == {
        "score": 77.0, "cola": 51.3, "mnli": 82.2, "mrpc": 87.5, "qnli": 89.2,
        "qqp": 88.5, "rte": 59.9, "sst2": 91.3, "stsb": 86.9, "wnli": 56.3,
    }  # fmt: skip
    cols = {k: v["metric"] for k, v in data["columns"].items()}
    assert cols["cola"] == "matthews_correlation" and cols["stsb"] == "mean(pearson,spearman)"
    assert cols["mrpc"] == cols["qqp"] == cols["mnli"] == "accuracy"
    ref = load_reference(path)
    assert ref.rows[1].score == 77.0 and ref.columns["stsb"] == parse_metric_spec("mean(spearman,pearson)")


def test_bad_reference_file_names_key(tmp_path: Path):
    p = tmp_path / "ref.yaml"
    p.write_text(yaml.safe_dump({"columns": {"rte": {"metric": "accuracy"}}, "models": [{"label": "X", "values": {"rte": "high"}}]}))
    with pytest.raises(ConfigError, match=r"ref\.yaml: models\[0\]\.values\.rte must be a number"):
        load_reference(p)


def test_cli_writes_files_and_prints_markdown(sweep: Path, tmp_path: Path, capsys):
    extra = tmp_path / "extra_ref.yaml"
    extra.write_text(
        yaml.safe_dump(
            {"short_cite": "Doe 2024", "columns": {"rte": {"metric": "accuracy"}}, "models": [{"label": "Toy", "values": {"rte": 61.0}}]}
        )
    )
    rc = main([str(sweep), "--reference", str(extra), "--extra-metric", "cmi"])
    out = capsys.readouterr().out
    assert rc == 0
    assert EXPECTED_MAIN.replace(
        "| bert-base-uncased / ce |", "| Toy (Doe 2024) | — | — | 61.0 | 61.0 (1/3 tasks) |\n| bert-base-uncased / ce |", 1
    ) in out
    assert "## Diagnostics: cmi (dev split, best.metrics)" in out
    assert (sweep / "report.md").read_text() == out
    assert "cmi_min" in (sweep / "report.csv").read_text()
    assert r"cmi\_min" in (sweep / "report.tex").read_text()
    rows = list(csv.DictReader(io.StringIO((sweep / "report.csv").read_text())))
    assert {r["table"] for r in rows} == {"main", "cmi"}


def test_cli_metric_override_no_reference_and_out(sweep: Path, tmp_path: Path, capsys):
    out_dir = tmp_path / "rep"
    rc = main([str(sweep), "--no-reference", "--metric", "glue/rte=f1", "--task", "rte", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    # f1 is 0.5 for all ce seeds and 0.6 for both completed cmi_min seeds.
    assert (
        "| Method | RTE | Average |\n| --- | --- | --- |\n"
        "| bert-base-uncased / ce | 50.0 ± 0.0 (n=3) | 50.0 |\n"
        "| bert-base-uncased / cmi_min | 60.0 ± 0.0 (n=2, 1 failed) | 60.0 |\n"
    ) in out
    assert "Sanh" not in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["report.csv", "report.md", "report.tex"]


def test_cli_errors(tmp_path: Path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err and "nope" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1
    assert "no results.json" in capsys.readouterr().err
    assert main([str(empty), "--metric", "rte"]) == 2  # argparse: not TASK=METRIC
    assert "expected TASK=METRIC" in capsys.readouterr().err


def test_cli_filter_matching_nothing(sweep: Path, capsys):
    assert main([str(sweep), "--experiment", "nope"]) == 1
    assert "experiments found: cmi_glue" in capsys.readouterr().err


def test_final_metrics_option(tmp_path: Path, capsys):
    root = tmp_path / "sweep"
    d = write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.70})
    data = json.loads((d / "results.json").read_text())
    data["final"]["metrics"] = {"accuracy": 0.66}
    (d / "results.json").write_text(json.dumps(data))
    assert main([str(root), "--no-reference"]) == 0
    assert "| bert-base-uncased / ce | 70.0 (n=1) | 70.0 |" in capsys.readouterr().out
    assert main([str(root), "--no-reference", "--final"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Results (dev split, final.metrics)")
    assert "| bert-base-uncased / ce | 66.0 (n=1) | 66.0 |" in out


def _with_run_config(d: Path, config: dict) -> None:
    """The hashed config a real run writes next to results.json (cmiexp.runs.records)."""
    (d / "run_config.json").write_text(json.dumps({"hash": "0" * 8, "config": config}), encoding="utf-8")


def test_default_report_never_averages_different_trainings(tmp_path: Path, capsys):
    """An lr sweep with two seeds: the rows are split by trainer.lr (read from each run's hashed
    config, whatever the spelling of the override), each row averages its own two seeds, and a
    key with one value per seed (a per-seed starting checkpoint) is pooled and named."""
    root = tmp_path / "sweep"
    acc = {(1e-3, 1): 0.70, (1e-3, 2): 0.72, (2e-5, 1): 0.50, (2e-5, 2): 0.54}
    for (lr, seed), a in acc.items():
        d = write_result(root, "glue/rte", "ce", seed, {"accuracy": a}, overrides=[f"seed={seed}", f"trainer.lr={lr}"],
                         suffix=f"-{int(lr * 1e5):05d}")
        _with_run_config(d, {"seed": seed, "task": {"name": "glue/rte"}, "model": {"name": BERT},
                             "trainer": {"lr": lr, "batch_size": 32, "init_from": f"/teachers/ce/seed{seed}"}})
    table = build_table(collect_runs([root]), references=[])
    assert [r.label for r in table.rows] == [f"{BERT} / ce [trainer.lr=0.001]", f"{BERT} / ce [trainer.lr=2e-05]"]
    # (70 + 72) / 2 = 71 and (50 + 54) / 2 = 52, two seeds each
    assert [(r.cells["rte"].mean, r.cells["rte"].n) for r in table.rows] == [(pytest.approx(71.0), 2),
                                                                             (pytest.approx(52.0), 2)]
    assert any(n.startswith("rows split by trainer.lr:") for n in table.notes)
    assert any("one value per seed, pooled as replicates: trainer.init_from" in n for n in table.notes)
    assert not any("were averaged" in n for n in table.notes)
    # the command line: the grouping is named in the report, --average-over pools on request
    assert main([str(root), "--out", str(tmp_path / "r1"), "--no-reference"]) == 0
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "rows split by trainer.lr" in md and "[trainer.lr=0.001]" in md
    assert main([str(root), "--out", str(tmp_path / "r2"), "--no-reference", "--average-over", "trainer.lr"]) == 0
    md = (tmp_path / "r2" / "report.md").read_text()
    assert "[trainer.lr" not in md and "pooled as replicates on request (--average-over): trainer.lr" in md
    capsys.readouterr()


def test_runs_of_an_older_config_layout_are_not_pooled_with_new_ones(tmp_path: Path):
    """Seeds 1-2 trained before model.tiny.build existed (their run_config.json lacks it), seeds 1-3 after
    (build 3), in one sweep folder: the two trainings are two rows, not one cell of five "seeds"; a run
    known only by its overrides (no run_config.json) cannot say, so it splits nothing."""
    root = tmp_path / "sweep"
    for seed, acc, build in [(1, 0.50, None), (2, 0.52, None), (1, 0.70, 3), (2, 0.72, 3), (3, 0.74, 3)]:
        d = write_result(root, "glue/rte", "ce", seed, {"accuracy": acc}, model="tiny-bert",
                         suffix="" if build is None else "-b3")
        tiny = {"architecture": "bert", "hidden_size": 128, **({} if build is None else {"build": build})}
        _with_run_config(d, {"seed": seed, "task": {"name": "glue/rte"}, "model": {"name": "tiny-bert", "tiny": tiny}})
    table = build_table(collect_runs([root]), references=[])
    assert [(r.label, r.cells["rte"].n, r.cells["rte"].mean) for r in table.rows] == [
        ("tiny-bert / ce [model.tiny.build=(unset)]", 2, pytest.approx(51.0)),
        ("tiny-bert / ce [model.tiny.build=3]", 3, pytest.approx(72.0))]
    assert any(n.startswith("rows split by model.tiny.build") for n in table.notes)

    # One run of each layout on different seeds is not "one value per seed" (replicates): still two rows.
    one_each = tmp_path / "one_each"
    for seed, acc, tiny in [(1, 0.50, {"hidden_size": 128}), (2, 0.72, {"hidden_size": 128, "build": 3})]:
        d = write_result(one_each, "glue/rte", "ce", seed, {"accuracy": acc}, model="tiny-bert")
        _with_run_config(d, {"seed": seed, "task": {"name": "glue/rte"}, "model": {"name": "tiny-bert", "tiny": tiny}})
    table = build_table(collect_runs([one_each]), references=[])
    assert [r.cells["rte"].n for r in table.rows] == [1, 1]
    assert not any("pooled as replicates" in n for n in table.notes)
    # --group-by chooses other keys: the rows are not split, and a note says what else differs.
    table = build_table(collect_runs([one_each]), references=[], group_by=["trainer.lr"])
    assert [r.cells["rte"].n for r in table.rows] == [2]
    assert any(n.startswith("runs of one row also differ in model.tiny.build") for n in table.notes)

    # Lists are compared (two target_modules are two trainings), and a key below a null parent
    # (teacher_config of one run, null in the other) is carried by the parent, not split again as (unset).
    lists = tmp_path / "lists"
    for i, (mods, tc) in enumerate([(["query"], None), (["query", "value"], {"model": "tiny-bert", "objective": "ce"})]):
        seed = 1  # the same seed: a key with one value per seed would be pooled as a replicate
        d = write_result(lists, "glue/rte", "ce", seed, {"accuracy": 0.6}, model="tiny-bert", suffix=f"-{i}")
        _with_run_config(d, {"seed": seed, "task": {"name": "glue/rte"}, "model": {"name": "tiny-bert"},
                             "peft": {"target_modules": mods}, "objective": {"name": "ce", "teacher_config": tc}})
    table = build_table(collect_runs([lists]), references=[])
    split = next(n for n in table.notes if n.startswith("rows split by"))
    assert "peft.target_modules" in split and "objective.teacher_config," in split + ","
    assert "objective.teacher_config.model" not in split and len(table.rows) == 2
    # A config group named on the command line (head=masking) is not a key of the config: runs without
    # the override are not labelled (unset) when grouping by it.
    heads = tmp_path / "heads"
    for seed, head in [(1, "masking"), (2, None)]:
        d = write_result(heads, "glue/rte", "ce", seed, {"accuracy": 0.6}, model="tiny-bert",
                         overrides=[f"seed={seed}", *([f"head={head}"] if head else [])])
        _with_run_config(d, {"seed": seed, "task": {"name": "glue/rte"}, "model": {"name": "tiny-bert"},
                             "head": {"name": head or "pooling"}})
    labels = [r.label for r in build_table(collect_runs([heads]), references=[], group_by=["head"]).rows]
    assert labels == ["tiny-bert / ce", "tiny-bert / ce [head=masking]"], labels

    legacy = tmp_path / "legacy"  # no run_config.json at all: only the overrides are known
    for seed, acc in [(1, 0.5), (2, 0.6)]:
        write_result(legacy, "glue/rte", "ce", seed, {"accuracy": acc}, overrides=[f"seed={seed}"])
    (row,) = build_table(collect_runs([legacy]), references=[]).rows
    assert row.cells["rte"].n == 2
    # ... nor against a whole config where the key it names is a group or absent (experiment=, task=).
    mixed = tmp_path / "mixed"
    for seed in (1, 2):
        typed = [f"seed={seed}", "experiment=x", "task=glue/rte"]
        write_result(mixed, "glue/rte", "ce", seed, {"accuracy": 0.6}, overrides=typed)
        d = write_result(mixed, "glue/rte", "ce", seed, {"accuracy": 0.7}, overrides=typed, suffix="-new")
        _with_run_config(d, {"seed": seed, "task": {"name": "glue/rte"}, "model": {"name": BERT}})
    table = build_table(collect_runs([mixed]), references=[])
    assert len(table.rows) == 1 and not any(n.startswith("rows split by") for n in table.notes), table.notes


def test_report_help_examples_name_real_keys(capsys):
    from cmiexp.report import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "optimizer.lr" not in out
    examples = [line.split("#")[0].split() for line in out.splitlines() if line.strip().startswith("cmiexp-report ")]
    assert ["cmiexp-report", "outputs/runs/cmi_glue", "--group-by", "trainer.lr"] in examples
    assert ["cmiexp-report", "outputs/runs/cmi_glue", "--average-over", "trainer.lr"] in examples
    # trainer.lr is a real config key (the example works as written)
    from tests.conftest import compose_config

    assert "lr" in compose_config([]).trainer
