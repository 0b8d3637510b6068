"""The small files transformers' tools read beside the weights: ``generation_config.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``.

The generation config names the model's bos/eos/pad ids (plus whatever a transformers model's own
``generation_config`` holds). The tokenizer files name the special tokens of the directory's
``tokenizer.json`` by their strings (looked up from the config's ids), left padding (what batched
generation with a decoder-only model needs) and the context length, so ``AutoTokenizer`` and
``pipeline(..., batch_size=2)`` work; ``chat_template`` is :data:`DEFAULT_CHAT_TEMPLATE`. Whether a prompt starts with ``<bos>`` is ``tokenizer.json``'s
post-processor's business (transformers reads it there, not from ``add_bos_token``; see
:func:`moge.data.tokenizer.with_bos`). All files are written atomically.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import MoGEConfig
from .io import CheckpointError, atomic_write, read_json, write_json
from .reading import TOKENIZER_NAME


GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
_ROLES = (("pad", "pad_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id"))
# A plain-text chat format for models moge trains (no chat special tokens exist in their vocabulary):
# "<bos>role: content" lines, the answer after "assistant:". `moge serve` renders it for
# /v1/chat/completions, as does transformers' apply_chat_template.
DEFAULT_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def write_generation_config(directory: str | Path, config: MoGEConfig, extra: Mapping[str, Any] | None = None) -> None:
    """``generation_config.json``: the config's bos/eos/pad ids, updated with ``extra``."""
    d: dict[str, Any] = {key: getattr(config, key) for _, key in _ROLES if getattr(config, key) is not None}
    d.update(extra or {})
    write_json(Path(directory) / GENERATION_CONFIG_NAME, d)


def _token_strings(tokenizer_json: Path) -> dict[int, str]:
    """id -> string of a ``tokenizer.json``'s added tokens and vocabulary (what is there of them)."""
    d = read_json(tokenizer_json, "tokenizer file")
    if not isinstance(d, dict):
        raise CheckpointError(f"{tokenizer_json} is not a tokenizer file (not a JSON object)")
    vocab = (d.get("model") or {}).get("vocab") if isinstance(d.get("model"), dict) else None
    out = {i: t for t, i in vocab.items() if isinstance(i, int)} if isinstance(vocab, dict) else {}
    for tok in d.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("id"), int) and isinstance(tok.get("content"), str):
            out[tok["id"]] = tok["content"]
    return out


def write_tokenizer_config(directory: str | Path, config: MoGEConfig) -> None:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for the ``tokenizer.json`` in ``directory``.

    Raises :class:`CheckpointError` when a special id of ``config`` is not a token of that tokenizer.
    """
    directory = Path(directory)
    strings = _token_strings(directory / "tokenizer.json")
    special: dict[str, str] = {}
    for role, key in _ROLES:
        ids = getattr(config, key)
        i = ids[0] if isinstance(ids, list) and ids else ids
        if i is None:
            continue
        if i not in strings:
            raise CheckpointError(f"{directory / 'tokenizer.json'} has no token with id {i} ({key} of the config)")
        special[f"{role}_token"] = strings[i]
    write_json(directory / SPECIAL_TOKENS_MAP_NAME, special)
    write_json(directory / TOKENIZER_CONFIG_NAME, {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "padding_side": "left",
        "model_max_length": config.max_position_embeddings, "clean_up_tokenization_spaces": False,
        "chat_template": DEFAULT_CHAT_TEMPLATE})


# moge's quantization notes beside a quantized checkpoint (W8A8 or weight-only).
QUANT_NOTES_NAME = "moge_quantization.json"


def write_quant_notes(directory: Path, metadata: Mapping[str, Any] | None) -> None:
    """Write ``metadata`` as the quantization notes, or remove notes an earlier save left there."""
    if metadata is not None:
        write_json(directory / QUANT_NOTES_NAME, dict(metadata))
    elif (directory / QUANT_NOTES_NAME).exists():
        (directory / QUANT_NOTES_NAME).unlink()


def write_companions(directory: Path, config: MoGEConfig, tokenizer_file: str | Path | None = None,
                     generation_extra: Mapping[str, Any] | None = None) -> None:
    """The files every checkpoint layout writes beside its weights: ``generation_config.json`` and, with
    a tokenizer file, ``tokenizer.json`` (copied atomically unless it already is that file) and
    ``tokenizer_config.json``."""
    write_generation_config(directory, config, generation_extra)
    if tokenizer_file is not None:
        src, dst = Path(tokenizer_file), directory / TOKENIZER_NAME
        if src.resolve() != dst.resolve():
            atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        write_tokenizer_config(directory, config)
