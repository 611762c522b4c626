"""Prompt heads on every tokenizer family of the hub models, built locally from GLUE text.

Families (what each hub model ships): WordPiece ([CLS] a [SEP] b [SEP]; BERT, DistilBERT),
byte-level BPE with a mask token (<s> a </s></s> b </s>, lstrip <mask>; RoBERTa), byte-level BPE
with [CLS]/[SEP] templates and an lstrip [MASK] (ModernBERT), byte-level BPE without pad or mask
(GPT-2, SmolLM2), SentencePiece BPE adding <s> without pad or mask (Llama tokenizer; MobileLLM),
SentencePiece Unigram with [MASK] (DeBERTa-v3) and SentencePiece Unigram appending </s> without
mask (T5). Each is saved and reloaded through ``load_tokenizer`` (AutoTokenizer.from_pretrained,
as a run does), then rows are encoded with the head's prompt exactly as ``tokenize_split`` does and
padded left and right with the runner's collator; the positions the heads read must hold the mask
token / the last prompt token in every row.
"""

from __future__ import annotations

import functools

import pytest
import torch

from cmiexp.data.tokenize import encode_with_suffix, suffix_token_ids
from cmiexp.errors import ConfigError
from cmiexp.models.factory import load_tokenizer
from cmiexp.models.heads import causal_position_ids, input_suffix, last_token_positions, mask_positions
from tests.conftest import compose_config
from tests.test_heads import shared_task

VOCAB = 400
MAX_LEN = 40


def _texts():
    t = shared_task("rte").train
    return list(t["sentence1"][:]) + list(t["sentence2"][:])


def _bytelevel_bpe(specials):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(_texts(), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _vocab_merges(tok):
    import json

    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _unigram(specials, unk):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(_texts(), trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials, unk_token=unk))
    return [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]


def build_family(family: str):
    import transformers as tf
    from tokenizers import AddedToken, processors

    if family == "wordpiece":  # BERT
        from cmiexp.models.tiny import build_tokenizer

        return build_tokenizer("bert", _texts(), VOCAB)
    if family == "bpe-mask-roberta":
        vocab, merges = _vocab_merges(_bytelevel_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
        return tf.RobertaTokenizer(vocab=vocab, merges=merges)
    if family == "bpe-mask-modernbert":
        raw = _bytelevel_bpe(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
        raw.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", raw.token_to_id("[CLS]")), ("[SEP]", raw.token_to_id("[SEP]"))])
        return tf.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", cls_token="[CLS]",
                                          sep_token="[SEP]", pad_token="[PAD]",
                                          mask_token=AddedToken("[MASK]", lstrip=True, special=True))
    if family == "bpe-nomask-gpt2":
        vocab, merges = _vocab_merges(_bytelevel_bpe(["<|endoftext|>"]))
        return tf.GPT2Tokenizer(vocab=vocab, merges=merges)
    if family == "spm-bpe-llama":  # MobileLLM: SentencePiece BPE, adds <s>, no pad, no mask
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        raw = Tokenizer(models.BPE(unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Metaspace()
        raw.train_from_iterator(_texts(), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
        vocab, merges = _vocab_merges(raw)
        return tf.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # as the hub tokenizer.model does
    if family == "unigram-deberta":
        vocab = _unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], "[UNK]")
        return tf.DebertaV2Tokenizer(vocab=vocab, unk_id=3)
    if family == "unigram-t5":
        from cmiexp.models.tiny import build_tokenizer

        return build_tokenizer("t5", _texts(), VOCAB)
    raise AssertionError(family)


# family -> the hub model it stands for (its conf/model: family, padding side, head choices)
FAMILIES = {"wordpiece": "bert-base-uncased", "bpe-mask-roberta": "roberta-base",
            "bpe-mask-modernbert": "modernbert-base", "bpe-nomask-gpt2": "gpt2-medium",
            "spm-bpe-llama": "mobilellm-125m", "unigram-deberta": "deberta-v3-base", "unigram-t5": "t5-v1_1-small"}
MASKING = ["wordpiece", "bpe-mask-roberta", "bpe-mask-modernbert", "unigram-deberta"]
GENERATION = ["bpe-nomask-gpt2", "spm-bpe-llama"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")

    @functools.lru_cache(maxsize=None)
    def get(family: str):
        d = root / family
        build_family(family).save_pretrained(str(d))
        model_cfg = compose_config([f"model={FAMILIES[family]}"]).model
        return load_tokenizer(str(d), model_cfg)  # what a run does with a hub id or a folder

    return get


def _rows():
    t = shared_task("rte").train
    s1, s2 = list(t["sentence1"][:4]), list(t["sentence2"][:4])
    s1[2] = " ".join([s1[2]] * 12)  # one row longer than MAX_LEN: truncated, the prompt must survive
    s2[3] = s2[3].split()[0]         # one short row: padded
    return [s1, s2]


def _batch(tok, cfg, side: str):
    from transformers import DataCollatorWithPadding

    suffix = input_suffix(cfg, tok)
    ids = suffix_token_ids(tok, suffix)
    enc = encode_with_suffix(tok, _rows(), ids, suffix.placement, MAX_LEN)
    tok.padding_side = side
    keys = [k for k in ("input_ids", "attention_mask") if k in enc]
    batch = DataCollatorWithPadding(tok)([{k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"]))])
    return batch["input_ids"], batch["attention_mask"], ids


@pytest.mark.parametrize("family", MASKING)
def test_masking_head_finds_the_mask_left_and_right(tokenizers, family):
    tok = tokenizers(family)
    cfg = compose_config([f"model={FAMILIES[family]}", "head=masking", "task=glue/rte"])
    mask = tok.mask_token_id
    assert mask is not None and tok.pad_token_id is not None and tok.pad_token_id != mask
    pos = {}
    for side in ("right", "left"):
        ids, att, prompt = _batch(tok, cfg, side)
        assert prompt[-1] == mask
        p = mask_positions(ids, att, mask)
        pos[side] = p
        rows = torch.arange(ids.shape[0])
        assert torch.equal(ids[rows, p], torch.full_like(p, mask))
        assert int(att.sum(dim=1).max()) == MAX_LEN       # the long row was truncated to max_length
        last = last_token_positions(att)
        for r in range(ids.shape[0]):
            n = len(prompt)
            assert ids[r, p[r] - n + 1: p[r] + 1].tolist() == prompt          # the whole prompt precedes the mask
            after = ids[r, p[r] + 1: last[r] + 1].tolist()                     # then only the closing special token
            assert len(after) == 1 and after[0] in tok.all_special_ids and after[0] != tok.pad_token_id
    pads = (1 - _batch(tok, cfg, "left")[1]).sum(dim=1)
    assert torch.equal(pos["left"], pos["right"] + pads)


@pytest.mark.parametrize("family", GENERATION)
def test_generation_head_reads_the_last_prompt_token_left_and_right(tokenizers, family):
    tok = tokenizers(family)
    assert tok.pad_token_id == tok.eos_token_id     # no pad token in the family: load_tokenizer pads with EOS
    cfg = compose_config([f"model={FAMILIES[family]}", "head=generation", "task=glue/rte"])
    positions = {}
    for side in ("right", "left"):
        ids, att, prompt = _batch(tok, cfg, side)
        p = last_token_positions(att)
        rows = torch.arange(ids.shape[0])
        for r in range(ids.shape[0]):
            assert ids[r, p[r] - len(prompt) + 1: p[r] + 1].tolist() == prompt
        assert torch.equal(ids[rows, p], torch.full_like(p, prompt[-1]))
        positions[side] = causal_position_ids(att)[att.bool()]
    # the decoder sees the same positions for its real tokens whichever side is padded
    assert torch.equal(positions["left"], positions["right"])


@pytest.mark.parametrize("family", ["bpe-nomask-gpt2", "spm-bpe-llama", "unigram-t5"])
def test_no_mask_token_refuses_head_masking_in_one_line(tokenizers, family):
    tok = tokenizers(family)
    assert tok.mask_token_id is None
    cfg = compose_config([f"model={FAMILIES[family]}", "head=masking"])
    with pytest.raises(ConfigError) as e:
        input_suffix(cfg, tok)
    assert "\n" not in str(e.value) and "head=generation" in str(e.value) and FAMILIES[family] in str(e.value)


def test_t5_family_has_pad_and_eos_for_generation(tokenizers):
    """The chain-of-thought adapter needs both; T5 appends </s> and uses pad (id 0) as decoder start."""
    tok = tokenizers("unigram-t5")
    assert tok.pad_token_id == 0 and tok.eos_token_id is not None
    enc = tok(["predict: " + _rows()[0][0]], truncation=True, max_length=MAX_LEN)["input_ids"][0]
    assert enc[-1] == tok.eos_token_id and tok.pad_token_id not in enc


def test_llama_family_adds_bos_and_wordpiece_adds_cls(tokenizers):
    """The closing-special-token rule above must not mistake a leading BOS/CLS for the end."""
    llama, bert = tokenizers("spm-bpe-llama"), tokenizers("wordpiece")
    assert llama("a b")["input_ids"][0] == llama.bos_token_id
    assert bert("a b")["input_ids"][0] == bert.cls_token_id
