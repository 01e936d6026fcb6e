"""A CLIP BPE tokenizer built locally for the toy vocabulary.

The base alphabet is CLIP's 256 byte-level symbols (plus their end-of-word forms), so any
text tokenizes; merges then spell every caption word as a single token.
"""

from __future__ import annotations

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the best-ranked adjacent pair."""
    while len(pieces) > 1:
        best = min(range(len(pieces) - 1), key=lambda i: ranks.get((pieces[i], pieces[i + 1]), 1 << 30))
        if (pieces[best], pieces[best + 1]) not in ranks:
            break
        pieces = [*pieces[:best], pieces[best] + pieces[best + 1], *pieces[best + 2:]]
    return pieces


def build_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    """CLIPTokenizer whose vocabulary holds the byte alphabet and one token per word in ``words``.

    Merges for a word are appended after what the earlier words' merges already make of
    it; appended merges rank last, so they never change an earlier word's encoding.
    """
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    merges = sorted(ranks, key=ranks.__getitem__)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
