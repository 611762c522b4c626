"""CoT-distillation loader on the real DSS files in shared/data/cot, plus error cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cmiexp.data.safe_eval import svamp_correct
from cmiexp.data.cot import (
    explain_input,
    format_example,
    load_cot,
    parse_llm_output,
    predict_input,
)
from cmiexp.errors import ConfigError, DataError

COT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cot"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "task" / "cot"


def load_shipped(keys: dict):
    """``load_cot`` of the shipped ``conf/task/cot/<dataset>.yaml`` with ``keys`` on top: the YAML is
    the one home of the loader's defaults, so a test names only what it changes."""
    shipped = CONF_DIR / f"{keys['dataset']}.yaml"
    return load_cot(OmegaConf.merge(OmegaConf.load(shipped), keys) if shipped.is_file() else keys)


def test_a_key_the_dataset_reads_and_the_config_lacks_is_named():
    # No second copy of the YAML defaults in code: a hand-written config without them is refused.
    with pytest.raises(ConfigError, match=r"^task\.label_source is not set: add it to your task config"):
        load_cot({"dataset": "svamp", "data_dir": str(COT_DIR)})
    base = {"dataset": "cqa", "data_dir": str(COT_DIR), "label_source": "llm", "metric": "accuracy"}
    with pytest.raises(ConfigError, match=r"^task\.valid_fraction is not set"):
        load_cot(base)  # cqa carves valid from train
    with pytest.raises(ConfigError, match=r"^task\.require_train is not set"):
        load_cot(dict(base, dataset="anli1"))  # anli1 has a valid file; no carve keys needed


def _row_with_idx(ds, idx: int) -> dict:
    idxs = ds["idx"][:]
    return ds[idxs.index(idx)]


@pytest.fixture(scope="module")
def svamp():
    return load_shipped({"dataset": "svamp", "data_dir": str(COT_DIR)})


@pytest.fixture(scope="module")
def cqa():
    return load_shipped({"dataset": "cqa", "data_dir": str(COT_DIR)})


@pytest.fixture(scope="module")
def anli():
    return load_shipped({"dataset": "anli1", "data_dir": str(COT_DIR), "require_train": False})


# --- counts and the valid carve ----------------------------------------------------------------


def test_split_sizes(svamp, cqa, anli):
    assert (len(svamp.train), len(svamp.valid), len(svamp.test)) == (720, 80, 200)
    assert (len(cqa.train), len(cqa.valid), len(cqa.test)) == (8766, 975, 1221)
    assert anli.train is None
    assert (len(anli.valid), len(anli.test)) == (1000, 1000)
    for data in (svamp, cqa, anli):
        for ds in data.splits().values():
            assert ds.column_names == ["idx", "input", "label", "llm_label", "rationale", "target"]


@pytest.mark.parametrize("which, n", [("svamp", 800), ("cqa", 9741)])
def test_valid_carve_is_the_dss_split(which, n, svamp, cqa):
    # HF train_test_split(test_size=0.1, seed=0) = first ceil(0.1 n) of default_rng(0).permutation(n).
    data = {"svamp": svamp, "cqa": cqa}[which]
    perm = np.random.default_rng(0).permutation(n)
    n_valid = -(-n // 10)
    assert list(data.valid["idx"][:]) == perm[:n_valid].tolist()
    assert list(data.train["idx"][:]) == perm[n_valid:].tolist()
    assert set(data.train["idx"][:]).isdisjoint(data.valid["idx"][:])


def test_test_split_keeps_file_order(svamp, anli):
    assert list(svamp.test["idx"][:]) == list(range(200))
    assert list(anli.valid["idx"][:]) == list(range(1000))


# --- templates and parsing of known rows -------------------------------------------------------


def test_svamp_known_row(svamp):
    row = _row_with_idx(svamp.train, 0)  # first line of svamp_train.json / train_CoT_0.json
    assert row["input"] == (
        "Luke scored 84 points after playing 2 rounds of a trivia game. If he gained the same number "
        "of points each round\nHow many points did he score per round?"
    )
    assert row["label"] == "( 84.0 / 2.0 )"
    assert row["llm_label"] == "(84 / 2)"
    assert row["rationale"] == "Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. 84 / 2 = 42."
    assert row["target"] == "(84 / 2)"  # label_source defaults to llm


def test_cqa_known_row(cqa):
    row = _row_with_idx(cqa.train, 0)
    assert row["input"] == (
        '"There are 10 apples on an apple tree.  Three fall off.  Now there are X apples."  What is this '
        "an example of?\nAnswer Choices:\n(a) park\n(b) coloring book\n(c) garden center\n(d) math problem\n"
        "(e) gravity"
    )
    assert row["label"] == "math problem"
    assert row["llm_label"] == "math problem"
    assert row["rationale"] == (
        "The answer must be something that has to do with the above problem. Of the above choices, only "
        "math problem has to do with the above problem."
    )


def test_anli_known_row(anli):
    row = anli.valid[0]
    assert row["input"] == (
        "Linguistics is the scientific study of language, and involves an analysis of language form, "
        "language meaning, and language in context. The earliest activities in the documentation and "
        "description of language have been attributed to the 4th century BCE Indian grammarian "
        "P\u0101\u1e47ini, who wrote a formal description of the Sanskrit language in his "
        '"A\u1e63\u1e6d\u0101dhy\u0101y\u012b ".</s>Form and meaning are the only aspects of language '
        "linguistics is concerned with."
    )
    assert row["label"] == "contradiction"  # gold id 2
    assert row["llm_label"] == "contradiction"
    assert row["rationale"] == (
        "Linguistics involves an analysis of language form, language meaning, and language in context, "
        "so context is also a crucial aspect."
    )


def test_nli_separator_is_configurable():
    data = load_shipped(
        {"dataset": "anli1", "data_dir": str(COT_DIR), "require_train": False, "nli_separator": "\n", "max_eval_samples": 3}
    )
    assert data.valid[0]["input"].endswith(".\nForm and meaning are the only aspects of language linguistics is concerned with.")
    assert "</s>" not in data.valid[0]["input"]


def test_prefixes():
    assert predict_input("x y") == "predict: x y"
    assert explain_input("x y") == "explain: x y"
    assert format_example("abc", "predict: ") == "predict: abc"


# --- teacher outputs align with rows -----------------------------------------------------------


def test_teacher_labels_agree_with_gold(svamp, cqa, anli):
    # Recomputed here from the columns; thresholds far above chance, exact figures from the README
    # (which parsed the same files with the DSS rules).
    sv_rows = list(zip(svamp.train["llm_label"][:], svamp.train["label"][:])) + list(
        zip(svamp.valid["llm_label"][:], svamp.valid["label"][:])
    )
    sv_train = sum(svamp_correct(p, g) for p, g in sv_rows) / len(sv_rows)
    sv_test = sum(svamp_correct(p, g) for p, g in zip(svamp.test["llm_label"][:], svamp.test["label"][:])) / 200
    assert sv_train >= 0.6 and sv_test >= 0.6
    assert round(100 * sv_train, 1) == 73.5 and round(100 * sv_test, 1) == 74.0

    cq_llm = list(cqa.train["llm_label"][:]) + list(cqa.valid["llm_label"][:])
    cq_gold = list(cqa.train["label"][:]) + list(cqa.valid["label"][:])
    cq_train = np.mean([p == g for p, g in zip(cq_llm, cq_gold)])
    cq_test = np.mean([p == g for p, g in zip(cqa.test["llm_label"][:], cqa.test["label"][:])])
    assert cq_train >= 0.6 and cq_test >= 0.6
    assert round(100 * cq_train, 1) == 74.3 and round(100 * cq_test, 1) == 77.2

    an_valid = np.mean([p == g for p, g in zip(anli.valid["llm_label"][:], anli.valid["label"][:])])
    an_test = np.mean([p == g for p, g in zip(anli.test["llm_label"][:], anli.test["label"][:])])
    assert an_valid >= 0.5 and an_test >= 0.5
    assert round(100 * an_valid, 1) == 66.8 and round(100 * an_test, 1) == 65.6
    assert anli.teacher_accuracy["valid"] == pytest.approx(an_valid)

    # A misaligned zip (rows shifted by one) would sit near chance instead.
    shifted = np.mean([p == g for p, g in zip(anli.valid["llm_label"][:][1:], anli.valid["label"][:][:-1])])
    assert shifted < 0.45


def test_rationales_are_cut_and_nonempty(svamp, cqa, anli):
    cases = [(svamp, "The answer is", "\nQ:"), (cqa, "So the answer is", "\nQ:"), (anli, "So the answer is", "Premise:")]
    for data, marker, continuation in cases:
        for split, ds in data.splits().items():
            for rationale, llm_label in zip(ds["rationale"][:], ds["llm_label"][:]):
                assert rationale.strip(), (data.dataset, split)
                assert continuation not in rationale, (data.dataset, split, rationale[:80])
                if llm_label:
                    assert marker not in rationale
            # Few parse failures (SVAMP ~1.6 %, CQA 3 rows, ANLI ~1 %).
            assert data.parse_failures[split] <= 0.02 * len(ds), (data.dataset, split)
    assert svamp.parse_failures == {"train": 12, "valid": 1, "test": 2}
    assert anli.parse_failures == {"valid": 9, "test": 10}


def test_label_source(svamp):
    assert list(svamp.train["target"][:]) == list(svamp.train["llm_label"][:])
    gold = load_shipped({"dataset": "svamp", "data_dir": str(COT_DIR), "label_source": "gold"})
    assert list(gold.train["target"][:]) == list(gold.train["label"][:])
    assert list(gold.train["idx"][:]) == list(svamp.train["idx"][:])  # same carve whatever the source
    assert list(gold.valid["target"][:]) == list(gold.valid["label"][:])


def test_sample_limits():
    data = load_shipped({"dataset": "svamp", "data_dir": str(COT_DIR), "max_train_samples": 5, "max_eval_samples": 7})
    assert (len(data.train), len(data.valid), len(data.test)) == (5, 7, 7)
    perm = np.random.default_rng(0).permutation(800)
    assert list(data.train["idx"][:]) == perm[80:85].tolist()


def test_yaml_configs_load():
    for ds in ("svamp", "cqa", "anli1", "esnli"):
        path = CONF_DIR / f"{ds}.yaml"
        assert path.read_text(encoding="utf-8").startswith("# @package task\n")
        cfg = OmegaConf.load(path)
        assert cfg.name == f"cot/{ds}" and cfg.loader == "cot" and cfg.dataset == ds
        assert cfg.data_dir is None and cfg.label_source == "llm" and cfg.metric == "accuracy"
        assert cfg.max_input_length == 1024 and cfg.max_target_length == 256
    cfg = OmegaConf.load(CONF_DIR / "svamp.yaml")
    cfg.data_dir = str(COT_DIR)
    cfg.max_eval_samples = 4
    data = load_cot(cfg)
    assert data.name == "cot/svamp" and (len(data.train), len(data.valid)) == (720, 4)


def test_accuracy_helpers(svamp, cqa):
    assert svamp.is_correct("(2 * 21)", "( 84.0 / 2.0 )")
    assert not cqa.is_correct("park", "gravity")
    assert cqa.accuracy(["park", " gravity "], ["park", "gravity"]) == 1.0
    assert svamp.accuracy(["(1 + 1)", "oops"], ["( 2.0 )", "( 3.0 )"]) == 0.5


# --- parser units ------------------------------------------------------------------------------


def test_parse_llm_output_rules():
    p = parse_llm_output("svamp", "He has 3 + 4 = 7. The answer is (3 + 4).\n\nQ: Another? The answer is (9).")
    assert (p.rationale, p.llm_label, p.ok) == ("He has 3 + 4 = 7.", "(3 + 4)", True)
    p = parse_llm_output("cqa", "Only b fits. So the answer is (b) coloring book.\n\nQ: x\nAnswer Choices:\n(a) y")
    assert (p.rationale, p.llm_label, p.ok) == ("Only b fits.", "coloring book", True)
    p = parse_llm_output("anli1", "It says so. So the answer is neutral.\n\nPremise: more\nHypothesis: text")
    assert (p.rationale, p.llm_label, p.ok) == ("It says so.", "neutral", True)
    # e-SNLI completions: "<rationale>\nAnswer: <label>\n\nPremise: ..." (DSS esnli llm files).
    p = parse_llm_output("esnli", "A land rover is a vehicle.\nAnswer: entailment\n\nPremise: A land rover.\nHypothesis: x")
    assert (p.rationale, p.llm_label, p.ok) == ("A land rover is a vehicle.", "entailment", True)
    # No marker: the cut completion is kept as rationale, the label is empty and flagged.
    p = parse_llm_output("anli1", "October is the tenth month, so the answer is entailment.\n\nPremise: x")
    assert (p.rationale, p.llm_label, p.ok) == ("October is the tenth month, so the answer is entailment.", "", False)
    p = parse_llm_output("svamp", "So 5 apples. The answer is 5.")
    assert (p.rationale, p.llm_label, p.ok) == ("So 5 apples.", "", False)
    with pytest.raises(ConfigError, match="task.dataset"):
        parse_llm_output("gsm8k", "x")


# --- errors on a synthetic folder --------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _esnli_folder(root: Path, n: int = 4) -> Path:
    ds = root / "esnli"
    for split in ("train", "valid", "test"):
        rows = [
            {"premise": f"P{split}{i}.", "hypothesis": f"H{i}.", "label": i % 3, "explanation_1": "e"} for i in range(n)
        ]
        _write_jsonl(ds / f"esnli_{split}.json", rows)
        names = ["entailment", "neutral", "contradiction"]
        outs = [f"Reason {i}.\nAnswer: {names[i % 3]}\n\nPremise: invented" for i in range(n)]
        _write_json(ds / "llm" / f"{split}_CoT_0.json", outs[:2])
        _write_json(ds / "llm" / f"{split}_CoT_1.json", outs[2:])
    return ds


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_synthetic_esnli_loads(tmp_path):
    _esnli_folder(tmp_path)
    data = load_shipped({"dataset": "esnli", "data_dir": str(tmp_path), "nli_separator": " | "})
    assert (len(data.train), len(data.valid), len(data.test)) == (4, 4, 4)
    row = data.valid[2]
    assert row == {
        "idx": 2,
        "input": "Pvalid2. | H2.",
        "label": "contradiction",
        "llm_label": "contradiction",
        "rationale": "Reason 2.",
        "target": "contradiction",
    }
    assert data.teacher_accuracy == {"train": 1.0, "valid": 1.0, "test": 1.0}


def test_error_data_dir_null():
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "svamp", "data_dir": None})
    msg = _one_line_error(ei)
    assert "task.data_dir" in msg and "datasets.zip" in msg


def test_error_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "cqa", "data_dir": str(tmp_path)})
    assert str(tmp_path / "cqa") in _one_line_error(ei)


def test_error_missing_row_file(tmp_path):
    ds = _esnli_folder(tmp_path)
    (ds / "esnli_test.json").unlink()
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})
    msg = _one_line_error(ei)
    assert str(ds / "esnli_test.json") in msg and "llm" in msg  # names the path and the layout


def test_error_missing_train_and_require_train(tmp_path):
    ds = _esnli_folder(tmp_path)
    (ds / "esnli_train.json").unlink()
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})
    msg = _one_line_error(ei)
    assert "esnli_train.json" in msg and "task.require_train=false" in msg
    data = load_shipped({"dataset": "esnli", "data_dir": str(tmp_path), "require_train": False})
    assert data.train is None and len(data.valid) == 4


def test_error_anli1_without_train_file():
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "anli1", "data_dir": str(COT_DIR)})
    msg = _one_line_error(ei)
    assert "anli1_train.json" in msg and "require_train" in msg


def test_error_missing_llm_files(tmp_path):
    ds = _esnli_folder(tmp_path)
    for p in (ds / "llm").glob("valid_CoT_*.json"):
        p.unlink()
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})
    assert str(ds / "llm" / "valid_CoT_0.json") in _one_line_error(ei)


def test_error_gap_in_llm_batches(tmp_path):
    ds = _esnli_folder(tmp_path)
    (ds / "llm" / "test_CoT_1.json").rename(ds / "llm" / "test_CoT_2.json")
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})
    assert "test_CoT_1.json" in _one_line_error(ei)


def test_error_length_mismatch(tmp_path):
    ds = _esnli_folder(tmp_path)
    _write_json(ds / "llm" / "train_CoT_1.json", ["Only one.\nAnswer: neutral"])
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})
    msg = _one_line_error(ei)
    assert "esnli_train.json" in msg and "train_CoT_0.json" in msg and "train_CoT_1.json" in msg
    assert "4 rows" in msg and "3 teacher outputs" in msg


def test_error_bad_json_line(tmp_path):
    ds = _esnli_folder(tmp_path)
    with open(ds / "esnli_valid.json", "a", encoding="utf-8") as f:
        f.write("{not json\n")
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})
    assert f"{ds / 'esnli_valid.json'}:5" in _one_line_error(ei)


def test_error_llm_file_not_array_of_strings(tmp_path):
    ds = _esnli_folder(tmp_path)
    _write_json(ds / "llm" / "test_CoT_0.json", {"0": "x"})
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})
    assert "test_CoT_0.json" in _one_line_error(ei)


def test_error_bad_row_fields(tmp_path):
    ds = _esnli_folder(tmp_path)
    _write_jsonl(ds / "esnli_test.json", [{"premise": "p", "hypothesis": "h", "label": 5}] * 4)
    with pytest.raises(DataError) as ei:
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})
    assert "esnli_test.json:1" in _one_line_error(ei) and "label" in str(ei.value)
    _write_jsonl(ds / "esnli_test.json", [{"premise": "p", "label": 0}] * 4)
    with pytest.raises(DataError, match="hypothesis"):
        load_shipped({"dataset": "esnli", "data_dir": str(tmp_path)})


@pytest.mark.parametrize(
    "override, key",
    [
        ({"dataset": "gsm8k"}, "task.dataset"),
        ({"dataset": None}, "task.dataset"),
        ({"label_source": "teacher"}, "task.label_source"),
        ({"valid_fraction": 1.5}, "task.valid_fraction"),
        ({"split_seed": -1}, "task.split_seed"),
        ({"max_train_samples": 0}, "task.max_train_samples"),
        ({"max_eval_samples": "10"}, "task.max_eval_samples"),
        ({"metric": "f1"}, "task.metric"),
        ({"dataset": "anli1", "require_train": None}, "task.require_train=None must be true or false"),
        ({"dataset": "anli1", "nli_separator": None}, "task.nli_separator=None must be a string"),
    ],
)
def test_config_errors(override, key):
    cfg = {"dataset": "svamp", "data_dir": str(COT_DIR), **override}
    with pytest.raises(ConfigError) as ei:
        load_shipped(cfg)
    assert key in _one_line_error(ei)
