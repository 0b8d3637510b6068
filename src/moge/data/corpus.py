"""Training text: a built-in three-domain corpus (no download), user files, packing and a resumable sampler.

The built-in corpus comes from the running Python installation, so it exists everywhere the package
runs and builds in about a second:

* ``code``  -- the standard library's ``.py`` sources (sorted paths, ``site-packages``/tests skipped),
* ``prose`` -- the English help text in ``pydoc_data.topics.topics``,
* ``math``  -- synthetic arithmetic and linear-equation lines from a fixed seed, correct by construction.

Every document carries an id; the train/validation split hashes ``domain/id`` so it is deterministic,
disjoint, and independent of which other documents exist. Users may instead pass text files,
directories, JSONL (a ``text`` field) or Parquet (a ``text`` column) files; each path becomes a domain.

Token streams are packed into fixed-length rows (documents joined as ``<bos> text <eos>``), and
:class:`SequenceSampler` hands out rows in a seeded per-epoch permutation whose position is a small
JSON-able state, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import MoGEError


# Extensions read from a user directory (plain text of any kind).
TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".json",
                   ".yaml", ".yml", ".toml", ".html", ".css", ".sh", ".tex", ".csv")
# A user file is cut into documents of about this many characters (on line boundaries) so that even a
# single file gets a validation share.
USER_CHUNK_CHARS = 4096
DEFAULT_VAL_FRACTION = 0.05


class DataError(MoGEError, ValueError):
    """Training data that cannot be read or used; the message names the path or the problem."""


@dataclass(frozen=True)
class Document:
    """One unit of text with a stable id; ``domain`` groups documents for per-domain evaluation."""
    domain: str
    doc_id: str
    text: str


# ---- built-in corpus -------------------------------------------------------------------------------

def _code_documents(max_chars: int, max_file_chars: int = 24_000) -> list[Document]:
    """Standard-library sources in sorted order until ``max_chars``; big files are truncated at a line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "idlelib"}
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        paths.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    # Interleave: take files spread across the sorted list (every k-th) so the capped corpus covers many
    # packages rather than only the alphabetically first ones.
    docs, total = [], 0
    sizes = [(p, p.stat().st_size) for p in paths]
    total_size = sum(min(s, max_file_chars) for _, s in sizes) or 1
    stride = max(1, int(total_size / max(max_chars, 1)))
    for p, _ in sizes[::stride]:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > max_file_chars:
            text = text[: text.rfind("\n", 0, max_file_chars) + 1]
        if not text.strip():
            continue
        docs.append(Document("code", p.relative_to(root).as_posix(), text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


def _prose_documents(max_chars: int) -> list[Document]:
    """The pydoc help topics (English reference text), in sorted key order, until ``max_chars``."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some minimal Python builds strip pydoc_data
        raise DataError(f"the built-in prose domain needs pydoc_data, missing from this Python: {e}") from None
    docs, total = [], 0
    for key in sorted(topics):
        text = topics[key].strip() + "\n"
        docs.append(Document("prose", key, text))
        total += len(text)
        if total >= max_chars:
            break
    return docs


def _math_line(rng: random.Random) -> str:
    """One arithmetic or algebra fact, computed so it is correct by construction."""
    kind = rng.randrange(6)
    a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 12)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"{a} - {b} = {a - b}"
    if kind == 2:
        return f"{a} * {c} = {a * c}"
    if kind == 3:
        return f"{a} + {b} * {c} = {a + b * c}"
    if kind == 4:  # solve m x + q = r with an integer solution
        m, x, q = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
        sign = "+" if q >= 0 else "-"
        return f"solve {m}x {sign} {abs(q)} = {m * x + q}: x = {x}"
    q, r = divmod(a * c + b, c)
    return f"{a * c + b} // {c} = {q} remainder {r}"


def _math_documents(max_chars: int, seed: int = 1234, lines_per_doc: int = 64) -> list[Document]:
    """Synthetic math lines from a fixed seed, ``lines_per_doc`` lines per document."""
    rng = random.Random(seed)
    docs, total, i = [], 0, 0
    while total < max_chars:
        text = "\n".join(_math_line(rng) for _ in range(lines_per_doc)) + "\n"
        docs.append(Document("math", f"math-{i:05d}", text))
        total += len(text)
        i += 1
    return docs


def builtin_corpus(code_chars: int = 900_000, prose_chars: int = 500_000, math_chars: int = 300_000) -> list[Document]:
    """The three-domain built-in corpus (``code``, ``prose``, ``math``), capped per domain in characters.

    Deterministic for a given Python installation: the same call returns the same documents in the
    same order. The caps keep tokenizer training and packing to seconds on a laptop CPU.
    """
    return _code_documents(code_chars) + _prose_documents(prose_chars) + _math_documents(math_chars)


# ---- user data -------------------------------------------------------------------------------------

def _chunk_text(text: str, size: int = USER_CHUNK_CHARS) -> list[str]:
    """Cut text into pieces of about ``size`` characters, at line ends where possible."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        out.append(text[start:end])
        start = end
    return [c for c in out if c.strip()]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{path}:{lineno}: each JSONL record needs a string 'text' field")
            texts.append(rec["text"])
    return texts


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow; install it with `pip install pyarrow` "
                        f"(or `pip install moge[parquet]`)") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(f"{path}: Parquet file has no 'text' column (columns: {table.column_names})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _read_file(path: Path) -> list[str]:
    """A file's records: one per JSONL line / Parquet row, else the whole file as one text."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None


def load_user_documents(paths: Sequence[str | os.PathLike]) -> list[Document]:
    """Documents from user paths: text files, directories (recursively, text extensions), JSONL, Parquet.

    Each path given becomes one domain named after it (its file stem or directory name), so validation
    loss is reported per path. Long texts are cut into ~4 KB documents so every file can contribute to
    both splits. Raises :class:`DataError` for a missing path or one with no usable text.
    """
    docs: list[Document] = []
    used: set[str] = set()
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.exists():
            raise DataError(f"--data path {raw} does not exist")
        domain = root.stem if root.is_file() else (root.resolve().name or "data")
        base, n = domain, 2
        while domain in used:  # two paths with the same name stay separate domains
            domain, n = f"{base}{n}", n + 1
        used.add(domain)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and
                           p.suffix.lower() in (*TEXT_EXTENSIONS, ".jsonl", ".ndjson", ".parquet"))
        else:
            files = [root]
        count = 0
        for f in files:
            rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
            for r, text in enumerate(_read_file(f)):
                for c, chunk in enumerate(_chunk_text(text)):
                    docs.append(Document(domain, f"{rel}#{r}.{c}", chunk))
                    count += 1
        if count == 0:
            raise DataError(f"--data path {raw} holds no usable text (looked for {', '.join(TEXT_EXTENSIONS)}, "
                            f".jsonl, .parquet)")
    return docs


def load_documents(data: Sequence[str] | None) -> list[Document]:
    """The built-in corpus when ``data`` is empty/None, else :func:`load_user_documents`."""
    return load_user_documents(data) if data else builtin_corpus()


# ---- split -----------------------------------------------------------------------------------------

def _unit_hash(domain: str, doc_id: str) -> float:
    digest = hashlib.sha256(f"{domain}/{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: Iterable[Document], val_fraction: float = DEFAULT_VAL_FRACTION
                    ) -> tuple[list[Document], list[Document]]:
    """Deterministic, disjoint train/validation split by a hash of ``domain/doc_id``.

    A domain with at least two documents always gets at least one validation document (its lowest
    hash) and keeps at least one for training, so per-domain validation loss is always defined.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_domain: dict[str, list[tuple[float, Document]]] = {}
    for d in docs:
        by_domain.setdefault(d.domain, []).append((_unit_hash(d.domain, d.doc_id), d))
    train, val = [], []
    for domain, items in by_domain.items():
        ids = [d.doc_id for _, d in items]
        if len(set(ids)) != len(ids):
            raise DataError(f"duplicate document ids in domain {domain!r}")
        is_val = [h < val_fraction for h, _ in items]
        if len(items) >= 2 and val_fraction > 0:
            lowest = min(range(len(items)), key=lambda i: items[i][0])
            highest = max(range(len(items)), key=lambda i: items[i][0])
            is_val[lowest], is_val[highest] = True, False
        for v, (_, d) in zip(is_val, items):
            (val if v else train).append(d)
    return train, val


# ---- packing and sampling --------------------------------------------------------------------------

def pack_documents(docs: Sequence[Document], encode: Callable[[list[str]], list[list[int]]], seq_len: int,
                   bos_id: int, eos_id: int) -> torch.Tensor:
    """Concatenate ``<bos> doc <eos>`` token streams and cut them into rows ``[R, seq_len]`` (int64).

    The tail shorter than ``seq_len`` is dropped. ``encode`` maps a list of texts to their token ids
    (a batch encoder, e.g. :meth:`moge.data.tokenizer.encode_batch`).
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    ids = encode([d.text for d in docs])
    total = sum(len(x) + 2 for x in ids)
    stream = np.empty(total, dtype=np.int64)
    pos = 0
    for x in ids:
        stream[pos] = bos_id
        stream[pos + 1: pos + 1 + len(x)] = x
        stream[pos + 1 + len(x)] = eos_id
        pos += len(x) + 2
    rows = total // seq_len
    return torch.from_numpy(stream[: rows * seq_len].reshape(rows, seq_len).copy())


def shuffled(docs: Sequence[Document], seed: int) -> list[Document]:
    """A seeded permutation of the documents (so packing mixes domains and files)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return [docs[i] for i in order]


class SequenceSampler:
    """Hands out batches of row indices from a seeded per-epoch permutation; resumable exactly.

    The state is ``{"seed", "epoch", "position"}``: the permutation of epoch ``e`` is a function of
    ``(seed, e)`` only, so restoring the state reproduces the remaining batches bit for bit. A batch
    that would run past the end of an epoch continues into the next one.
    """

    def __init__(self, num_rows: int, seed: int = 0):
        if num_rows < 1:
            raise DataError("no training sequences: the corpus is shorter than one --seq-len row; "
                            "use more text or a smaller --seq-len")
        self.num_rows, self.seed, self.epoch, self.position = num_rows, seed, 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g)

    def next_indices(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` row indices (int64)."""
        out = []
        need = batch_size
        while need:
            take = min(need, self.num_rows - self.position)
            out.append(self._perm[self.position: self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_rows"]) != self.num_rows:
            raise DataError(f"the data changed since the checkpoint: {self.num_rows} training rows now, "
                            f"{state['num_rows']} when it was saved (same --data, --seq-len and tokenizer needed)")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


def corpus_summary(docs: Sequence[Document]) -> dict[str, dict[str, int]]:
    """Documents and characters per domain (for logs and the report)."""
    out: dict[str, dict[str, int]] = {}
    for d in docs:
        s = out.setdefault(d.domain, {"documents": 0, "chars": 0})
        s["documents"] += 1
        s["chars"] += len(d.text)
    return out
