"""Chain-of-thought distillation data in the Distilling Step-by-Step (DSS) layout.

Folder layout (exactly what DSS's ``datasets.zip`` unpacks to)::

    <data_dir>/<ds>/<ds>_train.json        JSON Lines, one row per line
    <data_dir>/<ds>/<ds>_valid.json        only anli1 and esnli; svamp/cqa carve valid from train
    <data_dir>/<ds>/<ds>_test.json
    <data_dir>/<ds>/llm/<split>_CoT_0.json JSON array of raw teacher (PaLM) completions for rows
    <data_dir>/<ds>/llm/<split>_CoT_1.json   0..k-1 of <ds>_<split>.json, k rows per batch file ...

The batch files of a split are concatenated in index order and zipped with the rows, so their
total length must equal the row count. Each completion is "rationale + answer marker + answer",
followed by a run-on continuation in which the teacher invents further few-shot items
(``\\n\\nQ: ...`` or ``\\n\\nPremise: ...``); the parser cuts that continuation off first.

Per dataset (inputs and gold labels as DSS builds them; answer marker in the completion):

- svamp: input = the row's ``input`` (Body + "\\n" + Question); gold = the equation string
  ("( 84.0 / 2.0 )"); marker ``The answer is``, llm label = the "(...)" that follows it.
- cqa: input = question + "\\nAnswer Choices:\\n(a) c0\\n(b) c1 ... (e) c4"; gold = answer text;
  marker ``So the answer is``, llm label = the text after "(x)", final period dropped.
- anli1: input = premise + nli_separator + hypothesis; gold = entailment/neutral/contradiction
  (ids 0/1/2); marker ``So the answer is``, llm label = the following word, period dropped.
- esnli: as anli1, but the marker is ``Answer:`` (completions read "reason\\nAnswer: label").

``nli_separator`` defaults to ``"</s>"``: DSS joins premise and hypothesis with the T5
tokenizer's EOS token; set it to your student's EOS string (or e.g. ``"\\n"``) for other models.

Marker matching is case-sensitive, like DSS, so the teacher accuracies match the published
files' (SVAMP 73.5 % train, CQA 74.3 %, ANLI-r1 66.8 % valid). One deliberate deviation: when a
completion has no answer marker (about 1 % of SVAMP/ANLI, e.g. ANLI's ", so the answer is"),
DSS stores an empty rationale; here the rationale is the cut completion (still the teacher's
reasoning), ``llm_label`` is ``""`` and the row is counted in ``CotData.parse_failures``. With
``label_source=llm`` such rows train on an empty target, as DSS trains on its ``" "``; drop rows
with ``llm_label == ""`` if that is unwanted.

Splits: every split is a ``datasets.Dataset`` with columns ``idx`` (0-based row number in the
source file: unique within the split, stable across runs; carved train/valid keep their
train-file row numbers), ``input`` (formatted, without task prefix), ``label`` (gold),
``llm_label``, ``rationale`` and ``target`` (= ``label`` or ``llm_label`` per
``task.label_source``; metrics always compare against the gold ``label``). Where a dataset has
no valid file (svamp, cqa) the valid split is carved from train exactly as DSS does it:
``Dataset.train_test_split(test_size=0.1, seed=0)`` (CQA 8766/975, SVAMP 720/80). Model
selection uses valid, never test.

ANLI: the shared offline fixtures have no ``anli1_train.json``; loading it raises a DataError
unless ``task.require_train=false``, which loads valid/test only (``CotData.train`` is None).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cmiexp.data.safe_eval import svamp_correct
from cmiexp.checks import ALL_ROWS, TASK_SCHEMA, check_flag, check_number, optional_setting, setting
from cmiexp.errors import ConfigError, DataError

PREDICT_PREFIX = "predict: "
EXPLAIN_PREFIX = "explain: "
LABEL_SOURCES = ("gold", "llm")
NLI_LABELS = ("entailment", "neutral", "contradiction")  # ANLI / e-SNLI ids 0, 1, 2
DSS_DOWNLOAD = (
    "download datasets.zip from the root of https://github.com/google-research/distilling-step-by-step, "
    "unzip it and set task.data_dir to the unzipped 'datasets' folder"
)
LAYOUT = "<data_dir>/<ds>/<ds>_{train,valid,test}.json + <data_dir>/<ds>/llm/<split>_CoT_<i>.json"


def format_example(text: str, prefix: str) -> str:
    """Task-prefixed model input, e.g. ``format_example(x, PREDICT_PREFIX)``."""
    return prefix + text


def predict_input(text: str) -> str:
    """``"predict: " + text``: the label branch of DSS."""
    return format_example(text, PREDICT_PREFIX)


def explain_input(text: str) -> str:
    """``"explain: " + text``: the rationale branch of DSS."""
    return format_example(text, EXPLAIN_PREFIX)


# ---------------------------------------------------------------------------------------------
# Teacher-output parsing


@dataclass(frozen=True)
class ParsedOutput:
    rationale: str
    llm_label: str
    ok: bool  # False when the answer marker or the answer itself could not be found


def _strip_period(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def _label_equation(after: str) -> str:
    # "(84 / 2).\n..." -> "(84 / 2)": first "(" to last ")" on the marker's line (DSS: r"\(.*\)").
    line = after.split("\n", 1)[0]
    start, end = line.find("("), line.rfind(")")
    return line[start : end + 1] if 0 <= start < end else ""


_CHOICE = re.compile(r"\(.\)")


def _label_choice(after: str) -> str:
    # " (d) math problem." -> "math problem": the text after the first "(x)" choice letter.
    m = _CHOICE.search(after)
    return _strip_period(after[m.end() :]) if m else ""


def _label_word(after: str) -> str:
    # " contradiction." -> "contradiction"
    return _strip_period(after)


@dataclass(frozen=True)
class _Spec:
    name: str
    file_splits: tuple[str, ...]  # splits that have their own row file
    continuation: re.Pattern  # where the invented few-shot continuation begins
    marker: str
    parse_label: Callable[[str], str]
    answer_type: str  # "equation" (value match) or "text" (exact match)
    pair: bool = False  # the input joins a premise and a hypothesis with task.nli_separator

    @property
    def has_valid(self) -> bool:
        return "valid" in self.file_splits


_SPECS = {
    "svamp": _Spec("svamp", ("train", "test"), re.compile(r"\n\s*Q:"), "The answer is", _label_equation, "equation"),
    "cqa": _Spec("cqa", ("train", "test"), re.compile(r"\n\s*Q:"), "So the answer is", _label_choice, "text"),
    "anli1": _Spec("anli1", ("train", "valid", "test"), re.compile(r"\n\s*Premise:"), "So the answer is", _label_word,
                   "text", pair=True),
    "esnli": _Spec("esnli", ("train", "valid", "test"), re.compile(r"\n\s*Premise:"), "Answer:", _label_word, "text",
                   pair=True),
}
DATASETS = tuple(_SPECS)


def _spec(dataset: str) -> _Spec:
    if dataset not in _SPECS:
        raise ConfigError(f"task.dataset={dataset!r} is not a CoT dataset; choose one of {', '.join(DATASETS)}")
    return _SPECS[dataset]


def parse_llm_output(dataset: str, output: str) -> ParsedOutput:
    """Split one raw teacher completion into (rationale, llm_label), DSS rules (see module doc)."""
    spec = _spec(dataset)
    m = spec.continuation.search(output)
    text = (output[: m.start()] if m else output).strip()
    pos = text.find(spec.marker)
    if pos < 0:
        return ParsedOutput(rationale=text, llm_label="", ok=False)
    rationale = text[:pos].rstrip()
    label = spec.parse_label(text[pos + len(spec.marker) :])
    return ParsedOutput(rationale=rationale, llm_label=label, ok=bool(label))


# ---------------------------------------------------------------------------------------------
# Inputs and gold labels


def _field(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    return row[key]


def format_input(dataset: str, row: dict, nli_separator: str, where: str = "row") -> str:
    """The model input of one source row, without task prefix (templates in the module doc)."""
    _spec(dataset)
    if dataset == "svamp":
        return str(_field(row, "input", where))
    if dataset == "cqa":
        question = _field(row, "question", where)
        choices = _field(row, "choices", where)
        if not isinstance(choices, list) or not choices or len(choices) > 26:
            raise DataError(f"{where}: field 'choices' must be a non-empty list of answer texts")
        lines = [f"({chr(ord('a') + i)}) {c}" for i, c in enumerate(choices)]
        return f"{question}\nAnswer Choices:\n" + "\n".join(lines)
    return f"{_field(row, 'premise', where)}{nli_separator}{_field(row, 'hypothesis', where)}"


def gold_label(dataset: str, row: dict, where: str = "row") -> str:
    """The gold answer text of one source row: equation (svamp), answer (cqa), label name (NLI)."""
    _spec(dataset)
    if dataset == "svamp":
        return str(_field(row, "label", where))
    if dataset == "cqa":
        return str(_field(row, "answer", where))
    label = _field(row, "label", where)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(NLI_LABELS):
        raise DataError(f"{where}: label {label!r} is not 0/1/2 ({'/'.join(NLI_LABELS)})")
    return NLI_LABELS[label]


def answer_correct(dataset: str, pred: str, gold: str) -> bool:
    """SVAMP: equations with equal values (``svamp_correct``); others: exact text match after strip."""
    if _spec(dataset).answer_type == "equation":
        return svamp_correct(pred, gold)
    return str(pred).strip() == str(gold).strip()


def answer_accuracy(dataset: str, preds, golds) -> float:
    """Mean of ``answer_correct`` over aligned predictions and gold labels."""
    preds, golds = list(preds), list(golds)
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions vs {len(golds)} gold labels")
    if not golds:
        raise ValueError("answer_accuracy needs at least one example")
    return sum(answer_correct(dataset, p, g) for p, g in zip(preds, golds)) / len(golds)


# ---------------------------------------------------------------------------------------------
# File reading


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSON Lines file (blank lines skipped); DataError naming file:line on bad JSON."""
    if not path.is_file():
        raise DataError(f"missing data file {path} (expected layout: {LAYOUT})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def llm_files(ds_dir: Path, split: str) -> list[Path]:
    """``llm/<split>_CoT_<i>.json`` for i = 0, 1, ... in index order; DataError if none or a gap."""
    llm_dir = ds_dir / "llm"
    pattern = re.compile(rf"{re.escape(split)}_CoT_(\d+)\.json")
    found = {}
    if llm_dir.is_dir():
        for p in llm_dir.iterdir():
            m = pattern.fullmatch(p.name)
            if m:
                found[int(m.group(1))] = p
    if not found:
        raise DataError(f"missing teacher outputs {llm_dir / f'{split}_CoT_0.json'} (expected layout: {LAYOUT})")
    for i in range(max(found) + 1):
        if i not in found:
            raise DataError(f"missing teacher outputs {llm_dir / f'{split}_CoT_{i}.json'}: batch files must be numbered 0..{max(found)} without gaps")
    return [found[i] for i in sorted(found)]


def read_llm_outputs(files: list[Path]) -> list[str]:
    outputs: list[str] = []
    for p in files:
        try:
            with open(p, encoding="utf-8") as f:
                batch = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(batch, list) or not all(isinstance(s, str) for s in batch):
            raise DataError(f"{p}: expected a JSON array of teacher completion strings")
        outputs.extend(batch)
    return outputs


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class CotData:
    """The three splits of one CoT-distillation task plus facts the runner needs."""

    name: str
    dataset: str
    train: Any | None  # datasets.Dataset, or None when loaded with require_train=false
    valid: Any
    test: Any
    label_source: str
    answer_type: str  # "equation": compare by value (svamp_correct); "text": exact match
    metric: str = "accuracy"
    parse_failures: dict[str, int] = field(default_factory=dict)  # split -> rows without a parsed llm label
    teacher_accuracy: dict[str, float] = field(default_factory=dict)  # split -> mean(llm_label correct)

    def splits(self) -> dict[str, Any]:
        out = {"train": self.train, "valid": self.valid, "test": self.test}
        return {k: v for k, v in out.items() if v is not None}

    def is_correct(self, pred: str, gold: str) -> bool:
        return answer_correct(self.dataset, pred, gold)

    def accuracy(self, preds, golds) -> float:
        return answer_accuracy(self.dataset, preds, golds)

    # What the training runner reads from any task (TaskData has the same names).
    @property
    def primary_metric(self) -> str:
        return self.metric

    @property
    def metrics(self) -> list[str]:
        return [self.metric]

    @property
    def train_texts(self):
        """Every input, rationale and label (gold and teacher) of the training split, for
        building the offline tiny tokenizers. Both label columns are included whatever
        ``label_source`` is, so runs that differ only in label source share one tokenizer."""
        if self.train is None:
            return
        for col in ("input", "rationale", "label", "llm_label"):
            yield from self.train[col][:]


def _load_split(spec: _Spec, ds_dir: Path, split: str, nli_separator: str) -> list[dict]:
    row_path = ds_dir / f"{spec.name}_{split}.json"
    rows = read_rows(row_path)
    files = llm_files(ds_dir, split)
    outputs = read_llm_outputs(files)
    if len(outputs) != len(rows):
        names = ", ".join(p.name for p in files)
        raise DataError(
            f"{row_path} has {len(rows)} rows but {ds_dir / 'llm'} ({names}) holds {len(outputs)} teacher "
            "outputs; they must align one to one"
        )
    records = []
    for i, (row, out) in enumerate(zip(rows, outputs)):
        where = f"{row_path}:{i + 1}"
        parsed = parse_llm_output(spec.name, out)
        records.append(
            {
                "idx": i,
                "input": format_input(spec.name, row, nli_separator, where),
                "label": gold_label(spec.name, row, where),
                "llm_label": parsed.llm_label,
                "rationale": parsed.rationale,
            }
        )
    return records


def dataset_dir(dataset: str, data_dir) -> Path:
    """``<task.data_dir>/<dataset>``; DataError when data_dir is unset or that folder is missing."""
    if data_dir is None:
        raise DataError(f"task.data_dir is not set: {DSS_DOWNLOAD} (layout: {LAYOUT})")
    ds_dir = Path(str(data_dir)).expanduser() / dataset
    if not ds_dir.is_dir():
        raise DataError(f"task.data_dir: no folder {ds_dir} (expected layout: {LAYOUT}; {DSS_DOWNLOAD})")
    return ds_dir


def check_cot_files(task_cfg) -> None:
    """Refuse a CoT task whose data folder is missing, reading nothing and importing no library
    (``cmiexp.jobs`` calls it before torch is imported; ``load_cot`` meets the same check)."""
    dataset = optional_setting(task_cfg, "dataset")
    if dataset is not None:  # a missing dataset is named by the loader
        dataset_dir(_spec(str(dataset)).name, optional_setting(task_cfg, "data_dir"))


def load_cot(task_cfg) -> CotData:
    """Load a CoT-distillation task from ``task.data_dir`` (see the module doc for keys and layout).

    Config keys (their defaults live in ``conf/task/cot/<dataset>.yaml``; a key the dataset reads
    and the config lacks is a ConfigError): ``dataset`` (svamp/cqa/anli1/esnli), ``data_dir``,
    ``label_source`` (gold/llm), ``metric``, ``max_train_samples`` / ``max_eval_samples`` (first N
    rows of train / of valid and test), optional ``name``; ``valid_fraction`` and ``split_seed``
    for the datasets that carve valid from train (svamp, cqa); ``require_train`` for those with a
    valid file (anli1, esnli); ``nli_separator`` for the premise/hypothesis pairs (anli1, esnli).
    """
    from datasets import Dataset

    dataset = optional_setting(task_cfg, "dataset")
    if dataset is None:
        raise ConfigError(f"task.dataset is required; choose one of {', '.join(DATASETS)}")
    spec = _spec(str(dataset))
    name = str(optional_setting(task_cfg, "name") or f"cot/{spec.name}")

    label_source = setting(task_cfg, "label_source", "task")
    if label_source not in LABEL_SOURCES:
        raise ConfigError(f"task.label_source must be one of {', '.join(LABEL_SOURCES)}, got {label_source!r}")
    if not spec.has_valid:  # valid is carved from train: train is always needed
        valid_fraction = check_number("task.valid_fraction", setting(task_cfg, "valid_fraction", "task"),
                                      TASK_SCHEMA["valid_fraction"])
        split_seed = check_number("task.split_seed", setting(task_cfg, "split_seed", "task"), TASK_SCHEMA["split_seed"])
    require_train = True  # a dataset that carves valid from train always needs train
    if spec.has_valid:
        require_train = check_flag("task.require_train", setting(task_cfg, "require_train", "task"))
    nli_separator = setting(task_cfg, "nli_separator", "task") if spec.pair else ""
    if not isinstance(nli_separator, str):
        raise ConfigError(f"task.nli_separator={nli_separator!r} must be a string (e.g. \"</s>\", the student's EOS)")
    max_train = check_number("task.max_train_samples", optional_setting(task_cfg, "max_train_samples"), ALL_ROWS)
    max_eval = check_number("task.max_eval_samples", optional_setting(task_cfg, "max_eval_samples"), ALL_ROWS)
    metric = str(setting(task_cfg, "metric", "task"))
    if metric != "accuracy":
        raise ConfigError(f"task.metric={metric!r} is not supported for CoT tasks; use accuracy")

    ds_dir = dataset_dir(spec.name, optional_setting(task_cfg, "data_dir"))

    records: dict[str, list[dict]] = {}
    for split in spec.file_splits:
        if split == "train" and not (ds_dir / f"{spec.name}_train.json").is_file():
            if require_train:
                raise DataError(
                    f"missing data file {ds_dir / f'{spec.name}_train.json'} (needed for training; "
                    "set task.require_train=false to load only valid/test for evaluation)"
                )
            if not spec.has_valid:
                raise DataError(
                    f"missing data file {ds_dir / f'{spec.name}_train.json'}: {spec.name} carves its "
                    "valid split from train, so train is required"
                )
            continue
        records[split] = _load_split(spec, ds_dir, split, nli_separator)

    # "target" is set before any carving/selection, so no split needs its index mapping flattened.
    target_col = "label" if label_source == "gold" else "llm_label"
    for rows in records.values():
        for r in rows:
            r["target"] = r[target_col]
    splits = {k: Dataset.from_list(v) for k, v in records.items()}
    if not spec.has_valid:
        # The DSS carve, reproduced with the same call so the rows match the paper's runs.
        carved = splits["train"].train_test_split(test_size=valid_fraction, seed=split_seed)
        splits["train"], splits["valid"] = carved["train"], carved["test"]

    if max_train is not None and "train" in splits:
        splits["train"] = splits["train"].select(range(min(max_train, len(splits["train"]))))
    if max_eval is not None:
        for k in ("valid", "test"):
            splits[k] = splits[k].select(range(min(max_eval, len(splits[k]))))

    teacher_acc: dict[str, float] = {}
    failures: dict[str, int] = {}
    for k, ds in splits.items():
        if len(ds):
            teacher_acc[k] = answer_accuracy(spec.name, ds["llm_label"][:], ds["label"][:])
        failures[k] = sum(1 for x in ds["llm_label"][:] if not x)

    return CotData(
        name=name,
        dataset=spec.name,
        train=splits.get("train"),
        valid=splits["valid"],
        test=splits["test"],
        label_source=label_source,
        answer_type=spec.answer_type,
        metric=metric,
        parse_failures=failures,
        teacher_accuracy=teacher_acc,
    )
