"""The built-in corpus, user data loading, the split, packing and the resumable sampler."""

import json
import sys

import pytest
import torch

from moge.data.corpus import (DataError, Document, SequenceSampler, builtin_corpus, load_user_documents,
    pack_documents, split_documents)


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus(code_chars=60_000, prose_chars=40_000, math_chars=20_000)


def test_builtin_corpus_is_deterministic_and_has_three_domains(corpus):
    again = builtin_corpus(code_chars=60_000, prose_chars=40_000, math_chars=20_000)
    assert corpus == again
    assert {d.domain for d in corpus} == {"code", "prose", "math"}
    assert all(d.text.strip() for d in corpus)


def test_math_lines_are_correct(corpus):
    checked = 0
    for d in corpus:
        if d.domain != "math":
            continue
        for line in d.text.splitlines():
            if line.startswith("solve"):
                eq, x = line[len("solve "):].split(": x = ")
                lhs, rhs = eq.split(" = ")
                m, rest = lhs.split("x ")
                sign, q = rest.split(" ")
                val = int(m) * int(x) + (int(q) if sign == "+" else -int(q))
                assert val == int(rhs), line
            elif "remainder" in line:
                lhs, rhs = line.split(" = ")
                a, c = (int(t) for t in lhs.split(" // "))
                q, r = rhs.split(" remainder ")
                assert divmod(a, c) == (int(q), int(r)), line
            else:
                lhs, rhs = line.split(" = ")
                assert eval(lhs) == int(rhs), line  # only digits and + - * from our generator
            checked += 1
    assert checked > 100


def test_split_is_deterministic_disjoint_and_covers_every_domain(corpus):
    train, val = split_documents(corpus, 0.1)
    train2, val2 = split_documents(list(reversed(corpus)), 0.1)
    key = lambda ds: sorted((d.domain, d.doc_id) for d in ds)
    assert key(train) == key(train2) and key(val) == key(val2)
    assert not set(key(train)) & set(key(val))
    assert len(train) + len(val) == len(corpus)
    assert {d.domain for d in val} == {d.domain for d in train} == {"code", "prose", "math"}
    # a document's side depends on its own id only: dropping other documents moves nothing (except the
    # per-domain guarantee of one validation document, which may pick a new lowest-hash document)
    math = [d for d in corpus if d.domain == "math"]
    sub_train, _ = split_documents(math[len(math) // 2:], 0.1)
    assert {d.doc_id for d in sub_train} <= {d.doc_id for d in train}


def test_user_txt_dir_and_jsonl(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("first file\n" * 800)
    (tmp_path / "notes" / "b.md").write_text("# second\n" * 10)
    (tmp_path / "notes" / "skip.bin").write_bytes(b"\x00\x01")
    with (tmp_path / "recs.jsonl").open("w") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"record {i} text"}) + "\n")
    docs = load_user_documents([tmp_path / "notes", tmp_path / "recs.jsonl"])
    assert {d.domain for d in docs} == {"notes", "recs"}
    assert sum(d.domain == "recs" for d in docs) == 5
    notes = "".join(d.text for d in docs if d.domain == "notes" and d.doc_id.startswith("a.txt"))
    assert notes == "first file\n" * 800  # chunking loses nothing
    train, val = split_documents(docs, 0.05)
    assert {d.domain for d in val} == {"notes", "recs"}


def test_user_data_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_user_documents([tmp_path / "nope"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_user_documents([bad])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable text"):
        load_user_documents([tmp_path / "empty"])


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    # pyarrow may be installed (the test environment has it through lm_eval's datasets): hide it, as a
    # user without the parquet extra has it (None in sys.modules makes the import fail)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pyarrow"):
        load_user_documents([p])


def test_pack_documents_rows_and_markers():
    docs = [Document("d", str(i), "x" * (i + 1)) for i in range(10)]
    rows = pack_documents(docs, lambda texts: [[5] * len(t) for t in texts], 8, 1, 2)
    total = sum(len(d.text) + 2 for d in docs)
    assert rows.shape == (total // 8, 8) and rows.dtype == torch.int64
    flat = rows.flatten().tolist()
    assert flat[:4] == [1, 5, 2, 1]  # <bos> x <eos> <bos> ...


def test_sampler_resumes_exactly_and_covers_each_epoch():
    s = SequenceSampler(10, seed=3)
    first = torch.cat([s.next_indices(4) for _ in range(3)])  # crosses an epoch boundary
    assert sorted(first[:10].tolist()) == list(range(10))
    state = s.state_dict()
    rest = [s.next_indices(3) for _ in range(5)]
    s2 = SequenceSampler(10, seed=3)
    s2.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a, s2.next_indices(3)) for a in rest)
    with pytest.raises(DataError, match="data changed"):
        SequenceSampler(11, seed=3).load_state_dict(state)
