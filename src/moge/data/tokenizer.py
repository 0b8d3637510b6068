"""Byte-level BPE tokenizer trained with Hugging Face ``tokenizers``; saved as ``tokenizer.json``.

Special tokens take the ids the model config expects: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2.
Byte-level pre-tokenization (no added prefix space) makes ``decode(encode(text)) == text`` for any
UTF-8 string, so a checkpoint's ``tokenizer.json`` can be loaded by ``tokenizers.Tokenizer.from_file``
in ``moge generate`` or any other tool. Training packs documents as ``<bos> text <eos>``; the saved
tokenizer's post-processor prepends ``<bos>`` when special tokens are added (the default of
``encode`` and of transformers' tokenizers), so a prompt encoded by any tool starts as training
rows do. moge's own packing encodes without special tokens (:func:`encode_batch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..errors import MoGEError


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


class TokenizerError(MoGEError, ValueError):
    """A tokenizer that cannot be trained or loaded; the message names the file or setting."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE of ``vocab_size`` tokens (including the 3 specials) on ``texts``.

    Returns a ``tokenizers.Tokenizer``. All 256 byte symbols are in the initial alphabet, so any text
    encodes without unknown tokens even if the training text never contained some byte. The result
    may be smaller than ``vocab_size`` when the text has too few distinct pairs to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < _MIN_VOCAB:
        raise TokenizerError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                             f"(needs at least {_MIN_VOCAB}: 256 bytes + 3 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    check_special_ids(tok)
    return with_bos(tok)


def with_bos(tok):
    """``tok`` with a post-processor that prepends ``<bos>`` (to each sequence of a pair) when special
    tokens are added; a tokenizer that already has a post-processor is returned unchanged."""
    from tokenizers import processors

    if tok.post_processor is None:
        bos = SPECIAL_TOKENS[BOS_ID]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                           special_tokens=[(bos, BOS_ID)])
    return tok


def check_special_ids(tok, source: str = "tokenizer") -> None:
    """Raise :class:`TokenizerError` unless ``<pad>``, ``<bos>``, ``<eos>`` have ids 0, 1, 2."""
    for i, name in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(name)
        if got != i:
            raise TokenizerError(f"{source}: special token {name} has id {got}, expected {i} "
                                 f"(pad=0, bos=1, eos=2 as in the model config)")


def load_tokenizer(path: str | Path):
    """Load ``tokenizer.json`` (or a directory holding one); errors name the file."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"no tokenizer file at {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{path} is not a valid tokenizer file ({e})") from None
    check_special_ids(tok, str(path))
    return tok


def save_tokenizer(tok, path: str | Path) -> Path:
    """Write the tokenizer as JSON to ``path`` (a file path, or a directory to hold ``tokenizer.json``),
    with the ``<bos>`` post-processor of :func:`with_bos` (added to a copy when ``tok`` has none)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if tok.post_processor is None:
        tok = with_bos(Tokenizer.from_str(tok.to_str()))
    tok.save(str(path))
    return path


def encode_batch(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the packer adds ``<bos>``/``<eos>``)."""
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def decode(tok, ids) -> str:
    """Text of ``ids`` with special tokens dropped."""
    return tok.decode(list(map(int, ids)), skip_special_tokens=True)
