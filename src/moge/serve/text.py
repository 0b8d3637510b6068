"""Text in and out of the server: the checkpoint's tokenizer, its chat template, streamed text deltas.

A string prompt is encoded the way ``moge generate`` encodes it: without the tokenizer's special
tokens, then ``<bos>`` put first when the config has one and the prompt lacks it. The chat template is
``tokenizer_config.json``'s ``chat_template`` (what ``moge train`` writes, or a released model's),
rendered in jinja2's sandbox (a checkpoint's template is untrusted input); a checkpoint without one
gets :data:`DEFAULT_CHAT_TEMPLATE`, the template ``moge train`` writes.

:class:`TextStream` turns a growing list of new tokens into text deltas: it holds back a trailing
incomplete UTF-8 character (byte-level BPE can split one over tokens) and any tail that could still
become a stop string, and cuts the text before the first stop string, as OpenAI's API does.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..checkpoint.hf_files import DEFAULT_CHAT_TEMPLATE, TOKENIZER_CONFIG_NAME
from .protocol import ServeError

__all__ = ["DEFAULT_CHAT_TEMPLATE", "ServeTokenizer", "TextStream"]


class ServeTokenizer:
    """A ``tokenizers.Tokenizer`` plus what the server needs from the checkpoint around it."""

    def __init__(self, tokenizer, directory: Path, bos_token_id: int | None, max_model_len: int):
        self.tok, self.bos_token_id, self.max_model_len = tokenizer, bos_token_id, max_model_len
        self.config = _read_tokenizer_config(directory)
        template = self.config.get("chat_template") or DEFAULT_CHAT_TEMPLATE
        if not isinstance(template, str):
            template = DEFAULT_CHAT_TEMPLATE  # a list of named templates: not supported, use ours
        self.chat_template = template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(template)

    def token_str(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def special(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` a leading ``<bos>`` (see the module doc)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """One token's text as a client sees it in logprobs (a lone part of a character shows as U+FFFD)."""
        return self.tok.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.special(self.bos_token_id) or "",
                                         eos_token=self.config.get("eos_token") or "")
        except Exception as e:  # the sandbox refusing something, a template error: the checkpoint's fault
            raise ServeError(400, f"the chat template failed on these messages: {e}") from None

    def info(self) -> dict:
        """``GET /tokenizer_info``."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": self.max_model_len,
                "vocab_size": self.tok.get_vocab_size(), "chat_template": self.chat_template,
                **{k: self.config.get(k) for k in ("bos_token", "eos_token", "pad_token")}}


def _read_tokenizer_config(directory: Path) -> dict:
    path = directory / TOKENIZER_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


class TextStream:
    """Text deltas of one choice as its tokens arrive (see the module docstring).

    Decoding is incremental, so a long answer costs O(n), not O(n^2): each new token is decoded with
    the few tokens before it as context (``ids[prefix:]`` against ``ids[prefix:read]``; context keeps
    decoders that treat a sequence's first token specially, such as SentencePiece's leading space,
    right), and only once the result no longer ends in an incomplete character."""

    def __init__(self, decode, stops: tuple[str, ...] = ()):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[:read] are in self.text; ids[prefix:read] is the context
        self.sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the text that is now safe to send."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the token that completes it
        start = max(len(self.text) - max(map(len, self.stops), default=0), 0)
        self.text += now[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, self.text[:cut]
            return self._take(len(self.text))
        hold = 0
        for s in self.stops:  # a tail that may grow into a stop string waits
            hold = max(hold, next((k for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                                   if self.text.endswith(s[:k])), 0))
        return self._take(len(self.text) - hold)

    def finish(self) -> str:
        """Everything not yet sent (the request is over), an incomplete last character included."""
        if not self.stopped and self.read < len(self.ids):
            before = self.decode(self.ids[self.prefix:self.read])
            self.text += self.decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out
