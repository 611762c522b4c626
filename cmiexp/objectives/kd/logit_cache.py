"""The KD teacher's logit cache: its training-set logits, computed once and looked up by ``idx``.

The teacher reads the raw text of the training examples through its *own* tokenizer (the one
saved in its checkpoint), so teacher and student may use different tokenizers; the student's
batches contribute only the example ids (``idx``); a prompt-head teacher (``head=masking`` or
``generation``) also gets the prompt its run config names. The logits are stored as safetensors
under the teachers folder, with the teacher (``cache_dir``), keyed by the training data's content,
the teacher tokenizer, ``task.max_length`` and the teacher weights (``cache_key``). The file is
built by one process (rank 0, under ``build_lock``) from the full training set in a fixed order
and written atomically, so it is the same for 1 and N processes and for concurrent students.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cmiexp.errors import DataError
from cmiexp.io import atomic_write_json
from cmiexp.models.heads import MODEL_INPUT_KEYS
from cmiexp.objectives.kd.teacher import TeacherInfo
from cmiexp.runs.lock import waiting_lock

CACHE_DIRNAME = "kd_cache"
#: Under the teachers folder: the caches of teachers that live elsewhere (given as a path).
EXTERNAL_DIRNAME = "external"


def weights_stamp(checkpoint_dir: Path) -> str:
    """Names, sizes and mtimes of the weight files: a retrained teacher gets a new cache key."""
    parts = []
    for f in sorted(Path(checkpoint_dir).iterdir()):
        if f.suffix in (".safetensors", ".bin") and f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cache_key(task, teacher_tokenizer, max_length: int, info: TeacherInfo, suffix=None) -> str:
    from cmiexp.data.tokenize import dataset_fingerprint, tokenizer_fingerprint

    stamp = weights_stamp(info.checkpoint_dir)
    if (info.checkpoint_dir / "backbone").is_dir():
        stamp += "|" + weights_stamp(info.checkpoint_dir / "backbone")
    parts = [task.name, dataset_fingerprint(task.train, list(task.text_fields) + ["idx"]),
             tokenizer_fingerprint(teacher_tokenizer), str(int(max_length)), stamp,
             *([suffix.cache_key()] if suffix is not None else [])]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_dir(info: TeacherInfo, teachers_root: str | os.PathLike) -> Path:
    """The ``kd_cache/`` folder of a teacher, always under the teachers folder: the teacher's own
    folder when it is there (every provisioned teacher), else
    ``<teachers_root>/external/<hash of its location>/`` with a ``teacher.json`` naming it (a
    teacher given as a path elsewhere: another run's folder is never written into)."""
    root = Path(teachers_root).expanduser().resolve()
    where = Path(info.run_dir or info.checkpoint_dir).resolve()
    if where == root or root in where.parents:
        return where / CACHE_DIRNAME
    home = root / EXTERNAL_DIRNAME / hashlib.sha256(str(where).encode()).hexdigest()[:12]
    if not (home / "teacher.json").is_file():
        atomic_write_json(home / "teacher.json", {"teacher": str(where), "checkpoint": str(info.checkpoint_dir)})
    return home / CACHE_DIRNAME


def cache_path(info: TeacherInfo, task, key: str, teachers_root: str | os.PathLike) -> Path:
    """``<kd_cache>/<task>-train-<key>.safetensors``; ``key`` (``cache_key``) covers the training
    data's content, the teacher tokenizer, ``max_length``, the teacher weights and prompt."""
    return cache_dir(info, teachers_root) / f"{task.name.replace('/', '_')}-train-{key}.safetensors"


def build_lock(path: Path):
    """The lock a cache build holds: a second student asking for the same file waits, then reads it."""
    return waiting_lock(path.with_name(f".{path.name}.lock"), f"waiting for {path} (another run is building it)")


class TeacherInputs:
    """The teacher's own tokenisation of the training set, addressable by example ``idx``."""

    def __init__(self, tokenized, tokenizer, input_keys: set[str]):
        from transformers import DataCollatorWithPadding

        self.keys = [k for k in MODEL_INPUT_KEYS if k in input_keys and k in tokenized.column_names]
        self.columns = {k: tokenized[k][:] for k in self.keys}
        self.idx = torch.as_tensor(tokenized["idx"][:], dtype=torch.long)
        self.position = index_map(self.idx)
        self.collate = DataCollatorWithPadding(tokenizer)

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, positions) -> dict[str, torch.Tensor]:
        feats = [{k: self.columns[k][int(p)] for k in self.keys} for p in positions]
        return dict(self.collate(feats))

    def positions_of(self, idx: torch.Tensor) -> torch.Tensor:
        return lookup_positions(self.position, idx)


def index_map(idx: torch.Tensor) -> torch.Tensor:
    """A dense map from example id to row position (-1 where absent)."""
    idx = idx.long().cpu()
    if idx.numel() == 0:
        return torch.full((0,), -1, dtype=torch.long)
    if int(idx.min()) < 0:
        raise DataError("training examples have negative idx values; KD caches key on idx >= 0")
    pos = torch.full((int(idx.max()) + 1,), -1, dtype=torch.long)
    pos[idx] = torch.arange(len(idx))
    if int((pos >= 0).sum()) != len(idx):
        raise DataError("training examples have duplicate idx values; KD caches need a unique idx per example")
    return pos


def lookup_positions(position: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    i = idx.long().to(position.device)
    ok = (i >= 0) & (i < len(position))
    pos = torch.where(ok, position[i.clamp(0, max(len(position) - 1, 0))], torch.full_like(i, -1))
    if bool((pos < 0).any()):
        missing = i[pos < 0][:5].tolist()
        raise DataError(f"the KD teacher logits have no entry for training example idx {missing}; delete the "
                        "teacher's kd_cache folder to rebuild it")
    return pos


@torch.no_grad()
def compute_teacher_logits(model, inputs: TeacherInputs, batch_size: int, device, autocast=None) -> torch.Tensor:
    """Teacher logits (fp32, CPU) for every row of ``inputs``, in row order."""
    out = []
    ctx = autocast if autocast is not None else contextlib.nullcontext
    for start in range(0, len(inputs), batch_size):
        b = inputs.batch(range(start, min(start + batch_size, len(inputs))))
        with ctx():
            logits = model(**{k: v.to(device) for k, v in b.items()}).logits
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def save_logit_cache(path: Path, idx: torch.Tensor, logits: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"idx": idx.long().contiguous(), "logits": logits.float().contiguous()}, str(tmp),
              metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_logit_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        return t["idx"], t["logits"]
    except Exception as e:  # noqa: BLE001 - a corrupt cache file is a user-fixable problem
        raise DataError(f"cannot read the KD teacher cache {path} ({type(e).__name__}); delete it to rebuild") from e


@dataclass
class LogitCache:
    """Teacher logits of the training set, looked up by example idx on the training device."""

    idx: torch.Tensor
    logits: torch.Tensor
    position: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.position = index_map(self.idx)

    def to(self, device) -> "LogitCache":
        self.logits = self.logits.to(device)
        self.position = self.position.to(device)
        return self

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits[lookup_positions(self.position, idx)]
