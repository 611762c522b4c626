"""cmiexp-report's visible output beyond the numbers: the split and the grouping keys in the header,
the KD teacher in the row, interrupted runs, and the self-contained HTML page with its curves.
Expected numbers are worked out by hand in the comments."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cmiexp.report import build_table, collect_runs, default_references, main, render_csv, render_markdown
from cmiexp.report.curves import band, write_run_curves
from cmiexp.runs import CURVES, EVAL_LOG, TRAIN_LOG
from tests.test_report import BERT, write_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cot_result(root: Path, objective: str, seed: int, dev: float, test: float | None) -> Path:
    """A CoT run as the CoT adapter's finalize records it: dev accuracy in best/final, test in ``test``."""
    d = write_result(root, "cot/svamp", objective, seed, {"accuracy": dev}, model="tiny-t5", exp="cot_mi",
                     task_type="generation")
    if test is not None:
        data = json.loads((d / "results.json").read_text())
        data["test"] = {"accuracy": test, "ece": 0.1, "mean_confidence": 0.5, "num_samples": 20, "model": "best",
                        "step": 5}
        (d / "results.json").write_text(json.dumps(data))
    return d


def test_split_test_shows_test_metrics_and_says_so(tmp_path: Path, capsys):
    root = tmp_path / "runs"
    _cot_result(root, "cot_finetune", 1, dev=0.40, test=0.30)
    _cot_result(root, "cot_finetune", 2, dev=0.50, test=0.40)
    _cot_result(root, "cot_mi", 1, dev=0.60, test=None)  # recorded before test evaluation existed
    recs = collect_runs([root])
    dev = build_table(recs, references=[])
    assert dev.title == "Results (dev split, best.metrics), mean ± std over seeds"
    # dev: (40 + 50) / 2 = 45
    assert dev.rows[0].cells["cot/svamp"].mean == pytest.approx(45.0)
    test = build_table(recs, split="test", references=default_references())
    md = render_markdown(test)
    assert md.startswith("## Results (test split, results.json test), mean ± std over seeds\n")
    # test: (30 + 40) / 2 = 35, sample std sqrt(((30-35)^2 + (40-35)^2) / 1) = 7.07
    row = next(r for r in test.rows if r.label == "tiny-t5 / cot_finetune")
    assert row.cells["cot/svamp"].mean == pytest.approx(35.0)
    assert "35.0 ± 7.1 (n=2)" in md
    # the run without test metrics is counted and explained, not silently dropped or shown as its dev value
    mi = next(r for r in test.rows if r.label == "tiny-t5 / cot_mi")
    assert mi.cells["cot/svamp"].n == 0 and mi.cells["cot/svamp"].no_metric == 1
    assert "results.json has no test metrics" in md
    # the CLI flag, and the split in the CSV
    assert main([str(root), "--split", "test", "--no-reference", "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Results (test split, results.json test)")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "rep" / "report.csv").read_text())))
    assert {r["split"] for r in rows} == {"test"}
    assert main([str(root), "--split", "valid"]) == 2  # argparse: one usage line naming the choices
    assert "invalid choice: 'valid'" in capsys.readouterr().err


def test_split_test_leaves_out_dev_reference_rows(tmp_path: Path):
    root = tmp_path / "runs"
    d = write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.7})
    data = json.loads((d / "results.json").read_text())
    data["test"] = {"accuracy": 0.6}
    (d / "results.json").write_text(json.dumps(data))
    table = build_table(collect_runs([root]), split="test", references=default_references())
    assert [r.kind for r in table.rows] == ["run"]  # Sanh et al. publish GLUE dev numbers
    assert any("reference rows left out" in n and "Sanh et al. 2019" in n for n in table.notes)
    assert table.rows[0].cells["rte"].mean == pytest.approx(60.0)


def _kd_student(root: Path, seed: int, acc: float, teacher: dict | None) -> Path:
    d = write_result(root, "glue/rte", "kd", seed, {"accuracy": acc}, exp="kd", model="tiny-bert", suffix=f"-{seed}")
    if teacher is not None:
        data = json.loads((d / "results.json").read_text())
        data["teacher"] = teacher
        (d / "results.json").write_text(json.dumps(data))
    return d


def test_teacher_named_in_row(tmp_path: Path):
    root = tmp_path / "runs"
    # per-seed teachers (one CE teacher per seed): one row, both teachers named; results.json has no
    # teacher_objective, so the objective comes from the teacher record
    _kd_student(root, 1, 0.60, {"objective": "ce", "hash": "1a2b3c4d", "run_dir": "/t/ce/seed1-1a2b3c4d"})
    _kd_student(root, 2, 0.64, {"objective": "ce", "hash": "5e6f7a8b", "run_dir": "/t/ce/seed2-5e6f7a8b"})
    table = build_table(collect_runs([root]), references=[])
    (row,) = table.rows
    assert row.label == "tiny-bert / kd (teacher: ce 1a2b3c4d, 5e6f7a8b)"
    assert row.cells["rte"].mean == pytest.approx(62.0) and row.cells["rte"].n == 2  # (60 + 64) / 2
    assert "| tiny-bert / kd (teacher: ce 1a2b3c4d, 5e6f7a8b) | 62.0 ± 2.8 (n=2) |" in render_markdown(table)
    (csv_row,) = [r for r in csv.DictReader(io.StringIO(render_csv(table))) if r["task"] == "rte"]
    assert csv_row["teacher"] == "1a2b3c4d 5e6f7a8b" and csv_row["teacher_objective"] == "ce"


def test_teacher_absent_or_malformed_is_tolerated(tmp_path: Path):
    root = tmp_path / "runs"
    _kd_student(root, 1, 0.60, None)
    _kd_student(root, 2, 0.62, {"objective": None})  # no hash recorded
    (row,) = build_table(collect_runs([root]), references=[]).rows
    assert row.label == "tiny-bert / kd" and row.teachers == ()


def test_grouping_keys_named_under_the_title(tmp_path: Path):
    root = tmp_path / "runs"
    for lr, seed, a in ((1e-3, 1, 0.7), (2e-5, 1, 0.5)):
        d = write_result(root, "glue/rte", "ce", seed, {"accuracy": a}, suffix=f"-{lr}")
        (d / "run_config.json").write_text(json.dumps({"hash": "0" * 8, "config": {"trainer": {"lr": lr}}}))
    md = render_markdown(build_table(collect_runs([root]), references=[]))
    lines = md.splitlines()
    assert lines[0] == "## Results (dev split, best.metrics), mean ± std over seeds"
    assert lines[2].startswith("Rows split by trainer.lr (configs differ in these keys")
    assert f"| {BERT} / ce [trainer.lr=0.001] | 70.0 (n=1) |" in md


def test_interrupted_run_is_counted(tmp_path: Path):
    root = tmp_path / "runs"
    write_result(root, "glue/rte", "ce", 1, {"accuracy": 0.7})
    write_result(root, "glue/rte", "ce", 2, None, status="interrupted")
    table = build_table(collect_runs([root]), references=[])
    cell = table.rows[0].cells["rte"]
    assert (cell.n, cell.interrupted) == (1, 1)
    md = render_markdown(table)
    assert "70.0 (n=1, 1 interrupted)" in md and "- interrupted:" in md


def test_band_is_mean_and_sample_std_per_step():
    a = [(2, 0.9), (4, 0.5)]
    b = [(2, 0.7), (4, 0.3), (6, 0.2)]
    bd = band([a, b])
    assert bd.steps == [2, 4, 6] and bd.n == [2, 2, 1]
    assert bd.mean == pytest.approx([statistics.mean([0.9, 0.7]), statistics.mean([0.5, 0.3]), 0.2])
    assert bd.std[:2] == pytest.approx([statistics.stdev([0.9, 0.7]), statistics.stdev([0.5, 0.3])])
    assert bd.std[2] is None  # one run: no spread claimed
    assert bd.std[0] == pytest.approx(math.sqrt(0.02))  # ((0.1^2 + 0.1^2) / 1) ** 0.5


def _logs(d: Path, losses: list[float], accs: list[float], cmis: list[float]) -> None:
    (d / TRAIN_LOG).write_text("".join(json.dumps({"step": 2 * (i + 1), "train/loss": v}) + "\n"
                                       for i, v in enumerate(losses)))
    (d / EVAL_LOG).write_text("".join(json.dumps({"step": 4 * (i + 1), "epoch": i, "dev/accuracy": a, "dev/cmi": c})
                                      + "\n" for i, (a, c) in enumerate(zip(accs, cmis))))


def _png(path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(path, format="png")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        self._in_td = tag == "td"

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def test_html_page_is_self_contained_with_tables_curves_and_probes(tmp_path: Path, capsys):
    root = tmp_path / "runs"
    for obj, seed, acc, losses in (("ce", 1, 0.60, [0.9, 0.6]), ("ce", 2, 0.64, [0.7, 0.5]),
                                   ("cmi_min", 1, 0.66, [1.0, 0.8]), ("cmi_min", 2, 0.70, [1.1, 0.7])):
        d = write_result(root, "glue/rte", obj, seed, {"accuracy": acc, "cmi": 0.01})
        _logs(d, losses, [acc - 0.1, acc], [0.02, 0.01])
    probe = write_result(root, "glue/rte", "flownib", 1, {"oic_y_mean": 0.3}, exp="probe", primary="oic_y_mean")
    _png(probe / "flownib_information_plane.png")
    _png(probe / "flownib_oic_by_layer.png")  # not an information plane: not embedded
    out = tmp_path / "page" / "report.html"
    assert main([str(root), "--html", str(out), "--no-reference", "--experiment", "cmi_glue",
                 "--extra-metric", "cmi"]) == 0
    md = capsys.readouterr().out
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    # tables: main, Δ vs baseline, the cmi diagnostics table; the cells are the Markdown's
    assert page.tags.count("table") == 3
    assert "62.0 ± 2.8 (n=2)" in page.cells and "68.0 ± 2.8 (n=2)" in page.cells  # (60+64)/2, (66+70)/2
    assert "| bert-base-uncased / ce | 62.0 ± 2.8 (n=2) | 62.0 |" in md
    assert "+6.0" in page.cells  # 68 - 62
    # images: one curves figure for RTE; the probe is filtered out by --experiment, its figure too
    assert len(page.imgs) == 1
    assert main([str(root), "--html", str(out), "--no-reference"]) == 0
    capsys.readouterr()
    page = _Page()
    page.feed(out.read_text(encoding="utf-8"))
    # unfiltered: the RTE curves and the probe's information plane (its other PNGs are not embedded)
    assert len(page.imgs) == 2
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    # nothing to fetch: no scripts, stylesheets or links to outside the page
    assert not any(re.match(r"(?i)(https?:)?//", u) for u in page.urls)
    assert "script" not in page.tags and "link" not in page.tags
    assert "Information planes (FlowNIB probes)" in out.read_text()


def test_run_curves_png_is_drawn_atomically_and_skips_empty_runs(tmp_path: Path):
    d = tmp_path / "run"
    d.mkdir()
    assert write_run_curves(d, "accuracy") is None and not (d / CURVES).exists()  # nothing logged
    _logs(d, [0.9, 0.6, 0.5], [0.5, 0.6], [0.02, 0.01])
    assert write_run_curves(d, "accuracy") == d / CURVES
    assert (d / CURVES).read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_run_curves_failure_only_warns(tmp_path: Path, caplog):
    d = tmp_path / "run"
    d.mkdir()
    _logs(d, [0.9], [0.5], [0.02])
    (d / CURVES).mkdir()  # the target cannot be replaced by a file
    assert write_run_curves(d, "accuracy") is None
    assert any("could not draw" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_real_run_writes_curves_png_and_the_page_shows_it(cmiexp_env, output_dir, tmp_path):
    from tests.conftest import GLUE_DIR, find_run_dirs, run_cli

    run_cli(["task=glue/rte", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=64", "task.max_eval_samples=32",
             "task.max_length=32", "trainer.progress_bar=false", "trainer.max_steps=4", "trainer.eval_every=2",
             "trainer.log_every=2", "seed=1"], cmiexp_env)
    (run_dir,) = find_run_dirs(output_dir)
    assert (run_dir / CURVES).read_bytes().startswith(PNG_MAGIC)
    page_path = tmp_path / "page.html"
    assert main([str(output_dir / "runs"), "--html", str(page_path), "--no-reference"]) == 0
    page = _Page()
    page.feed(page_path.read_text(encoding="utf-8"))
    assert len(page.imgs) == 1 and page.imgs[0].startswith("data:image/png;base64,")
