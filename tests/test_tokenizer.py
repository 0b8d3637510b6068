"""The byte-level BPE tokenizer: special ids, exact round trips, save/load and errors."""

import pytest

from moge.data.tokenizer import TokenizerError, decode, encode_batch, load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.", "12 + 7 * 3 = 33"] * 30


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_special_ids_and_vocab(tok):
    assert [tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    assert 259 <= tok.get_vocab_size() <= 300


@pytest.mark.parametrize("text", ["def f(x):\n    return x + 1\n", "  leading and trailing  ", "tabs\tand\r\nCRLF",
                                  "unicode: héllo wörld, 日本語, emoji 🙂", "", "\x00\x7f control"])
def test_round_trip_is_exact(tok, text):
    ids = encode_batch(tok, [text])[0]
    assert all(i >= 3 for i in ids)  # no special or unknown tokens from plain text
    assert decode(tok, ids) == text


def test_save_load_and_bad_files(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path)
    assert path.name == "tokenizer.json"
    again = load_tokenizer(tmp_path)
    assert encode_batch(again, TEXTS[:3]) == encode_batch(tok, TEXTS[:3])
    bad = tmp_path / "broken.json"
    bad.write_text(path.read_text()[:100])
    with pytest.raises(TokenizerError, match="broken.json"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(TEXTS, vocab_size=100)
