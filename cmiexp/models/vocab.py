"""Deterministic subword vocabularies for the offline tiny models.

The tokenizers library's trainers (``WordPieceTrainer``, ``BpeTrainer``, ``UnigramTrainer``)
break ties through Rust hash maps seeded per process, so the same text gives a different
vocabulary, or the same tokens under different ids, from one build to the next. A tiny model's
tokenizer is part of what a run computes, so that made one config's accuracy drift between
machines and runs. The builders here are pure functions of the text:

* :func:`learn_bpe` is the classic word-level byte-pair-encoding merge learner (Sennrich et al.
  2016, the algorithm the tokenizers trainers implement), with ties broken by the pair itself.
* :func:`wordpiece_vocab`, :func:`bytelevel_bpe` and :func:`unigram_vocab` run it on the words
  each family's own pre-tokenizer produces and lay the result out the way that family's
  transformers tokenizer class reads it.

The pre-tokenizers and normalizers still come from the tokenizers library (they are
deterministic); only the training is done here.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from typing import Iterable

Pair = tuple[str, str]


def merged_piece(a: str, b: str, continuing_prefix: str = "") -> str:
    """The piece a merge of ``a`` and ``b`` makes: ``b`` loses its continuation prefix ("##")."""
    p = continuing_prefix
    return a + b[len(p):] if p and b.startswith(p) else a + b


def learn_bpe(word_counts: dict[str, int], alphabet: Iterable[str], budget: int,
              continuing_prefix: str = "", known: Iterable[str] = ()) -> tuple[list[Pair], list[int]]:
    """Merges learnt from ``word_counts`` until ``budget`` new pieces exist, with each pair's count.

    A word starts as its characters; with ``continuing_prefix`` (WordPiece's ``"##"``) every
    character after the first carries the prefix. Each step merges the most frequent adjacent
    pair over all words (weighted by word count); ties go to the smallest pair in string order,
    which is what makes the result a function of the text alone. Characters outside
    ``alphabet`` are kept as single symbols but never merged into anything. A merge whose
    result is already in ``known`` or was made before ("ab"+"##c" after "a"+"##bc") is kept as
    a rule but does not count against ``budget``.
    """
    allowed = set(alphabet)
    prefix = continuing_prefix

    def initial(word: str) -> list[str]:
        return [c if i == 0 else prefix + c for i, c in enumerate(word)]

    def mergeable(sym: str) -> bool:
        return all(c in allowed for c in (sym[len(prefix):] if prefix and sym.startswith(prefix) else sym))

    words = sorted(word_counts)
    freqs = [int(word_counts[w]) for w in words]
    symbols = [initial(w) for w in words]
    counts: defaultdict[Pair, int] = defaultdict(int)
    where: defaultdict[Pair, set[int]] = defaultdict(set)
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            if mergeable(pair[0]) and mergeable(pair[1]):
                counts[pair] += freqs[i]
                where[pair].add(i)
    # A max-heap on (count, then smallest pair) with lazy deletion: an entry is live only
    # while its count still equals the pair's current count.
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)

    def pair_counts(syms: list[str]) -> Counter[Pair]:
        return Counter(p for p in zip(syms, syms[1:]) if mergeable(p[0]) and mergeable(p[1]))

    merges: list[Pair] = []
    merge_counts: list[int] = []
    pieces = set(known)
    made = 0
    while heap and made < budget:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg or -neg <= 0:
            continue
        a, b = pair
        new = merged_piece(a, b, prefix)
        merges.append(pair)
        merge_counts.append(-neg)
        if new not in pieces:
            pieces.add(new)
            made += 1
        changed: set[Pair] = set()
        for i in sorted(where.pop(pair)):
            syms = symbols[i]
            before = pair_counts(syms)
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            symbols[i] = out
            after = pair_counts(out)
            for p in before.keys() | after.keys():
                delta = (after[p] - before[p]) * freqs[i]
                if delta:
                    counts[p] += delta
                    changed.add(p)
                if after[p]:
                    where[p].add(i)
        counts.pop(pair, None)
        for p in changed:
            if p != pair and counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
    return merges, merge_counts


def _words(texts: Iterable[str], pre_tokenize, normalize=None) -> Counter[str]:
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenize(normalize(text) if normalize else text))
    return words


def wordpiece_vocab(texts: Iterable[str], vocab_size: int, specials: list[str]) -> list[str]:
    """A BERT WordPiece vocabulary (list index = id) learnt deterministically from ``texts``.

    BERT's own normalizer (lower-casing) and pre-tokenizer split the text into words; the
    vocabulary is ``specials`` (ids 0..), every character both as a word start and as a ``##``
    continuation (so no word of the text falls back to ``[UNK]``), then the merged pieces in
    merge order, as the tokenizers library's WordPiece trainer lays them out.
    """
    from tokenizers import normalizers, pre_tokenizers

    words = _words(texts, pre_tokenizers.BertPreTokenizer().pre_tokenize_str,
                   normalizers.BertNormalizer(lowercase=True).normalize_str)
    chars = sorted({c for w in words for c in w})
    vocab = list(specials) + [c for c in chars if c not in specials]
    vocab += [f"##{c}" for c in chars if f"##{c}" not in vocab]
    return _extend(vocab, words, chars, vocab_size, "##")[0]


def bytelevel_bpe(texts: Iterable[str], vocab_size: int, specials: list[str]) -> tuple[dict[str, int], list[Pair]]:
    """A GPT-2/RoBERTa byte-level BPE (vocab, merges) learnt deterministically from ``texts``.

    Ids: ``specials``, then the 256 byte symbols in sorted order, then each merge's result.
    """
    from tokenizers import pre_tokenizers

    words = _words(texts, pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges, _ = _extend(list(specials) + alphabet, words, alphabet, vocab_size, "")
    return {tok: i for i, tok in enumerate(vocab)}, merges


def unigram_vocab(texts: Iterable[str], vocab_size: int, specials: list[str]) -> list[tuple[str, float]]:
    """A T5 (SentencePiece Unigram) vocabulary of (piece, log-probability) learnt deterministically.

    The pieces are the characters and the BPE merges of the Metaspace-split words
    (``▁word``); each piece's score is the log of its relative frequency (a character's count
    in the text, a merged piece's count when it was merged), so Viterbi segmentation prefers
    long, frequent pieces and spells anything else out in characters. ``specials`` score 0.
    """
    from tokenizers import pre_tokenizers

    words = _words(texts, pre_tokenizers.Metaspace().pre_tokenize_str)
    char_counts: Counter[str] = Counter()
    for w, n in words.items():
        for c in w:
            char_counts[c] += n
    chars = sorted(char_counts)
    base = list(specials) + [c for c in chars if c not in specials]
    vocab, _, piece_counts = _extend(base, words, chars, vocab_size, "")
    piece_counts.update(char_counts)
    total = sum(piece_counts.values())
    return [(p, 0.0) if p in specials else (p, math.log(piece_counts[p] / total)) for p in vocab]


def _extend(vocab: list[str], words: Counter[str], alphabet: list[str], vocab_size: int,
            prefix: str) -> tuple[list[str], list[Pair], Counter[str]]:
    """``vocab`` grown with merged pieces (in merge order, each once) up to ``vocab_size``."""
    vocab = list(vocab)
    taken = set(vocab)
    counts: Counter[str] = Counter()
    merges, merge_counts = learn_bpe(words, alphabet, max(vocab_size - len(vocab), 0), prefix, known=taken)
    for (a, b), n in zip(merges, merge_counts):
        piece = merged_piece(a, b, prefix)
        if piece not in taken:
            vocab.append(piece)
            taken.add(piece)
            counts[piece] = n
    return vocab, merges, counts


__all__ = ["bytelevel_bpe", "learn_bpe", "merged_piece", "unigram_vocab", "wordpiece_vocab"]
