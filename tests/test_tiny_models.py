"""Tiny offline models are a pure function of their spec and text.

The same config must give the same tokenizer (and so the same ids and the same numbers) on
every build: a tokenizer whose id map changed between builds made a tiny-BERT accuracy drift
between runs of one config.
"""

from __future__ import annotations

import pytest

import math

from cmiexp.models.tiny import BUILD_VERSION, build_tokenizer, tiny_model_dir
from cmiexp.models.vocab import learn_bpe, unigram_vocab, wordpiece_vocab
from tests.test_heads import shared_task


def _texts(n: int = 400) -> list[str]:
    t = shared_task("rte").train
    return list(t["sentence1"][:n]) + list(t["sentence2"][:n])


def test_learn_bpe_hand_case():
    # Sennrich et al.'s example corpus. Pair counts: e-s 9, s-t 9 (tie: the smaller pair first),
    # then es-t 9, l-o 7, lo-w 7; then n-e, e-w, w-est all 6: e-w is the smallest, then ew-est.
    merges, counts = learn_bpe({"low": 5, "lower": 2, "newest": 6, "widest": 3}, "lowerntsid", budget=6)
    assert merges == [("e", "s"), ("es", "t"), ("l", "o"), ("lo", "w"), ("e", "w"), ("ew", "est")]
    assert counts == [9, 9, 7, 7, 6, 6]


def test_learn_bpe_with_continuation_prefix():
    # "abc" x2 -> a ##b ##c; "bc" x1 -> b ##c. ##b-##c (2) ties a-##b (2) and sorts first ("#" < "a").
    merges, counts = learn_bpe({"abc": 2, "bc": 1}, "abc", budget=10, continuing_prefix="##")
    assert merges == [("##b", "##c"), ("a", "##bc"), ("b", "##c")] and counts == [2, 2, 1]


def test_learn_bpe_counts_only_new_pieces_against_the_budget():
    # "ab" x3 -> a ##b; "xab" x1 -> x ##a ##b. The first merge, a-##b (3), rebuilds the known "ab", so
    # learning goes on to ##a-##b (1; it ties x-##a and sorts first), the one new piece the budget allows.
    merges, _ = learn_bpe({"ab": 3, "xab": 1}, "abx", budget=1, continuing_prefix="##", known={"ab"})
    assert merges == [("a", "##b"), ("##a", "##b")]


def test_wordpiece_vocab_layout():
    vocab = wordpiece_vocab(["The cat sat.", "the CAT", "the a"], 20, ["[PAD]", "[UNK]"])
    chars = [".", "a", "c", "e", "h", "s", "t"]
    assert vocab[:2] == ["[PAD]", "[UNK]"]
    assert vocab[2:2 + len(chars)] == chars and vocab[2 + len(chars):2 + 2 * len(chars)] == [f"##{c}" for c in chars]
    # merges (lower-cased words: the x3, cat x2, sat x1, a x1): ##a-##t 3 and ##h-##e 3 first, then t-##he 3 ...
    assert vocab[16:] == ["##at", "##he", "the", "cat"] and len(vocab) == 20


def test_unigram_vocab_scores_are_log_frequencies():
    # Metaspace words: "▁the" x2, "▁cat" x2, "▁sat." x1: 21 character occurrences.
    vocab = unigram_vocab(["the cat sat.", "the cat"], 12, ["<pad>", "</s>", "<unk>"])
    assert [p for p, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"] and all(s == 0.0 for _, s in vocab[:3])
    scores = dict(vocab)
    assert sorted(p for p, _ in vocab[3:11]) == [".", "a", "c", "e", "h", "s", "t", "▁"]
    # the first merge is a-t (3: cat x2, sat x1); total = 21 characters + 3 for the one merged piece
    assert vocab[11][0] == "at"
    assert scores["at"] == pytest.approx(math.log(3 / 24)) and scores["t"] == pytest.approx(math.log(5 / 24))


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "t5"])
def test_tokenizer_build_is_deterministic(arch):
    texts = _texts()
    first = build_tokenizer(arch, texts, 600).get_vocab()
    second = build_tokenizer(arch, texts, 600).get_vocab()
    assert first == second


def test_wordpiece_tokenizer_covers_its_text_and_keeps_bert_ids():
    texts = _texts()
    tok = build_tokenizer("bert", texts, 600)
    assert len(tok) == 600
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    ids = tok(texts[:50])["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    # frequent words are single tokens; the rest split into characters, and decode back
    assert tok.tokenize("the") == ["the"]
    assert tok.decode(tok("Zyzzyva theorem.", add_special_tokens=False)["input_ids"]) == "zyzzyva theorem."


def test_tiny_model_dir_changes_with_build_version(monkeypatch):
    spec = {"architecture": "bert", "vocab_size": 600}
    before = tiny_model_dir("/c", "tiny-bert", spec, "h")
    monkeypatch.setattr("cmiexp.models.tiny.BUILD_VERSION", BUILD_VERSION + 1)
    assert tiny_model_dir("/c", "tiny-bert", spec, "h") != before


def test_every_tiny_model_config_names_this_build():
    """conf/model/tiny-*.yaml carry BUILD_VERSION as model.tiny.build (the run identity sees the YAML,
    not the code): a bump of one without the other fails here."""
    from omegaconf import OmegaConf

    from tests.conftest import REPO

    files = sorted((REPO / "conf" / "model").glob("tiny-*.yaml"))
    assert len(files) == 5
    assert {f.name: OmegaConf.load(f).tiny.build for f in files} == {f.name: BUILD_VERSION for f in files}


@pytest.mark.parametrize("build,says", [(None, "model.tiny.build is not set"), (BUILD_VERSION - 1, "model.tiny.build=2:"),
                                        ("3", "model.tiny.build='3':"), (True, "model.tiny.build=True:")])
def test_a_spec_of_another_build_is_refused_before_building(tmp_path, build, says):
    from cmiexp.errors import ConfigError
    from cmiexp.models.tiny import ensure_tiny_model

    spec = {"architecture": "bert", "vocab_size": 600, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 64, "init_seed": 0}
    if build is not None:
        spec["build"] = build
    with pytest.raises(ConfigError) as e:
        ensure_tiny_model(tmp_path, "tiny-bert", spec, _texts())
    assert str(e.value).startswith(says) and "\n" not in str(e.value) and str(BUILD_VERSION) in str(e.value)
    assert not (tmp_path / "tiny-models").exists()  # nothing built


def test_the_build_is_part_of_the_run_identity():
    """A run trained on another tiny build (an older run_config.json has no model.tiny.build) has another
    run folder: the same command after a bump trains anew instead of reusing or resuming it."""
    from cmiexp.runs import config_hash, identity_config

    from tests.conftest import compose_config

    cfg = compose_config(["model=tiny-t5", "task=cot/svamp"])
    ident = identity_config(cfg)
    assert ident["model"]["tiny"]["build"] == BUILD_VERSION
    older = identity_config(cfg)
    del older["model"]["tiny"]["build"]
    assert config_hash(older) != config_hash(cfg) == config_hash(ident)


def test_tiny_t5_starts_with_unit_scale_logits(tmp_path):
    """tiny-t5 is built as the original T5 (head tied to the embedding, decoder outputs scaled by
    d_model**-0.5), so a fresh model's first loss is near ln V, the loss of a uniform guess. Built
    tied but unscaled (what transformers 5 makes of tie_word_embeddings=False), its logits had a
    std of about sqrt(d_model) and an initial loss of 75-80 nats per token (81 on these inputs)."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from cmiexp.models.tiny import ensure_tiny_model

    spec = OmegaConf.create({"architecture": "t5", "vocab_size": 600, "hidden_size": 128, "num_layers": 2,
                             "num_heads": 2, "intermediate_size": 256, "max_position_embeddings": 512,
                             "init_seed": 0, "build": BUILD_VERSION})
    path = ensure_tiny_model(tmp_path, "tiny-t5", spec, _texts())
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()  # the path every run takes
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.scale_decoder_outputs is True
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    enc = tok(_texts(16)[:16], max_length=48, truncation=True, padding=True, return_tensors="pt")
    targets = tok(_texts(16)[16:], max_length=24, truncation=True, padding=True, return_tensors="pt").input_ids
    targets[targets == tok.pad_token_id] = -100
    with torch.no_grad():
        out = model(**enc, labels=targets)
    log_v = math.log(len(tok))
    assert 0.8 * log_v < float(out.loss) < 1.3 * log_v, (float(out.loss), log_v)
    assert float(out.logits.std()) < 2.0  # ~1 for unit-scale logits; ~11 (sqrt 128) unscaled
