"""A word-level tokenizer shared by the note encoder and the findings decoder.

Built from the training split only (so validation and test words the model never saw map to
``<unk>``), stored as ``tokenizer.json`` in the dataset root and copied into every export.
Clinical text is short and its vocabulary small; a word vocabulary keeps token attention readable.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

_TOKEN = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case words, numbers and single punctuation marks, in order."""
    return _TOKEN.findall(text.lower())


@dataclass
class Tokenizer:
    """Maps words to ids and back; ids 0-3 are <pad>, <unk>, <bos>, <eos>."""

    vocab: list[str]

    def __post_init__(self) -> None:
        if tuple(self.vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"tokenizer vocab must start with {SPECIALS}, got {self.vocab[:4]}")
        self._index = {word: i for i, word in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: Iterable[str], vocab_size: int = 4000, min_freq: int = 1) -> Tokenizer:
        """Most frequent words of `texts` (ties broken alphabetically, so builds are reproducible)."""
        counts = Counter(word for text in texts for word in split_words(text))
        ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + ranked[: max(0, vocab_size - len(SPECIALS))])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_len: int, bos_eos: bool = False, keep: str = "head") -> list[int]:
        """Token ids, truncated to `max_len` (with <bos>/<eos> counted when `bos_eos`).

        `keep` says which part of a longer text survives: "head" (the start), "tail" (the end: a case
        note's conclusion), or "head_tail" (the first and last halves of the budget).
        """
        ids = [self._index.get(w, UNK_ID) for w in split_words(text)]
        budget = max_len - 2 if bos_eos else max_len
        if len(ids) > budget:
            if keep == "tail":
                ids = ids[len(ids) - budget :]
            elif keep == "head_tail":
                ids = ids[: budget - budget // 2] + ids[len(ids) - budget // 2 :]
            else:
                ids = ids[:budget]
        return [BOS_ID, *ids, EOS_ID] if bos_eos else ids

    def encode_batch(self, texts: Iterable[str], max_len: int, bos_eos: bool = False, keep: str = "head") -> np.ndarray:
        """A (B, max_len) int64 array, right-padded with <pad>."""
        texts = list(texts)
        out = np.full((len(texts), max_len), PAD_ID, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text or "", max_len, bos_eos, keep)
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <eos>, specials dropped, joined by spaces (punctuation attached)."""
        words: list[str] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID) or not 0 <= i < len(self.vocab):
                continue
            word = self.vocab[i]
            if words and not word[0].isalnum():
                words[-1] += word
            else:
                words.append(word)
        return " ".join(words)

    def to_json(self) -> str:
        return json.dumps({"type": "word", "lowercase": True, "vocab": self.vocab})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        try:
            data = json.loads(text)
            vocab = data["vocab"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"tokenizer.json: not a medfusion word tokenizer ({err})") from None
        return cls(list(vocab))
