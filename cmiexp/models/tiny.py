"""Offline tiny models: the real Hugging Face architectures at toy sizes.

A tiny model is built from a config with random weights (fixed seed) and a tokenizer
trained locally on the task's training text, then saved with ``save_pretrained``. The
runner loads it back through the same ``from_pretrained`` calls it uses for hub models,
so every offline test exercises the real loading path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from cmiexp.errors import ConfigError
from cmiexp.models.vocab import bytelevel_bpe, unigram_vocab, wordpiece_vocab

ARCHITECTURES = ("bert", "distilbert", "roberta", "gpt2", "t5")

# Special tokens per tokenizer family (the ids follow the real checkpoints' conventions).
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_GPT2_SPECIALS = ["<|endoftext|>"]
_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def _train_wordpiece(texts: Iterable[str], vocab_size: int):
    from transformers import BertTokenizer

    vocab = wordpiece_vocab(texts, vocab_size, _BERT_SPECIALS)
    return BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)


def _train_unigram(texts: Iterable[str], vocab_size: int):
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=unigram_vocab(texts, vocab_size, _T5_SPECIALS), extra_ids=0)


def build_tokenizer(arch: str, texts: Iterable[str], vocab_size: int):
    if arch in ("bert", "distilbert"):
        return _train_wordpiece(texts, vocab_size)
    if arch == "roberta":
        from transformers import RobertaTokenizer

        vocab, merges = bytelevel_bpe(texts, vocab_size, _ROBERTA_SPECIALS)
        return RobertaTokenizer(vocab=vocab, merges=merges)
    if arch == "gpt2":
        from transformers import GPT2Tokenizer

        vocab, merges = bytelevel_bpe(texts, vocab_size, _GPT2_SPECIALS)
        tok = GPT2Tokenizer(vocab=vocab, merges=merges)
        tok.pad_token = tok.eos_token  # GPT-2 has no pad token; the classifier finds the last non-pad token
        return tok
    if arch == "t5":
        return _train_unigram(texts, vocab_size)
    raise ConfigError(f"unknown model.tiny.architecture={arch!r}; valid choices: {', '.join(ARCHITECTURES)}")


def build_config(arch: str, spec, tokenizer):
    """A transformers config for ``arch`` with the tiny dimensions in ``spec``."""
    from transformers import BertConfig, DistilBertConfig, GPT2Config, RobertaConfig, T5Config

    v = len(tokenizer)
    h, n_layers, n_heads = int(spec.hidden_size), int(spec.num_layers), int(spec.num_heads)
    ff = int(spec.intermediate_size)
    max_pos = int(spec.max_position_embeddings)
    if arch == "bert":
        return BertConfig(vocab_size=v, hidden_size=h, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                          intermediate_size=ff, max_position_embeddings=max_pos, pad_token_id=tokenizer.pad_token_id)
    if arch == "distilbert":
        return DistilBertConfig(vocab_size=v, dim=h, n_layers=n_layers, n_heads=n_heads, hidden_dim=ff,
                                max_position_embeddings=max_pos, pad_token_id=tokenizer.pad_token_id)
    if arch == "roberta":
        # RoBERTa offsets positions by padding_idx + 1, hence the two extra positions.
        return RobertaConfig(vocab_size=v, hidden_size=h, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             intermediate_size=ff, max_position_embeddings=max_pos + 2,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    if arch == "gpt2":
        return GPT2Config(vocab_size=v, n_embd=h, n_layer=n_layers, n_head=n_heads, n_inner=ff, n_positions=max_pos,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    if arch == "t5":
        # The original T5 layout: LM head tied to the embedding and decoder outputs scaled by d_model**-0.5.
        # transformers 5 builds every T5 from a config with a tied head and reads tie_word_embeddings=False
        # only as "do not scale" (v1.1 checkpoints untie when loaded), so False gave a tied, unscaled head:
        # logits of std ~sqrt(d_model) at init and a loss of 75-80 nats per token there (ln V is about 8).
        return T5Config(vocab_size=v, d_model=h, d_ff=ff, num_layers=n_layers, num_decoder_layers=n_layers,
                        num_heads=n_heads, d_kv=max(h // n_heads, 8), feed_forward_proj="gated-gelu",
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    raise ConfigError(f"unknown model.tiny.architecture={arch!r}; valid choices: {', '.join(ARCHITECTURES)}")


# Bumped whenever the way a tiny model is built changes, so cached folders built the old
# way are not reused (2: deterministic vocabularies, cmiexp/models/vocab.py; 3: tiny-t5 scales its
# decoder outputs, as the original T5 does with its tied head). conf/model/tiny-*.yaml carry it as
# model.tiny.build, so it is part of every run's identity (cmiexp.runs.identity): after a bump the same
# command trains into a new run folder (a run of the old build is neither reused nor resumed, and the
# report splits rows by model.tiny.build instead of pooling old and new seeds); tests/test_tiny_models.py
# checks the YAML files agree with it.
BUILD_VERSION = 3


def check_build(spec) -> None:
    """A tiny model spec must name the build this cmiexp makes (``model.tiny.build``): a run that says
    another build, or none, would record an identity that is not what it trained."""
    build = spec.get("build")
    if build is None:
        raise ConfigError(f"model.tiny.build is not set: this cmiexp builds tiny models at version {BUILD_VERSION}; "
                          f"add `build: {BUILD_VERSION}` under tiny: (as conf/model/tiny-*.yaml do), so the run's "
                          "identity records it")
    if isinstance(build, bool) or not isinstance(build, int) or build != BUILD_VERSION:
        raise ConfigError(f"model.tiny.build={build!r}: this cmiexp builds tiny models at version {BUILD_VERSION} "
                          f"only (older builds cannot be made again); set model.tiny.build={BUILD_VERSION}")


def tiny_model_dir(cache_dir: str | Path, model_name: str, spec, texts_hash: str) -> Path:
    spec_json = json.dumps({k: spec[k] for k in sorted(spec)}, sort_keys=True, default=str)
    key = hashlib.sha256(f"{BUILD_VERSION}|{spec_json}|{texts_hash}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "tiny-models" / f"{model_name}-{key}"


def hash_texts(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "replace"))
        h.update(b"\n")
    return h.hexdigest()


def ensure_tiny_model(cache_dir: str | Path, model_name: str, spec, texts: list[str]) -> Path:
    """Build (once) and return the folder holding the tiny model and its tokenizer.

    The folder is written under a temporary name and renamed into place, so concurrent
    processes (sweeps, distributed ranks) never see a half-written model.
    """
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    check_build(spec)
    arch = spec.architecture
    out = tiny_model_dir(cache_dir, model_name, spec, hash_texts(texts))
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = build_tokenizer(arch, texts, int(spec.vocab_size))
        config = build_config(arch, spec, tokenizer)
        # The "pretrained" weights of a tiny model are a fixed random draw, independent of the run seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec.init_seed))
            model = AutoModelForSeq2SeqLM.from_config(config) if arch == "t5" else AutoModel.from_config(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
