"""Hub task loaders (SICK, WASSA-2017, LCP, CRP, Humicroedit, BoolQ, HellaSwag, Social IQa) on fixture
files written in each source's schema, target normalisation, and regression metrics vs scikit-learn."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from cmiexp.data import load_task
from cmiexp.data.hub_tasks import HUB_TASKS, humicroedit_headlines
from cmiexp.data.targets import denormalize, normalize_task_targets, target_stats
from cmiexp.errors import CmiexpError, ConfigError, DataError
from tests.conftest import compose_config

# ----------------------------------------------------------------------------- fixture rows (hub schemas)

SICK = {
    "train": [
        {"id": "1", "sentence_A": "A man is playing a guitar.", "sentence_B": "A man plays guitar.", "label": 0,
         "relatedness_score": 4.5, "entailment_AB": "A_entails_B"},
        {"id": "2", "sentence_A": "A dog runs.", "sentence_B": "A cat sleeps.", "label": 1,
         "relatedness_score": 1.5, "entailment_AB": "A_neutral_B"},
        {"id": "3", "sentence_A": "Kids are outside.", "sentence_B": "Children play outdoors.", "label": 0,
         "relatedness_score": 3.9, "entailment_AB": "A_entails_B"},
    ],
    "validation": [
        {"id": "4", "sentence_A": "A woman cuts onions.", "sentence_B": "Onions are cut.", "label": 0,
         "relatedness_score": 4.2, "entailment_AB": "A_entails_B"},
    ],
    "test": [
        {"id": "5", "sentence_A": "Nobody is here.", "sentence_B": "A crowd gathers.", "label": 2,
         "relatedness_score": 2.0, "entailment_AB": "A_contradicts_B"},
    ],
}
HUMICROEDIT = {
    "train": [
        {"id": 1, "original": "France is <hunting/> down its citizens", "edit": "twerking", "grades": "10000",
         "meanGrade": 0.2},
        {"id": 2, "original": "Trump <praises/> the economy", "edit": "tickles", "grades": "32211", "meanGrade": 1.8},
    ],
    "validation": [
        {"id": 3, "original": "Senate <votes/> on bill", "edit": "dances", "grades": "22110", "meanGrade": 1.2},
    ],
}
BOOLQ = {
    "train": [
        {"question": "is the sky blue", "answer": True, "passage": "The sky appears blue."},
        {"question": "do fish fly", "answer": False, "passage": "Fish swim in water."},
    ],
    "validation": [{"question": "is water wet", "answer": True, "passage": "Water is a liquid."}],
}
HELLASWAG = {
    "train": [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
         "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
         "endings": [", the man adds wax.", ", a person boards a lift.", ", the man puts on a coat.",
                     ", the man continues removing the snow."], "source_id": "x", "split": "train",
         "split_type": "indomain", "label": "3"},
        {"ind": 5, "activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "she",
         "ctx": "She mixes flour. she", "endings": ["bakes it.", "swims.", "flies.", "sings."], "source_id": "y",
         "split": "train", "split_type": "indomain", "label": "0"},
    ],
    "validation": [
        {"ind": 6, "activity_label": "Running", "ctx_a": "He ties his shoes.", "ctx_b": "he",
         "ctx": "He ties his shoes. he", "endings": ["reads.", "runs off.", "sleeps.", "eats."], "source_id": "z",
         "split": "val", "split_type": "indomain", "label": "1"},
    ],
    "test": [  # the hub's test split is unlabelled: it must be dropped, not fail
        {"ind": 7, "activity_label": "Cooking", "ctx_a": "a", "ctx_b": "b", "ctx": "a b",
         "endings": ["1", "2", "3", "4"], "source_id": "t", "split": "test", "split_type": "indomain", "label": ""},
    ],
}
SIQA = {
    "train": [
        {"context": "Tracy didn't go home that evening.", "question": "What does Tracy need to do before this?",
         "answerA": "make a new plan", "answerB": "Go home and see Riley", "answerC": "Find somewhere to go",
         "label": "1"},
        {"context": "Sydney walked past a homeless woman.", "question": "How would you describe Sydney?",
         "answerA": "sympathetic", "answerB": "like a person who was unable to help", "answerC": "incredulous",
         "label": "3"},
    ],
    "validation": [
        {"context": "Kai gave a gift.", "question": "Why did Kai do this?", "answerA": "to be kind",
         "answerB": "to be rude", "answerC": "to sleep", "label": "2"},
    ],
}
LCP = {
    "train": [
        {"id": "a1", "corpus": "bible", "sentence": "Seven days you shall eat.", "token": "days", "complexity": 0.1,
         "difficulty": "easy"},
        {"id": "a2", "corpus": "biomed", "sentence": "Mitochondrial DNA mutates.", "token": "Mitochondrial",
         "complexity": 0.6, "difficulty": "hard"},
    ],
    "validation": [
        {"id": "a3", "corpus": "europarl", "sentence": "The council agreed.", "token": "council", "complexity": 0.25,
         "difficulty": "easy"},
    ],
}


def _fake_load_dataset(monkeypatch, tables: dict, expect: tuple):
    """Replace datasets.load_dataset by one serving ``tables`` (split -> rows) for the expected hub id."""
    import datasets

    calls = []

    def fake(path, name=None, **kw):
        calls.append((path, name))
        assert (path, name) == expect, f"loader asked the hub for {(path, name)}, expected {expect}"
        return datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in tables.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def _task(name: str, *overrides: str):
    return load_task(compose_config([f"task={name}", *overrides]).task)


# ----------------------------------------------------------------------------- hub path, per task


def test_sick_from_hub_maps_fields_and_keeps_raw_scores(monkeypatch):
    calls = _fake_load_dataset(monkeypatch, SICK, ("RobZamp/sick", None))
    task = _task("reg/sick")
    assert calls and task.name == "reg/sick" and task.is_regression and task.num_labels == 1
    assert task.text_fields == ("sentence_A", "sentence_B")
    assert task.train["sentence_A"][:] == ["A man is playing a guitar.", "A dog runs.", "Kids are outside."]
    assert task.train["label"][:] == pytest.approx([4.5, 1.5, 3.9])
    assert task.train["idx"][:] == [0, 1, 2]
    assert list(task.eval_splits) == ["validation"] and task.eval_splits["validation"]["label"][:] == pytest.approx([4.2])
    assert task.test["label"][:] == pytest.approx([2.0])
    assert task.metrics == ["mse", "mae", "pearson", "spearman"] and task.primary_metric == "mse"


def test_humicroedit_builds_original_and_edited_headlines(monkeypatch):
    _fake_load_dataset(monkeypatch, HUMICROEDIT, ("SemEvalWorkshop/humicroedit", "subtask-1"))
    task = _task("reg/humicroedit")
    assert task.train["original"][:] == ["France is hunting down its citizens", "Trump praises the economy"]
    assert task.train["edited"][:] == ["France is twerking down its citizens", "Trump tickles the economy"]
    assert task.train["label"][:] == pytest.approx([0.2, 1.8])
    assert humicroedit_headlines("a <b/> c", "x") == ("a b c", "a x c")
    with pytest.raises(ValueError, match="no <word/> tag"):
        humicroedit_headlines("no tag here", "x")


def test_boolq_labels_and_passage_option(monkeypatch):
    _fake_load_dataset(monkeypatch, BOOLQ, ("google/boolq", None))
    task = _task("cls/boolq")
    assert task.label_names == ["false", "true"] and task.num_labels == 2
    assert task.train["label"][:] == [1, 0] and task.eval_splits["validation"]["label"][:] == [1]
    assert task.train["question"][:] == ["is the sky blue", "do fish fly"]
    assert task.train["passage"][:] == ["The sky appears blue.", "Fish swim in water."]
    assert _task("cls/boolq", "task.with_passage=false").train["passage"][:] == ["", ""]


def test_hellaswag_one_sequence_with_all_endings_and_index_label(monkeypatch):
    _fake_load_dataset(monkeypatch, HELLASWAG, ("Rowan/hellaswag", None))
    task = _task("cls/hellaswag")
    assert task.text_fields == ("text",) and task.num_labels == 4
    assert task.train["label"][:] == [3, 0] and task.eval_splits["validation"]["label"][:] == [1]
    text = task.train["text"][0]
    assert text == ("Please choose the correct ending to complete the given sentence: Removing ice from car: "
                    "Then, the man writes over the snow. then Ending1: , the man adds wax. Ending2: , a person "
                    "boards a lift. Ending3: , the man puts on a coat. Ending4: , the man continues removing the snow.")
    assert task.test is None  # the unlabelled hub test split is dropped


def test_siqa_one_sequence_with_all_answers_and_zero_based_label(monkeypatch):
    _fake_load_dataset(monkeypatch, SIQA, ("allenai/social_i_qa", None))
    task = _task("cls/siqa")
    assert task.num_labels == 3 and task.label_names == ["answer1", "answer2", "answer3"]
    assert task.train["label"][:] == [0, 2] and task.eval_splits["validation"]["label"][:] == [1]
    assert task.train["text"][0] == ("Please choose the correct answer to the question: Tracy didn't go home that "
                                     "evening. What does Tracy need to do before this? Answer1: make a new plan "
                                     "Answer2: Go home and see Riley Answer3: Find somewhere to go")


def test_lcp_from_hub(monkeypatch):
    _fake_load_dataset(monkeypatch, LCP, ("razvanalex/CWI-CompLex-single", None))
    task = _task("reg/lcp")
    assert task.text_fields == ("sentence", "token")
    assert task.train["token"][:] == ["days", "Mitochondrial"] and task.train["label"][:] == pytest.approx([0.1, 0.6])


def test_hub_unreachable_is_one_line_error_naming_data_dir(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        _task("reg/sick")
    msg = str(e.value)
    assert "\n" not in msg and "RobZamp/sick" in msg and "task.data_dir" in msg


def test_task_without_hub_copy_asks_for_data_dir():
    for name in ("reg/wassa", "reg/crp"):
        with pytest.raises(DataError, match="no standard Hugging Face hub copy; set task.data_dir"):
            _task(name)


# ----------------------------------------------------------------------------- local files


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_jsonl_gives_the_same_columns_as_the_hub(tmp_path, monkeypatch):
    for split, rows in SIQA.items():
        _write_jsonl(tmp_path / f"{split}.jsonl", rows)
    local = _task("cls/siqa", f"task.data_dir={tmp_path}")
    _fake_load_dataset(monkeypatch, SIQA, ("allenai/social_i_qa", None))
    hub = _task("cls/siqa")
    for a, b in ((local.train, hub.train), (local.eval_splits["validation"], hub.eval_splits["validation"])):
        assert a.to_list() == b.to_list()


def test_wassa_emoint_layout_headerless_tsv(tmp_path):
    # EmoInt distribution: <emotion>-ratings-0to1.{train,dev.gold}.txt, headerless: id, tweet, emotion, score.
    (tmp_path / "anger-ratings-0to1.train.txt").write_text(
        '10000\tso "angry" right now\tanger\t0.812\n10001\tmildly annoyed\tanger\t0.333\n')
    (tmp_path / "joy-ratings-0to1.train.txt").write_text("30000\twhat a day :)\tjoy\t0.9\n")
    (tmp_path / "anger-ratings-0to1.dev.gold.txt").write_text("10900\tfurious!!\tanger\t0.95\n")
    task = _task("reg/wassa", f"task.data_dir={tmp_path}")
    assert task.text_fields == ("text", "emotion")
    assert task.train["text"][:] == ['so "angry" right now', "mildly annoyed", "what a day :)"]
    assert task.train["emotion"][:] == ["anger", "anger", "joy"]
    assert task.train["label"][:] == pytest.approx([0.812, 0.333, 0.9])
    assert task.eval_splits["validation"]["label"][:] == pytest.approx([0.95])


def test_lcp_complex_tsv_with_quotes(tmp_path):
    header = "id\tcorpus\tsentence\ttoken\tcomplexity\n"
    (tmp_path / "lcp_single_train.tsv").write_text(
        header + '3ZLW\tbible\tHe said, "Go.\tsaid\t0.05\n3ZLX\tbiomed\tThe "alpha" chain.\tchain\t0.3\n')
    (tmp_path / "lcp_single_test.tsv").write_text(header + "4AB\teuroparl\tA vote.\tvote\t0.125\n")
    task = _task("reg/lcp", f"task.data_dir={tmp_path}", "task.validation_fraction=0.5")
    # no trial file: half of the 2 training rows become validation; the unbalanced quote stays in its row
    sentences = task.train["sentence"][:] + task.eval_splits["validation"]["sentence"][:]
    assert sorted(sentences) == ['He said, "Go.', 'The "alpha" chain.']
    assert task.test["label"][:] == pytest.approx([0.125])


def test_crp_kaggle_train_csv_split_80_20_seeded(tmp_path):
    rows = [{"id": f"p{i}", "url_legal": "", "license": "", "excerpt": f"Passage number {i}, with a comma.",
             "target": str(-1.0 + 0.1 * i), "standard_error": "0.5"} for i in range(10)]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # Kaggle's test.csv has no target: an unlabelled test file is skipped, not an error
    (tmp_path / "test.csv").write_text("id,url_legal,license,excerpt\nq1,,,Some text.\n")
    task = _task("reg/crp", f"task.data_dir={tmp_path}")
    val = task.eval_splits["validation"]
    assert len(task.train) == 8 and len(val) == 2 and task.test is None
    # the held-out rows are the first 2 of a seed-42 permutation (computed here independently)
    held = sorted(np.random.default_rng(42).permutation(10)[:2].tolist())
    assert val["excerpt"][:] == [f"Passage number {i}, with a comma." for i in held]
    assert val["label"][:] == pytest.approx([-1.0 + 0.1 * i for i in held])
    assert task.train["idx"][:] == list(range(8)) and val["idx"][:] == [0, 1]
    again = _task("reg/crp", f"task.data_dir={tmp_path}")
    assert again.eval_splits["validation"]["excerpt"][:] == val["excerpt"][:]


def test_local_errors_name_the_file_and_column(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"sentence_A": "a", "sentence_B": "b"}])
    with pytest.raises(DataError) as e:
        _task("reg/sick", f"task.data_dir={tmp_path}")
    assert "train.jsonl" in str(e.value) and "'relatedness_score'" in str(e.value) and "\n" not in str(e.value)
    _write_jsonl(tmp_path / "train.jsonl", [{"sentence_A": "a", "sentence_B": "b", "relatedness_score": 1.0},
                                            {"sentence_A": "a", "sentence_B": "b", "relatedness_score": "high"}])
    with pytest.raises(DataError, match=r"train.jsonl row 2: column 'relatedness_score' holds 'high'"):
        _task("reg/sick", f"task.data_dir={tmp_path}")
    _write_jsonl(tmp_path / "train.jsonl", [{**SIQA["train"][0], "label": "7"}])
    with pytest.raises(DataError, match="row 1: label '7' is out of range"):
        _task("cls/siqa", f"task.data_dir={tmp_path}")
    with pytest.raises(DataError, match="does not exist"):
        _task("reg/sick", f"task.data_dir={tmp_path / 'missing'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no training file"):
        _task("reg/sick", f"task.data_dir={empty}")


def test_bad_task_config_values():
    with pytest.raises(ConfigError, match="unknown task.dataset='nope'"):
        load_task({"loader": "hub", "dataset": "nope", "name": "x"})
    with pytest.raises(ConfigError, match="primary_metric='accuracy' is not computed"):
        _task("reg/sick", "task.primary_metric=accuracy")
    assert set(HUB_TASKS) == {"sick", "wassa", "lcp", "crp", "humicroedit", "boolq", "hellaswag", "siqa"}


# ----------------------------------------------------------------------------- normalisation + metrics


def test_zscore_normalisation_uses_train_statistics(monkeypatch):
    _fake_load_dataset(monkeypatch, SICK, ("RobZamp/sick", None))
    task = normalize_task_targets(_task("reg/sick"), "zscore")
    train = np.array([4.5, 1.5, 3.9])
    mean = train.sum() / 3
    std = math.sqrt(((train - mean) ** 2).sum() / 3)  # population std, by hand
    assert task.extra["target_scale"] == pytest.approx({"method": "zscore", "shift": mean, "scale": std})
    assert task.train["label"][:] == pytest.approx(((train - mean) / std).tolist(), abs=1e-6)
    assert task.eval_splits["validation"]["label"][:] == pytest.approx([(4.2 - mean) / std], abs=1e-6)
    assert task.test["label"][:] == pytest.approx([(2.0 - mean) / std], abs=1e-6)
    # idempotent: a second call keeps the first statistics
    assert normalize_task_targets(task, "zscore").train["label"][:] == pytest.approx(((train - mean) / std).tolist(), abs=1e-6)
    mm = target_stats([2.0, 4.0, 3.0], "minmax")
    assert mm == {"method": "minmax", "shift": 2.0, "scale": 2.0}
    with pytest.raises(DataError, match="same value"):
        target_stats([1.0, 1.0], "zscore")
    with pytest.raises(ConfigError):
        target_stats([1.0, 2.0], "log")


def test_regression_metrics_match_sklearn_and_scipy():
    from scipy import stats
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    from cmiexp.metrics import compute_metrics

    preds = np.array([2.5, 0.0, 2.1, 1.6, 4.0])
    refs = np.array([3.0, -0.5, 2.0, 1.0, 4.5])
    got = compute_metrics(["mse", "mae", "pearson", "spearman"], preds, refs)
    assert got["mse"] == pytest.approx(mean_squared_error(refs, preds))
    assert got["mae"] == pytest.approx(mean_absolute_error(refs, preds))
    assert got["pearson"] == pytest.approx(stats.pearsonr(preds, refs)[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(preds, refs)[0])
    # and by hand: mse = (0.25 + 0.25 + 0.01 + 0.36 + 0.25) / 5
    assert got["mse"] == pytest.approx(1.12 / 5) and got["mae"] == pytest.approx(2.2 / 5)


def test_evaluation_reports_metrics_in_the_original_scale():
    from types import SimpleNamespace

    from sklearn.metrics import mean_absolute_error, mean_squared_error

    from cmiexp.train.evaluate import metrics_from_predictions

    scale = {"method": "zscore", "shift": 2.5, "scale": 1.5}
    y = np.array([1.0, 2.0, 4.0, 5.0])          # original units
    p = np.array([1.5, 2.0, 3.0, 4.5])
    task = SimpleNamespace(is_regression=True, metrics=["mse", "mae", "pearson", "spearman"],
                           extra={"target_scale": scale}, num_labels=1)
    pred = {"logits": torch.tensor((p - 2.5) / 1.5, dtype=torch.float32)[:, None],
            "labels": torch.tensor((y - 2.5) / 1.5, dtype=torch.float32)}
    m = metrics_from_predictions(pred, task)
    assert m["mse"] == pytest.approx(mean_squared_error(y, p), rel=1e-5)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-5)
    assert m["loss"] == pytest.approx(mean_squared_error(y, p) / 1.5 ** 2, rel=1e-5)  # training scale
    assert denormalize(np.array([0.0, 1.0]), scale).tolist() == [2.5, 4.0]


def test_unknown_loader_still_lists_hub():
    with pytest.raises(CmiexpError, match="hub"):
        load_task({"loader": "nope"})
