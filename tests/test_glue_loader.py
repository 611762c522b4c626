"""GLUE loader on the real GLUE files in shared/data/glue, plus tmp_path fixtures for errors.

Expected counts come from shared/data/glue/README.md (they match the published GLUE stats).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from omegaconf import OmegaConf

from cmiexp.data import glue as glue_mod
from cmiexp.data.glue import GLUE_TASKS, load_glue
from cmiexp.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def cfg(dataset: str, data_dir=GLUE_DIR, **over):
    base = dict(
        name=f"glue/{dataset}",
        loader="glue",
        dataset=dataset,
        hub_path="nyu-mll/glue",
        data_dir=None if data_dir is None else str(data_dir),
        max_length=128,
        max_train_samples=None,
        max_eval_samples=None,
        subsample_seed=0,
        primary_metric=GLUE_TASKS[dataset].primary_metric if dataset in GLUE_TASKS else "accuracy",
    )
    base.update(over)
    return OmegaConf.create(base)


def col(ds, name: str) -> list:
    # ds[name] is a lazy Column in datasets>=4; iterating it row by row is slow, [:] is one read.
    return ds[name][:]


_CACHE: dict[str, object] = {}


def real(dataset: str):
    """Load a real task once per test session (SST-2 is 67k rows)."""
    if dataset not in _CACHE:
        _CACHE[dataset] = load_glue(cfg(dataset))
    return _CACHE[dataset]


# --------------------------------------------------------------------------- real data


# task, train rows, dev rows, label id counted, its train count, its dev count (README numbers)
COUNTS = [
    ("rte", 2490, 277, 0, 1249, 146),  # entailment = 0
    ("sst2", 67349, 872, 1, 37569, 444),  # positive = 1
    ("cola", 8551, 1043, 1, 6023, 721),  # acceptable = 1
    ("mrpc", 3668, 408, 1, 2474, 279),  # equivalent = 1
    ("wnli", 635, 71, 1, 312, 31),  # entailment = 1
]


@pytest.mark.parametrize("task,n_train,n_dev,label,c_train,c_dev", COUNTS)
def test_real_counts_and_label_balance(task, n_train, n_dev, label, c_train, c_dev):
    td = real(task)
    train, dev = td.train, td.eval_splits["validation"]
    assert list(td.eval_splits) == ["validation"]
    assert len(train) == n_train and len(dev) == n_dev
    assert sum(1 for y in col(train, "label") if y == label) == c_train
    assert sum(1 for y in col(dev, "label") if y == label) == c_dev
    # Binary tasks: every label is a valid class id (none of -1 leaked into labelled splits).
    assert set(col(train, "label")) == {0, 1} and set(col(dev, "label")) == {0, 1}
    assert col(train, "idx") == list(range(n_train))
    assert col(dev, "idx") == list(range(n_dev))


def test_real_stsb_scores():
    td = real("stsb")
    train, dev = td.train, td.eval_splits["validation"]
    assert (len(train), len(dev)) == (5749, 1500)
    assert td.is_regression and td.label_names is None and td.num_labels == 1
    for split in (train, dev):
        scores = col(split, "label")
        assert all(0.0 <= s <= 5.0 for s in scores)
    assert train.features["label"] == datasets.Value("float32")
    # First two rows of STS-B/train.tsv: score 5.000 and 3.800.
    assert train[0]["sentence1"] == "A plane is taking off."
    assert train[0]["sentence2"] == "An air plane is taking off."
    assert train[0]["label"] == pytest.approx(5.0)
    assert train[1]["label"] == pytest.approx(3.8, abs=1e-6)
    assert dev[0]["sentence1"] == "A man with a hard hat is dancing."
    assert td.test is not None and len(td.test) == 1379
    assert all(math.isnan(s) for s in col(td.test, "label"))
    assert td.metrics == ["pearson", "spearman", "mse", "mae"] and td.primary_metric == "pearson"


def test_label_ids_follow_hub_order():
    # ClassLabel orders of nyu-mll/glue, written out independently of GLUE_TASKS.
    hub_order = {
        "cola": ["unacceptable", "acceptable"],
        "sst2": ["negative", "positive"],
        "mrpc": ["not_equivalent", "equivalent"],
        "rte": ["entailment", "not_entailment"],
        "wnli": ["not_entailment", "entailment"],
    }
    for task, names in hub_order.items():
        td = real(task)
        assert td.label_names == names
        assert td.train.features["label"].names == names
        assert td.id2label == dict(enumerate(names))
    assert GLUE_TASKS["qqp"].label_names == ("not_duplicate", "duplicate")
    assert GLUE_TASKS["qnli"].label_names == ("entailment", "not_entailment")
    assert GLUE_TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["ax"].label_names == ("entailment", "neutral", "contradiction")


def test_known_rows_text_and_label():
    rte = real("rte")
    assert rte.train[0] == {
        "sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
        "sentence2": "Weapons of Mass Destruction Found in Iraq.",
        "label": 1,  # not_entailment
        "idx": 0,
    }
    assert rte.eval_splits["validation"][0]["sentence2"] == "Christopher Reeve had an accident."
    assert rte.eval_splits["validation"][0]["label"] == 1  # not_entailment

    wnli_dev = real("wnli").eval_splits["validation"]
    assert wnli_dev[0]["sentence2"] == "The hair has to be cleaned." and wnli_dev[0]["label"] == 0
    assert wnli_dev[1]["sentence2"] == "Susan did not answer." and wnli_dev[1]["label"] == 1

    cola_dev = real("cola").eval_splits["validation"]
    assert cola_dev[0]["sentence"] == "The sailors rode the breeze clear of the rocks."
    assert cola_dev[0]["label"] == 1

    sst_dev = real("sst2").eval_splits["validation"]
    assert sst_dev[1] == {"sentence": "unflinchingly bleak and desperate ", "label": 0, "idx": 1}
    assert real("sst2").train[0]["sentence"] == "hide new secretions from the parental units "

    mrpc_dev = real("mrpc").eval_splits["validation"]
    # Quoting is off: the unbalanced leading quote stays in the text and rows don't merge.
    assert mrpc_dev[0]["sentence2"] == (
        '"The foodservice pie business does not fit our long-term growth strategy.'
    )
    assert mrpc_dev[0]["label"] == 1
    assert mrpc_dev[1]["sentence1"].startswith("Magnarelli said Racicot hated the Iraqi regime")
    assert mrpc_dev[1]["label"] == 0


def test_columns_and_taskdata_fields():
    expected_cols = {
        "cola": ["sentence", "label", "idx"],
        "sst2": ["sentence", "label", "idx"],
        "mrpc": ["sentence1", "sentence2", "label", "idx"],
        "rte": ["sentence1", "sentence2", "label", "idx"],
        "wnli": ["sentence1", "sentence2", "label", "idx"],
        "stsb": ["sentence1", "sentence2", "label", "idx"],
    }
    for task, cols in expected_cols.items():
        td = real(task)
        assert td.name == f"glue/{task}"
        assert td.train.column_names == cols
        assert td.eval_splits["validation"].column_names == cols
        assert td.test.column_names == cols
        assert td.text_fields == tuple(cols[:-2])
    assert real("cola").metrics == ["matthews_correlation", "accuracy"]
    assert real("cola").primary_metric == "matthews_correlation"
    assert real("mrpc").metrics == ["accuracy", "f1"] and real("mrpc").primary_metric == "f1"
    assert real("rte").metrics == ["accuracy"] and not real("rte").is_regression
    assert real("rte").num_labels == 2


@pytest.mark.parametrize(
    "task,n_test", [("rte", 3000), ("cola", 1063), ("sst2", 1821), ("mrpc", 1725), ("wnli", 146)]
)
def test_test_split_unlabelled(task, n_test):
    td = real(task)
    assert len(td.test) == n_test
    assert set(col(td.test, "label")) == {-1}
    assert col(td.test, "idx") == list(range(n_test))
    assert td.extra["test_splits"]["test"] is td.test


def test_cola_test_text():
    # CoLA test has a header (index, sentence), unlike train/dev.
    assert real("cola").test[0]["sentence"] == "Bill whistled past the house."


def test_data_dir_may_be_the_task_folder():
    td = load_glue(cfg("rte", data_dir=GLUE_DIR / "RTE"))
    assert len(td.train) == 2490 and len(td.eval_splits["validation"]) == 277
    assert td.train[0]["label"] == 1


def test_sst2_loads_fast():
    t0 = time.perf_counter()
    td = load_glue(cfg("sst2"))
    elapsed = time.perf_counter() - t0
    assert len(td.train) == 67349
    # ~1 s here; generous bound for a loaded shared CI machine.
    assert elapsed < 10.0


def test_subsampling_is_deterministic_and_keeps_idx():
    full = real("rte")
    a = load_glue(cfg("rte", max_train_samples=50, max_eval_samples=20, subsample_seed=7))
    b = load_glue(cfg("rte", max_train_samples=50, max_eval_samples=20, subsample_seed=7))
    c = load_glue(cfg("rte", max_train_samples=50, max_eval_samples=20, subsample_seed=8))
    assert len(a.train) == 50 and len(a.eval_splits["validation"]) == 20
    assert col(a.train, "idx") == col(b.train, "idx")
    assert col(a.eval_splits["validation"], "idx") == col(b.eval_splits["validation"], "idx")
    assert col(a.train, "idx") != col(c.train, "idx")
    idx = col(a.train, "idx")
    assert idx == sorted(idx) and len(set(idx)) == 50 and all(0 <= i < 2490 for i in idx)
    # Each kept row is the original row with the same idx (text and label travel together).
    for row in a.train:
        orig = full.train[row["idx"]]
        assert row == orig
    for row in a.eval_splits["validation"]:
        assert row == full.eval_splits["validation"][row["idx"]]
    # Test split is not subsampled.
    assert len(a.test) == 3000
    # Asking for more than there is keeps everything.
    d = load_glue(cfg("wnli", max_train_samples=10_000, max_eval_samples=10_000))
    assert len(d.train) == 635 and len(d.eval_splits["validation"]) == 71


def test_attribute_access_config_works():
    ns = SimpleNamespace(
        name="glue/wnli", dataset="wnli", data_dir=str(GLUE_DIR), hub_path="nyu-mll/glue",
        max_train_samples=5, max_eval_samples=None, primary_metric="accuracy",
    )
    with pytest.raises(ConfigError, match=r"^task\.subsample_seed is not set"):
        load_glue(ns)  # the YAML is the one home of its default: not silently 0
    ns.subsample_seed = 0
    td = load_glue(ns)
    assert len(td.train) == 5 and len(td.eval_splits["validation"]) == 71
    assert col(td.train, "idx") == col(load_glue(cfg("wnli", max_train_samples=5, subsample_seed=0)).train, "idx")


# --------------------------------------------------------------------------- configs


def test_every_task_yaml_parses_and_matches_glue_tasks():
    files = sorted((REPO / "conf" / "task" / "glue").glob("*.yaml"))
    names = {p.stem for p in files}
    assert names == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "ax"}
    keys = [
        "name", "loader", "dataset", "hub_path", "data_dir", "max_length",
        "max_train_samples", "max_eval_samples", "subsample_seed", "primary_metric",
    ]
    primaries = {"cola": "matthews_correlation", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}
    for p in files:
        assert p.read_text().startswith("# @package task\n")
        c = OmegaConf.load(p)
        assert list(c.keys()) == keys
        assert c.name == f"glue/{p.stem}" and c.dataset == p.stem and c.loader == "glue"
        assert c.hub_path == "nyu-mll/glue" and c.data_dir is None
        assert c.primary_metric == primaries.get(p.stem, "accuracy")
        assert c.primary_metric in GLUE_TASKS[p.stem].metrics


def test_yaml_config_loads_real_data(tmp_path):
    c = OmegaConf.load(REPO / "conf" / "task" / "glue" / "wnli.yaml")
    c.data_dir = str(GLUE_DIR)
    td = load_glue(c)
    assert td.name == "glue/wnli" and len(td.train) == 635


def test_bad_config_values():
    with pytest.raises(ConfigError, match=r"task\.dataset='nope'.*rte"):
        load_glue(cfg("nope"))
    with pytest.raises(ConfigError, match=r"task\.primary_metric='f1'.*accuracy"):
        load_glue(cfg("rte", primary_metric="f1"))
    with pytest.raises(ConfigError, match=r"task\.max_train_samples"):
        load_glue(cfg("rte", max_train_samples=0))
    with pytest.raises(ConfigError, match=r"task\.max_eval_samples"):
        load_glue(cfg("rte", max_eval_samples="ten"))


# --------------------------------------------------------------------------- tmp_path fixtures


def write(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


def rte_dir(root: Path, train=None, dev=None) -> Path:
    write(root / "RTE" / "train.tsv", train or [RTE_HEADER, "0\tA b.\tA.\tentailment", "1\tC d.\tE.\tnot_entailment"])
    write(root / "RTE" / "dev.tsv", dev or [RTE_HEADER, "0\tF g.\tF.\tentailment"])
    return root


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_small_local_rte_without_test_file(tmp_path):
    td = load_glue(cfg("rte", data_dir=rte_dir(tmp_path)))
    assert col(td.train, "label") == [0, 1] and col(td.eval_splits["validation"], "label") == [0]
    assert td.test is None and td.extra["test_splits"] == {}


def test_error_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=missing))
    msg = one_line_error(ei)
    assert str(missing) in msg and "<data_dir>/RTE/{train,dev}.tsv" in msg


def test_error_missing_task_folder(tmp_path):
    (tmp_path / "CoLA").mkdir()
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "RTE") in msg and "task.data_dir" in msg


def test_error_missing_file(tmp_path):
    write(tmp_path / "RTE" / "train.tsv", [RTE_HEADER, "0\ta\tb\tentailment"])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert f"missing GLUE file {tmp_path / 'RTE' / 'dev.tsv'}" in msg
    assert "task.data_dir" in msg and "<data_dir>/RTE/{train,dev}.tsv" in msg


def test_error_bad_column_count(tmp_path):
    rte_dir(tmp_path, train=[RTE_HEADER, "0\ta\tb\tentailment", "1\tonly three\tentailment"])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "RTE" / "train.tsv") in msg
    assert "line 3" in msg and "3 tab-separated columns, expected 4" in msg


def test_error_bad_column_count_headerless_cola(tmp_path):
    write(tmp_path / "CoLA" / "train.tsv", ["gj04\t1\t\tFine.", "gj04\t0\tBad row."])
    write(tmp_path / "CoLA" / "dev.tsv", ["gj04\t1\t\tFine."])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("cola", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "CoLA" / "train.tsv") in msg and "line 2" in msg


def test_error_bad_string_label(tmp_path):
    rte_dir(tmp_path, dev=[RTE_HEADER, "0\ta\tb\tentailment", "1\tc\td\tmaybe"])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "RTE" / "dev.tsv") in msg and "line 3" in msg
    assert "'maybe'" in msg and "entailment, not_entailment" in msg


def test_error_bad_int_label(tmp_path):
    hdr = "index\tsentence1\tsentence2\tlabel"
    write(tmp_path / "WNLI" / "train.tsv", [hdr, "0\ta\tb\t2"])
    write(tmp_path / "WNLI" / "dev.tsv", [hdr, "0\ta\tb\t1"])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("wnli", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "WNLI" / "train.tsv") in msg and "line 2" in msg and "'2'" in msg
    assert "0 (not_entailment), 1 (entailment)" in msg


@pytest.mark.parametrize("score", ["6.5", "abc", "nan", "-0.1"])
def test_error_bad_stsb_score(tmp_path, score):
    hdr = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    ok = "0\tg\tf\t2012\t0001\tnone\tnone\tA.\tB.\t4.0"
    write(tmp_path / "STS-B" / "train.tsv", [hdr, ok, ok.replace("4.0", score)])
    write(tmp_path / "STS-B" / "dev.tsv", [hdr, ok])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("stsb", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "STS-B" / "train.tsv") in msg and "line 3" in msg and repr(score) in msg


def test_error_empty_split_header_only(tmp_path):
    rte_dir(tmp_path, dev=[RTE_HEADER])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "RTE" / "dev.tsv") in msg and "no data rows" in msg


def test_error_empty_file(tmp_path):
    rte_dir(tmp_path)
    (tmp_path / "RTE" / "train.tsv").write_text("")
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "RTE" / "train.tsv") in msg and "empty" in msg


def test_error_missing_column(tmp_path):
    rte_dir(tmp_path, train=["index\tsentence1\tsentence2", "0\ta\tb"])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "RTE" / "train.tsv") in msg and "'label'" in msg


def test_local_mnli_layout(tmp_path):
    # MNLI header as in the GLUE files (train has label1; dev has label1..label5).
    base = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    def row(i, p, h, extra):
        return "\t".join([str(i), "1", "1n", "fiction", "(", "(", "(", "(", p, h, *extra])
    write(tmp_path / "MNLI" / "train.tsv", ["\t".join(base + ["label1", "gold_label"]),
                                           row(0, "P0", "H0", ["neutral", "neutral"]),
                                           row(1, "P1", "H1", ["contradiction", "contradiction"]),
                                           row(2, "P2", "H2", ["entailment", "entailment"])])
    dev_hdr = "\t".join(base + ["label1", "label2", "label3", "label4", "label5", "gold_label"])
    five = ["entailment"] * 5
    write(tmp_path / "MNLI" / "dev_matched.tsv", [dev_hdr, row(0, "M", "m", five + ["entailment"])])
    write(tmp_path / "MNLI" / "dev_mismatched.tsv", [dev_hdr, row(0, "X", "x", five + ["contradiction"]),
                                                     row(1, "Y", "y", five + ["neutral"])])
    write(tmp_path / "MNLI" / "test_matched.tsv", ["\t".join(base), row(0, "T", "t", [])])
    write(tmp_path / "MNLI" / "test_mismatched.tsv", ["\t".join(base), row(0, "U", "u", []), row(1, "V", "v", [])])
    td = load_glue(cfg("mnli", data_dir=tmp_path))
    assert td.train.column_names == ["premise", "hypothesis", "label", "idx"]
    assert col(td.train, "premise") == ["P0", "P1", "P2"]
    assert col(td.train, "label") == [1, 2, 0]  # neutral, contradiction, entailment
    assert list(td.eval_splits) == ["matched", "mismatched"]
    assert col(td.eval_splits["matched"], "label") == [0]
    assert col(td.eval_splits["mismatched"], "label") == [2, 1]
    assert col(td.test, "premise") == ["T"] and col(td.test, "label") == [-1]
    assert len(td.extra["test_splits"]["mismatched"]) == 2
    assert td.primary_metric == "accuracy" and td.num_labels == 3


def test_local_mnli_missing_dev_file_names_layout(tmp_path):
    write(tmp_path / "MNLI" / "train.tsv", ["sentence1\tsentence2\tgold_label", "a\tb\tneutral"])
    with pytest.raises(DataError) as ei:
        load_glue(cfg("mnli", data_dir=tmp_path))
    msg = one_line_error(ei)
    assert str(tmp_path / "MNLI" / "dev_matched.tsv") in msg
    assert "<data_dir>/MNLI/{train,dev_matched,dev_mismatched}.tsv" in msg


def test_local_ax_is_test_only(tmp_path):
    p = tmp_path / "diagnostic" / "diagnostic.tsv"
    p.parent.mkdir()
    p.write_text("index\tsentence1\tsentence2\n0\tThe cat sat.\tA cat sat.\n1\tNo.\tYes.")  # no final newline
    td = load_glue(cfg("ax", data_dir=tmp_path))
    assert td.train is None and td.eval_splits == {}
    assert td.test.column_names == ["premise", "hypothesis", "label", "idx"]
    assert col(td.test, "premise") == ["The cat sat.", "No."] and col(td.test, "label") == [-1, -1]
    with pytest.raises(DataError) as ei:
        load_glue(cfg("ax", data_dir=tmp_path / "empty_elsewhere"))
    assert "<data_dir>/diagnostic/diagnostic.tsv" in one_line_error(ei)


def test_local_qqp_and_qnli(tmp_path):
    write(tmp_path / "QQP" / "train.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                                          "0\t1\t2\tWhy?\tHow?\t0", "1\t3\t4\tWho?\tWho is?\t1"])
    write(tmp_path / "QQP" / "dev.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tA?\tB?\t1"])
    write(tmp_path / "QQP" / "test.tsv", ["id\tquestion1\tquestion2", "0\tC?\tD?"])
    qqp = load_glue(cfg("qqp", data_dir=tmp_path))
    assert qqp.train.column_names == ["question1", "question2", "label", "idx"]
    assert col(qqp.train, "label") == [0, 1] and col(qqp.test, "label") == [-1]
    assert qqp.primary_metric == "f1"

    hdr = "index\tquestion\tsentence\tlabel"
    write(tmp_path / "QNLI" / "train.tsv", [hdr, "0\tQ?\tS.\tnot_entailment", "1\tR?\tT.\tentailment"])
    write(tmp_path / "QNLI" / "dev.tsv", [hdr, "0\tQ?\tS.\tentailment"])
    qnli = load_glue(cfg("qnli", data_dir=tmp_path))
    assert qnli.train.column_names == ["question", "sentence", "label", "idx"]
    assert col(qnli.train, "label") == [1, 0]


def test_mrpc_bom_header(tmp_path):
    hdr = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    write(tmp_path / "MRPC" / "train.tsv", [hdr, '1\t1\t2\t"Quoted start.\tPlain.'], bom=True)
    write(tmp_path / "MRPC" / "dev.tsv", [hdr, "0\t1\t2\tA.\tB."], bom=True)
    td = load_glue(cfg("mrpc", data_dir=tmp_path))
    assert td.train[0] == {"sentence1": '"Quoted start.', "sentence2": "Plain.", "label": 1, "idx": 0}


# --------------------------------------------------------------------------- hub source


def test_offline_hub_error_mentions_data_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    before = datasets.config.HF_HUB_OFFLINE
    t0 = time.perf_counter()
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=None))
    msg = one_line_error(ei)
    assert "cannot be reached" in msg and "task.data_dir=/path/to/glue_data" in msg
    assert "task=synthetic" in msg
    # Offline flags set after import are honoured (no network retries) and then restored.
    assert time.perf_counter() - t0 < 20
    assert datasets.config.HF_HUB_OFFLINE == before


def _fake_hub(monkeypatch, result=None, exc=None):
    calls = []

    def fake_load_dataset(path, name, *a, **k):
        calls.append((path, name))
        if exc is not None:
            raise exc
        return result

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_connection_error_without_offline_flags(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    _fake_hub(monkeypatch, exc=OSError("[Errno -2] Name or service not known"))
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=None))
    msg = one_line_error(ei)
    assert "cannot be reached" in msg and "task.data_dir" in msg

    _fake_hub(monkeypatch, exc=ValueError("config 'rte' broken\nsecond line"))
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=None))
    msg = one_line_error(ei)
    assert "could not load nyu-mll/glue/rte" in msg and "task.data_dir" in msg


def _hub_rte(names=("entailment", "not_entailment")):
    feats = datasets.Features({
        "sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(names)), "idx": datasets.Value("int32"),
    })
    def split(n, lab):
        return datasets.Dataset.from_dict(
            {"sentence1": [f"p{i}" for i in range(n)], "sentence2": [f"h{i}" for i in range(n)],
             "label": [lab(i) for i in range(n)], "idx": list(range(n))}, features=feats)
    return datasets.DatasetDict(
        train=split(30, lambda i: i % 2), validation=split(10, lambda i: 0), test=split(5, lambda i: -1)
    )


def test_hub_source_builds_taskdata(monkeypatch):
    calls = _fake_hub(monkeypatch, result=_hub_rte())
    td = load_glue(cfg("rte", data_dir=None, hub_path="my/glue-mirror", max_train_samples=8, subsample_seed=1))
    assert calls == [("my/glue-mirror", "rte")]
    assert len(td.train) == 8 and col(td.train, "idx") == sorted(col(td.train, "idx"))
    assert all(td.train[j]["sentence1"] == f"p{i}" for j, i in enumerate(col(td.train, "idx")))
    assert len(td.eval_splits["validation"]) == 10 and len(td.test) == 5
    assert td.extra["source"] == "hub:my/glue-mirror/rte"


def test_hub_label_order_mismatch_is_refused(monkeypatch):
    _fake_hub(monkeypatch, result=_hub_rte(names=("not_entailment", "entailment")))
    with pytest.raises(DataError) as ei:
        load_glue(cfg("rte", data_dir=None))
    assert "label order" in one_line_error(ei)


def test_glue_tasks_static_facts():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "ax"}
    for name, info in GLUE_TASKS.items():
        assert info.name == name
        assert info.primary_metric in info.metrics
        assert len(info.text_fields) == len(info.source_columns)
    assert GLUE_TASKS["stsb"].is_regression and GLUE_TASKS["stsb"].label_names is None
    assert GLUE_TASKS["mnli"].layout == "<data_dir>/MNLI/{train,dev_matched,dev_mismatched}.tsv"
    assert glue_mod.DEFAULT_HUB_PATH == "nyu-mll/glue"
