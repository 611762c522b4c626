"""GLUE loader: the Hugging Face hub copy or a local folder in the standard GLUE TSV layout.

Both sources produce the same columns and label ids as the hub's ``nyu-mll/glue`` (the
``ClassLabel`` order), so a checkpoint fine-tuned on either keeps the right ``id2label``.

Local files are read with quoting OFF: GLUE sentences contain unbalanced double quotes, and
Python's default csv quoting silently merges rows (MRPC, RTE test, STS-B, QNLI).

Static per-task facts live in ``GLUE_TASKS`` (the one source of truth); the task YAMLs under
``conf/task/glue/`` hold only user-tunable values.
"""

from __future__ import annotations

import csv
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cmiexp.checks import ALL_ROWS, SEED, check_number, optional_setting, setting
from cmiexp.data.base import TaskData, not_utf8_error
from cmiexp.errors import ConfigError, DataError

DEFAULT_HUB_PATH = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSplitFile:
    """One split: its alias in TaskData, its file in the GLUE layout and its hub split name."""

    alias: str
    filename: str
    hub_split: str


@dataclass(frozen=True)
class GlueTaskInfo:
    """Static facts of one GLUE task (nothing here is user-tunable)."""

    name: str  # hub config name, also the value of task.dataset
    description: str
    folder: str  # folder under data_dir in the standard GLUE layout
    text_fields: tuple[str, ...]  # output column names (the hub's)
    source_columns: tuple[str, ...]  # TSV header names, aligned with text_fields
    label_column: str | None  # TSV header name of the label (None: no labelled split)
    label_names: tuple[str, ...] | None  # ClassLabel order; None for regression
    label_kind: str  # how the TSV writes labels: "name", "int" (class id) or "float"
    metrics: tuple[str, ...]
    primary_metric: str  # default for task.primary_metric
    train: GlueSplitFile | None
    eval_splits: tuple[GlueSplitFile, ...]  # first one drives model selection
    test_splits: tuple[GlueSplitFile, ...]  # first one is TaskData.test
    # Headerless train/dev files (CoLA): (number of columns, text column indexes, label index).
    headerless: tuple[int, tuple[int, ...], int] | None = None

    @property
    def is_regression(self) -> bool:
        return self.label_kind == "float"

    @property
    def required_files(self) -> tuple[str, ...]:
        """Files that must exist locally: train + eval, or the test file for test-only ax."""
        files = ([self.train.filename] if self.train else []) + [s.filename for s in self.eval_splits]
        return tuple(files) if files else tuple(s.filename for s in self.test_splits)

    @property
    def layout(self) -> str:
        """Human-readable expected layout, e.g. ``<data_dir>/RTE/{train,dev}.tsv``."""
        stems = [f[: -len(".tsv")] for f in self.required_files]
        inner = stems[0] if len(stems) == 1 else "{" + ",".join(stems) + "}"
        return f"<data_dir>/{self.folder}/{inner}.tsv"


def _std_splits() -> dict[str, Any]:
    return dict(
        train=GlueSplitFile("train", "train.tsv", "train"),
        eval_splits=(GlueSplitFile("validation", "dev.tsv", "validation"),),
        test_splits=(GlueSplitFile("test", "test.tsv", "test"),),
    )


_NLI3 = ("entailment", "neutral", "contradiction")

GLUE_TASKS: dict[str, GlueTaskInfo] = {
    "cola": GlueTaskInfo(
        name="cola",
        description="CoLA: grammatical acceptability of one sentence (8.5k train / 1k dev), MCC",
        folder="CoLA",
        text_fields=("sentence",),
        source_columns=("sentence",),  # test.tsv header; train/dev are headerless
        label_column="label",
        label_names=("unacceptable", "acceptable"),
        label_kind="int",
        metrics=("matthews_correlation", "accuracy"),
        primary_metric="matthews_correlation",
        headerless=(4, (3,), 1),  # source, label, original annotation, sentence
        **_std_splits(),
    ),
    "sst2": GlueTaskInfo(
        name="sst2",
        description="SST-2: binary sentiment of movie-review phrases (67k train / 872 dev), accuracy",
        folder="SST-2",
        text_fields=("sentence",),
        source_columns=("sentence",),
        label_column="label",
        label_names=("negative", "positive"),
        label_kind="int",
        metrics=("accuracy",),
        primary_metric="accuracy",
        **_std_splits(),
    ),
    "mrpc": GlueTaskInfo(
        name="mrpc",
        description="MRPC: are two news sentences paraphrases (3.7k train / 408 dev), F1 and accuracy",
        folder="MRPC",
        # The hub rebuilds MRPC train/dev from msr_paraphrase_train.txt, so its idx is the row in
        # that raw file; locally idx is the row in train.tsv/dev.tsv (texts and labels agree).
        text_fields=("sentence1", "sentence2"),
        source_columns=("#1 String", "#2 String"),
        label_column="Quality",
        label_names=("not_equivalent", "equivalent"),
        label_kind="int",
        metrics=("accuracy", "f1"),
        primary_metric="f1",
        **_std_splits(),
    ),
    "qqp": GlueTaskInfo(
        name="qqp",
        description="QQP: are two Quora questions duplicates (364k train / 40k dev), F1 and accuracy",
        folder="QQP",
        text_fields=("question1", "question2"),
        source_columns=("question1", "question2"),
        label_column="is_duplicate",
        label_names=("not_duplicate", "duplicate"),
        label_kind="int",
        metrics=("accuracy", "f1"),
        primary_metric="f1",
        **_std_splits(),
    ),
    "stsb": GlueTaskInfo(
        name="stsb",
        description="STS-B: sentence-pair similarity score in [0, 5] (5.7k train / 1.5k dev), Pearson",
        folder="STS-B",
        text_fields=("sentence1", "sentence2"),
        source_columns=("sentence1", "sentence2"),
        label_column="score",
        label_names=None,
        label_kind="float",
        metrics=("pearson", "spearman", "mse", "mae"),
        primary_metric="pearson",
        **_std_splits(),
    ),
    "mnli": GlueTaskInfo(
        name="mnli",
        description="MNLI: 3-way entailment (393k train / 9.8k matched + 9.8k mismatched dev), accuracy",
        folder="MNLI",
        text_fields=("premise", "hypothesis"),
        source_columns=("sentence1", "sentence2"),
        label_column="gold_label",
        label_names=_NLI3,
        label_kind="name",
        metrics=("accuracy",),
        primary_metric="accuracy",
        train=GlueSplitFile("train", "train.tsv", "train"),
        eval_splits=(
            GlueSplitFile("matched", "dev_matched.tsv", "validation_matched"),
            GlueSplitFile("mismatched", "dev_mismatched.tsv", "validation_mismatched"),
        ),
        test_splits=(
            GlueSplitFile("matched", "test_matched.tsv", "test_matched"),
            GlueSplitFile("mismatched", "test_mismatched.tsv", "test_mismatched"),
        ),
    ),
    "qnli": GlueTaskInfo(
        name="qnli",
        description="QNLI: does the sentence answer the question (105k train / 5.5k dev), accuracy",
        folder="QNLI",
        text_fields=("question", "sentence"),
        source_columns=("question", "sentence"),
        label_column="label",
        label_names=("entailment", "not_entailment"),
        label_kind="name",
        metrics=("accuracy",),
        primary_metric="accuracy",
        **_std_splits(),
    ),
    "rte": GlueTaskInfo(
        name="rte",
        description="RTE: 2-way textual entailment (2.5k train / 277 dev), accuracy",
        folder="RTE",
        text_fields=("sentence1", "sentence2"),
        source_columns=("sentence1", "sentence2"),
        label_column="label",
        label_names=("entailment", "not_entailment"),
        label_kind="name",
        metrics=("accuracy",),
        primary_metric="accuracy",
        **_std_splits(),
    ),
    "wnli": GlueTaskInfo(
        name="wnli",
        description="WNLI: Winograd pronoun entailment (635 train / 71 dev), accuracy",
        folder="WNLI",
        text_fields=("sentence1", "sentence2"),
        source_columns=("sentence1", "sentence2"),
        label_column="label",
        label_names=("not_entailment", "entailment"),
        label_kind="int",
        metrics=("accuracy",),
        primary_metric="accuracy",
        **_std_splits(),
    ),
    "ax": GlueTaskInfo(
        name="ax",
        description="AX: GLUE diagnostic NLI set, test only (1.1k pairs, hidden labels); not trainable",
        folder="diagnostic",
        text_fields=("premise", "hypothesis"),
        source_columns=("sentence1", "sentence2"),
        label_column=None,
        label_names=_NLI3,
        label_kind="name",
        metrics=("accuracy",),
        primary_metric="accuracy",
        train=None,
        eval_splits=(),
        test_splits=(GlueSplitFile("test", "diagnostic.tsv", "test"),),
    ),
}


# --------------------------------------------------------------------------- config access


def positive_int_or_none(cfg: Any, key: str) -> int | None:
    return check_number(f"task.{key}", optional_setting(cfg, key), ALL_ROWS)


def get_task_info(dataset: str) -> GlueTaskInfo:
    """Static facts of a GLUE task by hub config name; ConfigError listing valid names."""
    if dataset not in GLUE_TASKS:
        raise ConfigError(
            f"unknown GLUE task.dataset={dataset!r}; valid choices: {', '.join(GLUE_TASKS)}"
        )
    return GLUE_TASKS[dataset]


# --------------------------------------------------------------------------- public entry


def load_glue(task_cfg: Any) -> TaskData:
    """Build the raw GLUE splits named by ``task_cfg`` (hub when data_dir is null, else local)."""
    info = get_task_info(setting(task_cfg, "dataset", "task"))
    name = optional_setting(task_cfg, "name") or f"glue/{info.name}"
    primary = optional_setting(task_cfg, "primary_metric") or info.primary_metric
    if primary not in info.metrics:
        raise ConfigError(
            f"task.primary_metric={primary!r} is not computed for {name}; "
            f"valid choices: {', '.join(info.metrics)}"
        )
    max_train = positive_int_or_none(task_cfg, "max_train_samples")
    max_eval = positive_int_or_none(task_cfg, "max_eval_samples")
    seed = check_number("task.subsample_seed", setting(task_cfg, "subsample_seed", "task"), SEED)

    data_dir = optional_setting(task_cfg, "data_dir")
    if data_dir is None or str(data_dir).strip() == "":
        hub_path = optional_setting(task_cfg, "hub_path") or DEFAULT_HUB_PATH
        train, evals, tests = _load_hub(info, str(hub_path))
        source = f"hub:{hub_path}/{info.name}"
    else:
        task_dir = resolve_task_dir(str(data_dir), info)
        train, evals, tests = _load_local(info, task_dir)
        source = f"local:{task_dir}"

    train = subsample(train, max_train, seed)
    evals = {alias: subsample(ds, max_eval, seed) for alias, ds in evals.items()}
    return TaskData(
        name=str(name),
        train=train,
        eval_splits=evals,
        text_fields=info.text_fields,
        label_names=list(info.label_names) if info.label_names is not None else None,
        metrics=list(info.metrics),
        primary_metric=str(primary),
        is_regression=info.is_regression,
        test=next(iter(tests.values()), None),
        # test_splits: every test split found (MNLI has matched + mismatched); source: provenance.
        extra={"test_splits": tests, "source": source},
    )


def subsample(ds: Any, max_samples: int | None, seed: int) -> Any:
    """Keep ``max_samples`` rows picked by a seeded shuffle, in original order (``idx`` kept).

    The pick depends only on (seed, len(ds)), so reruns and different machines agree.
    """
    if ds is None or max_samples is None or max_samples >= len(ds):
        return ds
    keep = np.sort(np.random.default_rng(seed).permutation(len(ds))[:max_samples])
    return ds.select(keep.tolist())


# --------------------------------------------------------------------------- local files


def resolve_task_dir(data_dir: str, info: GlueTaskInfo) -> Path:
    """``<data_dir>/<Folder>`` of the standard layout, or ``data_dir`` itself if it is that folder."""
    root = Path(data_dir).expanduser()
    if not root.is_absolute():
        # Relative to where the user launched cmiexp, even if Hydra changed the working dir.
        from hydra.utils import to_absolute_path

        root = Path(to_absolute_path(str(root)))
    if not root.is_dir():
        raise DataError(
            f"task.data_dir {root} does not exist or is not a folder: it must hold the standard "
            f"GLUE layout ({info.layout})"
        )
    nested = root / info.folder
    if nested.is_dir():
        return nested
    if root.name == info.folder or (root / info.required_files[0]).is_file():
        return root
    raise DataError(
        f"missing GLUE folder {nested}: task.data_dir must hold the standard GLUE layout "
        f"({info.layout}) or be the {info.folder} folder itself"
    )


def required_file(info: GlueTaskInfo, task_dir: Path, split: GlueSplitFile) -> Path:
    path = task_dir / split.filename
    if not path.is_file():
        raise DataError(f"missing GLUE file {path}: task.data_dir must hold the standard GLUE layout ({info.layout})")
    return path


def check_glue_files(task_cfg: Any) -> None:
    """Refuse a GLUE task whose local folder or files are missing, without reading them or importing
    a library (``cmiexp.jobs`` calls it before torch is imported; ``load_glue`` meets the same checks)."""
    info = get_task_info(setting(task_cfg, "dataset", "task"))
    data_dir = optional_setting(task_cfg, "data_dir")
    if data_dir is None or str(data_dir).strip() == "":
        return  # the hub: checked when it is loaded
    task_dir = resolve_task_dir(str(data_dir), info)
    for split in ([info.train] if info.train else []) + list(info.eval_splits):
        required_file(info, task_dir, split)


def _load_local(info: GlueTaskInfo, task_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    def required(split: GlueSplitFile, role: str):
        return read_glue_tsv(required_file(info, task_dir, split), info, role)

    train = required(info.train, "train") if info.train else None
    evals = {s.alias: required(s, "eval") for s in info.eval_splits}
    tests: dict[str, Any] = {}
    for s in info.test_splits:
        path = task_dir / s.filename
        if path.is_file():
            tests[s.alias] = read_glue_tsv(path, info, "test")
        elif not info.train:  # test-only task (ax): its test file is all there is
            required(s, "test")
    return train, evals, tests


def read_glue_tsv(path: Path, info: GlueTaskInfo, role: str) -> Any:
    """Read one GLUE TSV into a ``datasets.Dataset`` with hub columns and label ids.

    ``role`` is "train", "eval" or "test"; test rows get label -1 (NaN for regression).
    """
    columns = _parse_tsv(Path(path), info, role)
    return _to_dataset(columns, info)


def _parse_tsv(path: Path, info: GlueTaskInfo, role: str) -> dict[str, list]:
    try:
        return _parse_tsv_rows(path, info, role)
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, e) from None


def _parse_tsv_rows(path: Path, info: GlueTaskInfo, role: str) -> dict[str, list]:
    texts: dict[str, list[str]] = {f: [] for f in info.text_fields}
    labels: list[Any] = []
    with_labels = role != "test" and info.label_column is not None
    unlabelled = math.nan if info.is_regression else -1
    # utf-8-sig strips MRPC's BOM; newline="" lets csv see the real line ends.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if info.headerless is not None and role != "test":
            ncols, text_idx, label_idx = info.headerless
            header_desc = f"{ncols} columns (headerless)"
        else:
            header = _read_header(reader, path)
            ncols = len(header)
            header_desc = f"header {'|'.join(header)}"
            wanted = list(info.source_columns) + ([info.label_column] if with_labels else [])
            missing = [c for c in wanted if c not in header]
            if missing:
                raise DataError(
                    f"GLUE file {path} lacks column(s) {', '.join(map(repr, missing))} "
                    f"(its header: {'|'.join(header)}); expected the standard GLUE {info.folder} layout"
                )
            text_idx = tuple(header.index(c) for c in info.source_columns)
            label_idx = header.index(info.label_column) if with_labels else -1
        for row in reader:
            if not row:  # blank line (e.g. a trailing newline)
                continue
            if len(row) != ncols:
                raise DataError(
                    f"GLUE file {path} line {reader.line_num}: {len(row)} tab-separated columns, "
                    f"expected {ncols} ({header_desc})"
                )
            for field, i in zip(info.text_fields, text_idx):
                texts[field].append(row[i])
            labels.append(
                _parse_label(row[label_idx], info, path, reader.line_num) if with_labels else unlabelled
            )
    if not labels:
        raise DataError(f"GLUE file {path} has no data rows (empty {role} split)")
    return {**texts, "label": labels, "idx": list(range(len(labels)))}


def _read_header(reader: Iterator[list[str]], path: Path) -> list[str]:
    for row in reader:
        if row:
            return [row[0].lstrip("\ufeff"), *row[1:]]
    raise DataError(f"GLUE file {path} is empty (no header, no data rows)")


def _parse_label(value: str, info: GlueTaskInfo, path: Path, line: int) -> Any:
    v = value.strip()
    if info.label_kind == "float":
        try:
            score = float(v)
        except ValueError:
            score = math.nan
        if not 0.0 <= score <= 5.0:  # also rejects NaN
            raise DataError(
                f"GLUE file {path} line {line}: bad {info.label_column} {value!r}; "
                f"valid labels are floats in [0, 5]"
            )
        return score
    names = info.label_names
    if info.label_kind == "name":
        if v in names:
            return names.index(v)
        valid = ", ".join(names)
    else:  # "int": the TSV already holds the class id
        if v.isdigit() and int(v) < len(names):
            return int(v)
        valid = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
    raise DataError(
        f"GLUE file {path} line {line}: bad {info.label_column} {value!r}; valid labels are {valid}"
    )


def _features(info: GlueTaskInfo):
    import datasets

    feats = {f: datasets.Value("string") for f in info.text_fields}
    feats["label"] = (
        datasets.Value("float32")
        if info.is_regression
        else datasets.ClassLabel(names=list(info.label_names))
    )
    feats["idx"] = datasets.Value("int32")
    return datasets.Features(feats)


def _to_dataset(columns: dict[str, list], info: GlueTaskInfo) -> Any:
    import datasets

    return datasets.Dataset.from_dict(columns, features=_features(info))


# --------------------------------------------------------------------------- hub


_TRUE = {"1", "ON", "YES", "TRUE"}


def env_offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in _TRUE
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@contextmanager
def honour_offline_env() -> Iterator[None]:
    """Apply offline flags set after ``datasets`` was imported.

    datasets/huggingface_hub read HF_*_OFFLINE once at import; without this a flag set later
    (by a launcher, or a test's monkeypatch) is ignored and load_dataset spends ~25 s retrying
    the network. Cached datasets still load in offline mode.
    """
    if not env_offline():
        yield
        return
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg

    mods = [m for m in (dcfg, hcfg) if hasattr(m, "HF_HUB_OFFLINE")]
    saved = [m.HF_HUB_OFFLINE for m in mods]
    for m in mods:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, v in zip(mods, saved):
            m.HF_HUB_OFFLINE = v


_OFFLINE_MARKERS = ("offline", "connect", "timeout", "localentrynotfound", "name or service", "resolve host")


def is_connection_problem(exc: BaseException) -> bool:
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:  # walk the cause chain (hub errors wrap HTTP errors)
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        text = f"{type(e).__name__} {e}".lower()
        if any(m in text for m in _OFFLINE_MARKERS):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _load_hub(info: GlueTaskInfo, hub_path: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    import datasets

    local_hint = (
        f"set task.data_dir=/path/to/glue_data (standard GLUE layout, e.g. {info.layout}), "
        "or run `cmiexp` with no overrides for the offline default task=synthetic"
    )
    try:
        with honour_offline_env():
            dd = datasets.load_dataset(hub_path, info.name)
    except Exception as e:  # noqa: BLE001 - turned into one actionable line below
        first = (str(e).strip().splitlines() or [""])[0]
        if env_offline() or is_connection_problem(e):
            raise DataError(
                f"the Hugging Face Hub cannot be reached to load {hub_path}/{info.name} "
                f"({type(e).__name__}: {first}); {local_hint}"
            ) from e
        raise DataError(
            f"could not load {hub_path}/{info.name} from the hub ({type(e).__name__}: {first}); "
            f"{local_hint}"
        ) from e

    def split(s: GlueSplitFile, required: bool):
        if s.hub_split not in dd:
            if not required:
                return None
            raise DataError(
                f"hub dataset {hub_path}/{info.name} has no split {s.hub_split!r} "
                f"(it has: {', '.join(dd)}); set task.data_dir to read local GLUE files instead"
            )
        return _check_hub_split(dd[s.hub_split], info, f"{hub_path}/{info.name}[{s.hub_split}]")

    train = split(info.train, True) if info.train else None
    evals = {s.alias: split(s, True) for s in info.eval_splits}
    tests = {s.alias: ds for s in info.test_splits if (ds := split(s, not info.train)) is not None}
    return train, evals, tests


def _check_hub_split(ds: Any, info: GlueTaskInfo, where: str) -> Any:
    """Make sure a hub split has our columns and label order; keep only those columns."""
    import datasets

    missing = [c for c in (*info.text_fields, "label") if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {', '.join(missing)} (has: {', '.join(ds.column_names)})"
        )
    feat = ds.features.get("label")
    if isinstance(feat, datasets.ClassLabel) and info.label_names is not None:
        if list(feat.names) != list(info.label_names):
            raise DataError(
                f"{where} label order {feat.names} differs from the GLUE order "
                f"{list(info.label_names)}; label ids would be wrong"
            )
    if "idx" not in ds.column_names:
        ds = ds.add_column("idx", list(range(len(ds))))
    extra = [c for c in ds.column_names if c not in (*info.text_fields, "label", "idx")]
    return ds.remove_columns(extra) if extra else ds
