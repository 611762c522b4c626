"""Tokenisation with an on-disk cache keyed by (data, tokenizer, max length).

Tokenising SST-2 or MNLI takes longer than a tiny model's epoch, so each split is tokenised
once and stored as an Arrow file whose name is a hash of everything that changes its content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cmiexp.data.base import TaskData


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of the tokenizer's vocabulary and processing rules."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"{type(tokenizer).__name__}|{tokenizer.padding_side}|{tokenizer.truncation_side}".encode())
    return h.hexdigest()[:16]


def dataset_fingerprint(dataset, columns) -> str:
    """Content hash of the given columns (in-memory datasets get random fingerprints from
    ``datasets``, which would defeat the cache)."""
    h = hashlib.sha256()
    for c in columns:
        h.update(c.encode())
        h.update(json.dumps(dataset[c][:], default=str).encode())  # [:] reads the whole column (datasets 5 returns a lazy Column)
    return h.hexdigest()[:20]


def tokenize_split(dataset, task: TaskData, tokenizer, max_length: int, cache_dir: str | Path | None,
                   split_name: str = "split"):
    """Return ``dataset`` with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
    model uses them), ``labels`` and ``idx``; other columns are dropped."""
    fields = list(task.text_fields)
    is_reg = task.is_regression

    def encode(batch):
        texts = [batch[f] for f in fields]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        enc["labels"] = [float(v) for v in batch["label"]] if is_reg else [int(v) for v in batch["label"]]
        return enc

    kwargs = {}
    if cache_dir is not None:
        key = hashlib.sha256(
            "|".join([dataset_fingerprint(dataset, fields + ["label", "idx"]), tokenizer_fingerprint(tokenizer), str(max_length), str(is_reg), *fields]).encode()
        ).hexdigest()[:20]
        path = Path(cache_dir) / "tokenized" / f"{task.name.replace('/', '_')}-{split_name}-{key}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(path), "load_from_cache_file": True}
    keep = {"idx"}
    remove = [c for c in dataset.column_names if c not in keep]
    out = dataset.map(encode, batched=True, remove_columns=remove, desc=f"tokenize {split_name}", **kwargs)
    return out
