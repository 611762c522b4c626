"""Loaders for the FlowNIB paper's non-GLUE tasks (``task.loader: hub``).

Regression: SICK relatedness, WASSA-2017 emotion intensity (EmoInt), LCP (CompLex, single
words), CRP (CommonLit Readability Prize) and Humicroedit (SemEval-2020 task 7, sub-task 1).
Classification: BoolQ, HellaSwag and Social IQa.

Each task is a ``HubTaskSpec``: where its data lives (a Hugging Face hub id, and/or the file
names of its public distribution) and how one source row in that schema becomes our columns
(``text_fields`` + ``label``). Two sources give the same columns:

* the hub, when ``task.data_dir`` is null: ``datasets.load_dataset(hub_path, hub_config)``;
* ``task.data_dir``: a folder with one file per split in the same schema (``.jsonl``, ``.json``,
  ``.csv`` or ``.tsv``), named ``train`` / ``validation`` (or ``dev``) / ``test``, or the file
  names of the original distribution listed in the spec (e.g. ``lcp_single_train.tsv``).

Multiple-choice tasks are posed as the authors' notebooks pose HellaSwag (the LLM-Adapters
commonsense format): one sequence holding the context and *every* option, and the label is the
index of the right option (HellaSwag: 4 classes, Social IQa: 3). BoolQ is question + passage,
label false/true. Regression targets keep their original units here; the runner normalises them
for training (``task.normalize_targets``, see ``cmiexp.data.targets``).

Sources without a standard hub copy (WASSA-2017, CRP) need ``task.data_dir``; when a source has
no validation split the loader carves one out of train (``validation_fraction``, seeded), as the
authors did (20%, seed 42).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cmiexp.checks import SEED, TASK_SCHEMA, check_flag, check_number, optional_setting, setting
from cmiexp.data.base import TaskData, not_utf8_error
from cmiexp.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")
_GENERIC_FILES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test",),
}
_EXTS = (".jsonl", ".json", ".csv", ".tsv")


# ----------------------------------------------------------------------------- row converters


def _text(row: dict, key: str) -> str:
    v = row[key]
    if v is None:
        raise ValueError(f"column {key!r} is empty")
    return str(v).strip()


def _float(row: dict, key: str) -> float:
    v = row[key]
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"column {key!r} holds {v!r}, not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"column {key!r} holds {v!r}, not a finite number")
    return x


_EDIT_TAG = re.compile(r"<([^<>/]*)/>")


def humicroedit_headlines(original: str, edit: str) -> tuple[str, str]:
    """The SemEval-2020 task 7 source marks the replaced word as ``<word/>``: return the original
    headline (tag removed) and the edited one (word replaced by ``edit``)."""
    if not _EDIT_TAG.search(original):
        raise ValueError(f"original headline has no <word/> tag: {original[:80]!r}")
    before = _EDIT_TAG.sub(lambda m: m.group(1), original, count=1)
    after = _EDIT_TAG.sub(lambda m: edit, original, count=1)
    return before, after


def _bool_label(v) -> int:
    if isinstance(v, bool):
        return int(v)
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return 1
    if s in ("false", "0", "no"):
        return 0
    raise ValueError(f"answer {v!r} is not true/false")


def hellaswag_text(row: dict) -> str:
    endings = row["endings"]
    if isinstance(endings, str):  # a CSV copy may hold the list as JSON text
        endings = json.loads(endings)
    if len(endings) != 4:
        raise ValueError(f"endings has {len(endings)} options, expected 4")
    ctx = _text(row, "ctx") if row.get("ctx") else f"{_text(row, 'ctx_a')} {str(row.get('ctx_b') or '').strip()}".strip()
    options = " ".join(f"Ending{i + 1}: {str(e).strip()}" for i, e in enumerate(endings))
    return f"Please choose the correct ending to complete the given sentence: {_text(row, 'activity_label')}: {ctx} {options}"


def _index_label(v, n: int, base: int) -> int:
    try:
        i = int(str(v).strip()) - base
    except ValueError:
        raise ValueError(f"label {v!r} is not an option number") from None
    if not 0 <= i < n:
        raise ValueError(f"label {v!r} is out of range ({base}..{base + n - 1})")
    return i


def siqa_text(row: dict) -> str:
    opts = " ".join(f"Answer{i + 1}: {_text(row, k)}" for i, k in enumerate(("answerA", "answerB", "answerC")))
    return f"Please choose the correct answer to the question: {_text(row, 'context')} {_text(row, 'question')} {opts}"


def _sick(row):
    return {"sentence_A": _text(row, "sentence_A"), "sentence_B": _text(row, "sentence_B"),
            "label": _float(row, "relatedness_score")}


def _wassa(row):
    return {"text": _text(row, "text"), "emotion": _text(row, "emotion"), "label": _float(row, "intensity")}


def _lcp(row):
    return {"sentence": _text(row, "sentence"), "token": _text(row, "token"), "label": _float(row, "complexity")}


def _crp(row):
    return {"excerpt": _text(row, "excerpt"), "label": _float(row, "target")}


def _humicroedit(row):
    original, edited = humicroedit_headlines(_text(row, "original"), _text(row, "edit"))
    return {"original": original, "edited": edited, "label": _float(row, "meanGrade")}


def _boolq(row, with_passage: bool = True):
    return {"question": _text(row, "question"), "passage": _text(row, "passage") if with_passage else "",
            "label": _bool_label(row["answer"])}


def _hellaswag(row):
    return {"text": hellaswag_text(row), "label": _index_label(row["label"], 4, 0)}


def _siqa(row):
    return {"text": siqa_text(row), "label": _index_label(row["label"], 3, 1)}


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class HubTaskSpec:
    """Static facts of one task (nothing here is user-tunable)."""

    name: str  # the value of task.dataset
    description: str
    hub_path: str | None  # default hub id (None: no standard hub copy; task.data_dir needed)
    hub_config: str | None
    source_columns: tuple[str, ...]  # columns a source row must have
    label_column: str  # the source column holding the label (a test split without it is unlabelled)
    text_fields: tuple[str, ...]
    convert: Callable[[dict], dict]
    label_names: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    primary_metric: str
    # Extra file names (stems or full names) of the original distribution, per split alias.
    local_files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # How the original distribution's headerless TSVs name their columns (WASSA EmoInt).
    headerless_columns: tuple[str, ...] | None = None
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation",
                                                                "test": "test"})

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


_REG_METRICS = ("mse", "mae", "pearson", "spearman")

HUB_TASKS: dict[str, HubTaskSpec] = {
    "sick": HubTaskSpec(
        name="sick",
        description="SICK relatedness: sentence-pair relatedness in [1, 5] (4,439 train / 495 validation / 4,906 test)",
        hub_path="RobZamp/sick", hub_config=None,
        source_columns=("sentence_A", "sentence_B", "relatedness_score"),
        label_column="relatedness_score",
        text_fields=("sentence_A", "sentence_B"), convert=_sick, label_names=None,
        metrics=_REG_METRICS, primary_metric="mse",
    ),
    "wassa": HubTaskSpec(
        name="wassa",
        description="WASSA-2017 EmoInt: emotion intensity in [0, 1] of a tweet for a given emotion (anger, fear, joy, sadness)",
        hub_path=None, hub_config=None,
        source_columns=("text", "emotion", "intensity"),
        label_column="intensity",
        text_fields=("text", "emotion"), convert=_wassa, label_names=None,
        metrics=_REG_METRICS, primary_metric="mse",
        # EmoInt distribution: <emotion>-ratings-0to1.{train,dev.gold,test.gold}.txt, headerless TSV.
        local_files={"train": ("*-ratings-0to1.train*",), "validation": ("*-ratings-0to1.dev.gold*",),
                     "test": ("*-ratings-0to1.test.gold*",)},
        headerless_columns=("id", "text", "emotion", "intensity"),
    ),
    "lcp": HubTaskSpec(
        name="lcp",
        description="LCP-2021 (CompLex, single words): lexical complexity in [0, 1] of a token in its sentence",
        hub_path="razvanalex/CWI-CompLex-single", hub_config=None,
        source_columns=("sentence", "token", "complexity"),
        label_column="complexity",
        text_fields=("sentence", "token"), convert=_lcp, label_names=None,
        metrics=_REG_METRICS, primary_metric="mse",
        local_files={"train": ("lcp_single_train.tsv",), "validation": ("lcp_single_trial.tsv",),
                     "test": ("lcp_single_test.tsv",)},
    ),
    "crp": HubTaskSpec(
        name="crp",
        description="CRP (CommonLit Readability Prize): readability score of a passage (2,834 Kaggle train rows)",
        hub_path=None, hub_config=None,
        source_columns=("excerpt", "target"),
        label_column="target",
        text_fields=("excerpt",), convert=_crp, label_names=None,
        metrics=_REG_METRICS, primary_metric="mse",
    ),
    "humicroedit": HubTaskSpec(
        name="humicroedit",
        description="Humicroedit (SemEval-2020 task 7, sub-task 1): mean funniness in [0, 3] of an edited headline",
        hub_path="SemEvalWorkshop/humicroedit", hub_config="subtask-1",
        source_columns=("original", "edit", "meanGrade"),
        label_column="meanGrade",
        text_fields=("original", "edited"), convert=_humicroedit, label_names=None,
        metrics=_REG_METRICS, primary_metric="mse",
    ),
    "boolq": HubTaskSpec(
        name="boolq",
        description="BoolQ: yes/no question about a Wikipedia passage (9,427 train / 3,270 validation)",
        hub_path="google/boolq", hub_config=None,
        source_columns=("question", "answer", "passage"),
        label_column="answer",
        text_fields=("question", "passage"), convert=_boolq, label_names=("false", "true"),
        metrics=("accuracy",), primary_metric="accuracy",
        hub_splits={"train": "train", "validation": "validation"},
    ),
    "hellaswag": HubTaskSpec(
        name="hellaswag",
        description="HellaSwag: pick the ending of 4 (39,905 train / 10,042 validation); context + all endings -> index",
        hub_path="Rowan/hellaswag", hub_config=None,
        source_columns=("activity_label", "endings", "label"),
        label_column="label",
        text_fields=("text",), convert=_hellaswag, label_names=("ending1", "ending2", "ending3", "ending4"),
        metrics=("accuracy",), primary_metric="accuracy",
        local_files={"train": ("hellaswag_train.jsonl",), "validation": ("hellaswag_val.jsonl",)},
        hub_splits={"train": "train", "validation": "validation"},
    ),
    "siqa": HubTaskSpec(
        name="siqa",
        description="Social IQa: pick the answer of 3 (33,410 train / 1,954 validation); context + question + all answers -> index",
        hub_path="allenai/social_i_qa", hub_config=None,
        source_columns=("context", "question", "answerA", "answerB", "answerC", "label"),
        label_column="label",
        text_fields=("text",), convert=_siqa, label_names=("answer1", "answer2", "answer3"),
        metrics=("accuracy",), primary_metric="accuracy",
        hub_splits={"train": "train", "validation": "validation"},
    ),
}


def get_spec(dataset: str) -> HubTaskSpec:
    if dataset not in HUB_TASKS:
        raise ConfigError(f"unknown task.dataset={dataset!r} for task.loader=hub; valid choices: {', '.join(HUB_TASKS)}")
    return HUB_TASKS[dataset]


# ----------------------------------------------------------------------------- reading files


def read_table(path: Path, headerless_columns: tuple[str, ...] | None = None) -> list[dict]:
    """Rows of a .jsonl / .json / .csv / .tsv (or headerless EmoInt .txt) file as dicts."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith(".jsonl"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path} line {n}: invalid JSON ({e.msg})") from None
            return rows
        if name.endswith(".json"):
            text = path.read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # JSON lines under a .json name
                try:
                    return [json.loads(line) for line in text.splitlines() if line.strip()]
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: neither a JSON list nor JSON lines ({e.msg})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{path} must hold a JSON list of rows (or JSON lines)")
            return data
        with open(path, encoding="utf-8-sig", newline="") as f:
            if name.endswith(".csv"):
                return [dict(r) for r in csv.DictReader(f)]
            # TSV: quoting off (CompLex and EmoInt texts hold unbalanced quotes).
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if headerless_columns is not None:
                return [dict(zip(headerless_columns, r)) for r in reader if r]
            header = next(reader, None)
            if header is None:
                return []
            return [dict(zip(header, r)) for r in reader if r]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, e) from None


def _find_split_files(data_dir: Path, spec: HubTaskSpec, alias: str) -> list[tuple[Path, bool]]:
    """(file, headerless) pairs for one split: the generic names first, else the original names."""
    for stem in _GENERIC_FILES[alias]:
        for ext in _EXTS:
            p = data_dir / f"{stem}{ext}"
            if p.is_file():
                return [(p, False)]
    found: dict[Path, bool] = {}
    for pattern in spec.local_files.get(alias, ()):
        for p in sorted(data_dir.glob(pattern)):
            if p.is_file():
                # The original distribution's TSV/TXT files are headerless where the spec says so.
                found[p] = spec.headerless_columns is not None and not p.name.endswith((".jsonl", ".json", ".csv"))
    return list(found.items())


def _layout(spec: HubTaskSpec) -> str:
    generic = "<data_dir>/{train,validation,test}.{jsonl,json,csv,tsv}"
    orig = [p for pats in spec.local_files.values() for p in pats]
    cols = ", ".join(spec.source_columns)
    return f"{generic} with columns {cols}" + (f" (or the original files {', '.join(orig)})" if orig else "")


def _convert_rows(rows: list[dict], spec: HubTaskSpec, where: str, convert) -> dict[str, list]:
    if not rows:
        raise DataError(f"{where} has no data rows")
    missing = [c for c in spec.source_columns if c not in rows[0]]
    if missing:
        raise DataError(f"{where} lacks column(s) {', '.join(map(repr, missing))} (has: {', '.join(map(str, rows[0]))}); "
                        f"expected the {spec.name} schema: {', '.join(spec.source_columns)}")
    cols: dict[str, list] = {f: [] for f in (*spec.text_fields, "label")}
    for n, row in enumerate(rows, 1):
        try:
            out = convert(row)
        except (KeyError, ValueError, TypeError) as e:
            msg = f"missing column {e}" if isinstance(e, KeyError) else str(e)
            raise DataError(f"{where} row {n}: {msg}") from None
        for k in cols:
            cols[k].append(out[k])
    cols["idx"] = list(range(len(rows)))
    return cols


def _to_dataset(cols: dict[str, list], spec: HubTaskSpec):
    import datasets

    feats = {f: datasets.Value("string") for f in spec.text_fields}
    feats["label"] = (datasets.Value("float32") if spec.is_regression
                      else datasets.ClassLabel(names=list(spec.label_names)))
    feats["idx"] = datasets.Value("int32")
    return datasets.Dataset.from_dict({k: cols[k] for k in feats}, features=datasets.Features(feats))


def _load_local(spec: HubTaskSpec, data_dir: Path, convert) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for alias in SPLITS:
        files = _find_split_files(data_dir, spec, alias)
        if not files:
            continue
        rows: list[dict] = []
        for path, headerless in files:
            rows.extend(read_table(path, spec.headerless_columns if headerless else None))
        where = files[0][0] if len(files) == 1 else f"{data_dir}/{alias} files ({', '.join(p.name for p, _ in files)})"
        if alias == "test" and rows and spec.label_column not in rows[0]:
            continue  # an unlabelled test file (e.g. Kaggle's CRP test.csv): not needed for training
        out[alias] = _to_dataset(_convert_rows(rows, spec, str(where), convert), spec)
    if "train" not in out:
        raise DataError(f"task.data_dir {data_dir} has no training file for {spec.name}: expected {_layout(spec)}")
    return out


def _load_hub(spec: HubTaskSpec, hub_path: str, hub_config: str | None, convert) -> dict[str, Any]:
    import datasets

    from cmiexp.data.glue import env_offline, honour_offline_env, is_connection_problem

    ident = hub_path + (f" ({hub_config})" if hub_config else "")
    hint = f"set task.data_dir=/path/to/{spec.name} ({_layout(spec)})"
    try:
        with honour_offline_env():
            dd = datasets.load_dataset(hub_path, hub_config) if hub_config else datasets.load_dataset(hub_path)
    except Exception as e:  # noqa: BLE001 - turned into one actionable line
        first = (str(e).strip().splitlines() or [""])[0]
        what = "cannot be reached to load" if (env_offline() or is_connection_problem(e)) else "could not load"
        raise DataError(f"the Hugging Face Hub {what} {ident} ({type(e).__name__}: {first[:200]}); {hint}") from e
    out: dict[str, Any] = {}
    for alias, split in spec.hub_splits.items():
        if split not in dd:
            continue
        ds = dd[split]
        rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
        if alias != "train" and rows and all(str(r.get(spec.label_column, "")).strip() in ("", "-1", "None")
                                             for r in rows):
            continue  # unlabelled split (e.g. HellaSwag test)
        out[alias] = _to_dataset(_convert_rows(rows, spec, f"{ident}[{split}]", convert), spec)
    if "train" not in out:
        raise DataError(f"hub dataset {ident} has no train split (it has: {', '.join(dd)}); {hint}")
    return out


# ----------------------------------------------------------------------------- entry point


def split_off_validation(train, fraction: float, seed: int):
    """Carve a validation split out of ``train`` by a seeded permutation (both keep their order)."""
    n = len(train)
    n_val = int(round(n * fraction))
    if not 0 < n_val < n:
        raise ConfigError(f"task.validation_fraction={fraction} leaves no train or no validation rows ({n} rows)")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    val = train.select(val_idx.tolist())
    tr = train.select(train_idx.tolist())
    # idx: 0-based row ids within each split (KD and MI caches key on it)
    return (tr.remove_columns("idx").add_column("idx", list(range(len(tr)))),
            val.remove_columns("idx").add_column("idx", list(range(len(val)))))


def local_root(spec: HubTaskSpec, data_dir) -> Path:
    """``task.data_dir`` as an absolute folder (relative to where cmiexp was started); DataError if absent."""
    root = Path(str(data_dir)).expanduser()
    if not root.is_absolute():
        from hydra.utils import to_absolute_path

        root = Path(to_absolute_path(str(root)))
    if not root.is_dir():
        raise DataError(f"task.data_dir {root} does not exist or is not a folder: it must hold {_layout(spec)}")
    return root


def check_hub_task_files(task_cfg) -> None:
    """Refuse a local copy (``task.data_dir``) that is not a folder, reading nothing and importing no
    library (``cmiexp.jobs`` calls it before torch is imported; ``load_hub_task`` meets the same check)."""
    spec = get_spec(str(setting(task_cfg, "dataset", "task")))
    data_dir = optional_setting(task_cfg, "data_dir")
    if data_dir is not None and str(data_dir).strip() != "":
        local_root(spec, data_dir)


def load_hub_task(task_cfg) -> TaskData:
    """Build the splits of the task named by ``task.dataset`` (hub when data_dir is null, else local files)."""
    from cmiexp.data.glue import positive_int_or_none, subsample

    spec = get_spec(str(setting(task_cfg, "dataset", "task")))
    name = str(optional_setting(task_cfg, "name") or spec.name)
    primary = str(optional_setting(task_cfg, "primary_metric") or spec.primary_metric)
    if primary not in spec.metrics:
        raise ConfigError(f"task.primary_metric={primary!r} is not computed for {name}; "
                          f"valid choices: {', '.join(spec.metrics)}")
    convert = spec.convert
    if spec.name == "boolq":
        convert = functools.partial(_boolq, with_passage=check_flag("task.with_passage", setting(task_cfg, "with_passage", "task")))

    data_dir = optional_setting(task_cfg, "data_dir")
    if data_dir is None or str(data_dir).strip() == "":
        hub_path = optional_setting(task_cfg, "hub_path") or spec.hub_path
        if not hub_path:
            raise DataError(f"{name} has no standard Hugging Face hub copy; set task.data_dir=/path/to/{spec.name} "
                            f"({_layout(spec)})")
        splits = _load_hub(spec, str(hub_path), setting(task_cfg, "hub_config", "task"), convert)
        source = f"hub:{hub_path}"
    else:
        root = local_root(spec, data_dir)
        splits = _load_local(spec, root, convert)
        source = f"local:{root}"

    train = splits["train"]
    evals = {"validation": splits["validation"]} if "validation" in splits else {}
    if not evals:
        frac = check_number("task.validation_fraction", setting(task_cfg, "validation_fraction", "task"),
                            TASK_SCHEMA["validation_fraction"])
        if frac is None:
            raise DataError(f"{name} ({source}) has no validation split; set task.validation_fraction (e.g. 0.2) "
                            "to carve one out of train")
        train, evals["validation"] = split_off_validation(
            train, frac, check_number("task.split_seed", setting(task_cfg, "split_seed", "task"), SEED))
    seed = check_number("task.subsample_seed", setting(task_cfg, "subsample_seed", "task"), SEED)
    train = subsample(train, positive_int_or_none(task_cfg, "max_train_samples"), seed)
    max_eval = positive_int_or_none(task_cfg, "max_eval_samples")
    evals = {a: subsample(d, max_eval, seed) for a, d in evals.items()}
    test = splits.get("test")
    return TaskData(
        name=name,
        train=train,
        eval_splits=evals,
        text_fields=spec.text_fields,
        label_names=list(spec.label_names) if spec.label_names is not None else None,
        metrics=list(spec.metrics),
        primary_metric=primary,
        is_regression=spec.is_regression,
        test=test,
        extra={"test_splits": {"test": test} if test is not None else {}, "source": source},
    )


__all__ = ["HUB_TASKS", "HubTaskSpec", "check_hub_task_files", "get_spec", "hellaswag_text", "humicroedit_headlines",
           "load_hub_task", "local_root", "read_table", "siqa_text", "split_off_validation"]
