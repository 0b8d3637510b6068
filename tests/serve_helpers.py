"""A tiny checkpoint with its tokenizer and chat template, and ``moge serve``'s app under uvicorn on a
thread of the test process (so a test can reach its engine), on a free loopback port."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

from helpers import TINY_CONFIG, train_tokenizer, write_published_checkpoint
from moge.checkpoint import read_config, write_tokenizer_config
from moge.cli import build_parser
from moge.cli.serve import build

MODEL = "tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny published-layout checkpoint with tokenizer.json and tokenizer_config.json (chat template)."""
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("serve") / "tiny"
    d.mkdir()
    tok = train_tokenizer(d / "tokenizer.json")
    write_published_checkpoint(d, {**TINY_CONFIG, "vocab_size": Tokenizer.from_file(str(tok)).get_vocab_size()})
    write_tokenizer_config(d, read_config(d))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``moge serve``'s app under uvicorn on a thread of this process (the test can reach its engine)."""

    def __init__(self, ckpt, *extra: str):
        self.port = free_port()
        args = build_parser("serve").parse_args(["serve", str(ckpt), "--port", str(self.port),
                                                 "--served-model-name", MODEL, *extra])
        self.app, self.engine = build(args)
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """One request with the standard library (bytes exactly as given); ``(status, parsed JSON or text)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode("utf-8", "replace")


