from __future__ import annotations

import pytest

from medfusion.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer


def test_build_is_deterministic_and_frequency_ranked():
    texts = ["b a a", "c b a"]
    tok = Tokenizer.build(texts)
    assert tok.vocab[4:] == ["a", "b", "c"]
    assert Tokenizer.build(list(reversed(texts))).vocab == tok.vocab


@pytest.mark.parametrize(
    "text, max_len, bos_eos, expected",
    [
        ("a b", 5, False, [4, 5]),
        ("a b zzz", 5, False, [4, 5, UNK_ID]),
        ("a b a b", 2, False, [4, 5]),
        ("a b", 5, True, [BOS_ID, 4, 5, EOS_ID]),
        ("a b a b", 4, True, [BOS_ID, 4, 5, EOS_ID]),
        ("", 3, False, []),
    ],
)
def test_encode(text, max_len, bos_eos, expected):
    tok = Tokenizer.build(["a a b"])
    assert tok.encode(text, max_len, bos_eos) == expected


def test_batch_padding_and_round_trip():
    tok = Tokenizer.build(["the lungs are clear."])
    batch = tok.encode_batch(["the lungs are clear.", ""], 8, bos_eos=True)
    assert batch.shape == (2, 8) and batch[1, 2] == PAD_ID
    assert tok.decode(batch[0]) == "the lungs are clear."
    assert Tokenizer.from_json(tok.to_json()).vocab == tok.vocab


def test_bad_tokenizer_json_is_reported():
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_json("{}")
