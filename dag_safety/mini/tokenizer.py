"""A word-level `CLIPTokenizer` over the shapes world's vocabulary, built in memory (nothing is downloaded)."""

from __future__ import annotations

from itertools import pairwise

from transformers import CLIPTokenizer

from .world import vocabulary

__all__ = ["MAX_LENGTH", "build_tokenizer", "build_vocab_and_merges"]

#: `tokenizer.model_max_length` and the text encoder's `max_position_embeddings` (captions need at most 20).
MAX_LENGTH = 24

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"


def _word_pieces(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging of `pieces` with merge priorities `ranks` (lowest rank first), as the BPE model does."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(pairwise(pieces))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-BPE vocabulary and merges in which each word of `words` is exactly one token.

    Every word gets its chain of left-to-right merges (`r e` → `re`, `re d</w>` → `red</w>`), so the BPE model
    collapses it to one token; single characters (with and without `</w>`) stay in the vocabulary so unknown words
    still tokenize (character by character) instead of being dropped.

    Returns:
        `tuple[dict[str, int], list[tuple[str, str]]]`: `vocab` (token → id) and `merges` (ordered pairs).
    """
    words = vocabulary() if words is None else list(words)
    tokens: list[str] = []
    seen: set[str] = set()

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)

    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.":
        add(c)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.":
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Run BPE with the merges so far, then chain whatever pieces remain. Appended merges rank after all
        # earlier ones, so they never change how an earlier word is merged.
        pieces = _bpe(_word_pieces(word), ranks)
        current = pieces[0]
        for nxt in pieces[1:]:
            pair = (current, nxt)
            current = current + nxt
            ranks[pair] = len(merges)
            merges.append(pair)
            add(current)
        add(current)
    add(_BOS)
    add(_EOS)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """The mini model's tokenizer: one token per world word, `<|startoftext|>` / `<|endoftext|>` (also padding)."""
    vocab, merges = build_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)
