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


def suffix_token_ids(tokenizer, suffix) -> list[int]:
    """Token ids of a head's prompt suffix (``cmiexp.models.heads.InputSuffix``), checked."""
    from cmiexp.errors import ConfigError

    ids = list(tokenizer(suffix.text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"head prompt {suffix.text!r} encodes to no tokens")
    if suffix.must_end_with_id is not None and ids[-1] != suffix.must_end_with_id:
        raise ConfigError(f"head prompt {suffix.text!r} does not end with the mask token after tokenisation "
                          f"(ids {ids[-4:]}, mask id {suffix.must_end_with_id}); check head.prompt")
    return ids


def encode_with_suffix(tokenizer, texts: list, suffix_ids: list[int], placement: str, max_length: int) -> dict:
    """Tokenise ``texts`` (one list per text field) and append ``suffix_ids`` to every row.

    The texts are truncated to leave room for the suffix, so the suffix (and its mask token)
    always survives. ``placement="before_special"`` inserts it before the trailing special
    tokens ([SEP], </s>); ``"end"`` after everything. Inserted tokens are attended and take
    the token type of the token before them."""
    from cmiexp.errors import ConfigError

    room = max_length - len(suffix_ids)
    specials = tokenizer.num_special_tokens_to_add(pair=len(texts) > 1)
    if room <= specials:
        raise ConfigError(f"task.max_length={max_length} leaves no room for the text after the head prompt "
                          f"({len(suffix_ids)} tokens); raise task.max_length")
    enc = tokenizer(*texts, truncation=True, max_length=room, return_special_tokens_mask=True)
    special = enc.pop("special_tokens_mask")
    out: dict[str, list] = {k: [] for k in enc.keys()}
    for i, ids in enumerate(enc["input_ids"]):
        trailing = 0
        if placement == "before_special":
            while trailing < len(ids) and special[i][len(ids) - 1 - trailing] == 1:
                trailing += 1
            if trailing == len(ids):  # only special tokens (empty text): keep the first one in front
                trailing = len(ids) - 1 if ids else 0
        at = len(ids) - trailing
        for key in enc.keys():
            row = list(enc[key][i])
            if key == "input_ids":
                fill = list(suffix_ids)
            elif key == "attention_mask":
                fill = [1] * len(suffix_ids)
            else:  # token_type_ids and the like: continue the segment the suffix joins
                fill = [row[at - 1] if at > 0 else (row[0] if row else 0)] * len(suffix_ids)
            out[key].append(row[:at] + fill + row[at:])
    return out


def tokenize_split(dataset, task: TaskData, tokenizer, max_length: int, cache_dir: str | Path | None,
                   split_name: str = "split", suffix=None):
    """Return ``dataset`` with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
    model uses them), ``labels`` and ``idx``; other columns are dropped.

    ``suffix`` (a ``cmiexp.models.heads.InputSuffix`` or None): a prompt appended to every input,
    e.g. "The answer is [MASK]" for ``head=masking``."""
    fields = list(task.text_fields)
    is_reg = task.is_regression
    suffix_ids = suffix_token_ids(tokenizer, suffix) if suffix is not None else None

    def encode(batch):
        texts = [batch[f] for f in fields]
        if suffix_ids is None:
            enc = tokenizer(*texts, truncation=True, max_length=max_length)
        else:
            enc = encode_with_suffix(tokenizer, texts, suffix_ids, suffix.placement, max_length)
        enc["labels"] = [float(v) for v in batch["label"]] if is_reg else [int(v) for v in batch["label"]]
        return enc

    kwargs = {}
    if cache_dir is not None:
        key = hashlib.sha256(
            "|".join([dataset_fingerprint(dataset, fields + ["label", "idx"]), tokenizer_fingerprint(tokenizer), str(max_length), str(is_reg), *fields,
                      *([suffix.cache_key()] if suffix is not None else [])]).encode()
        ).hexdigest()[:20]
        path = Path(cache_dir) / "tokenized" / f"{task.name.replace('/', '_')}-{split_name}-{key}.arrow"
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(path), "load_from_cache_file": True}
    keep = {"idx"}
    remove = [c for c in dataset.column_names if c not in keep]
    out = dataset.map(encode, batched=True, remove_columns=remove, desc=f"tokenize {split_name}", **kwargs)
    return out
