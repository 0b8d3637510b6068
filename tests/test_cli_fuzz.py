"""Hypothesis over command lines that run end to end (``moge route``, ``moge generate``, ``moge info``):
every one exits 0, or 2 with one ``error:`` line; never a traceback."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import train_tokenizer, write_published_checkpoint
from moge.cli import main as cli_main

NUM = ["-1", "0", "1", "2", "3", "8", "nan", "inf", "1e12", "x", "0.5"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = write_published_checkpoint(tmp_path_factory.mktemp("fuzz") / "ck")
    train_tokenizer(d / "tokenizer.json")
    return d


def _run(argv, capsys) -> None:
    try:
        code = cli_main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err[-2000:])
    assert "Traceback" not in err, (argv, err[-2000:])
    if code == 2:
        assert "error:" in err, (argv, err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opts=st.dictionaries(st.sampled_from(["--experts", "--k", "--groups", "--tokens", "--seed"]),
                            st.sampled_from(NUM), max_size=4))
def test_fuzz_route(opts, capsys):
    argv = ["route", "--batches", "2"]
    for k, v in opts.items():
        argv += [k, v]
    _run(argv, capsys)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opts=st.dictionaries(st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"]),
                            st.sampled_from(NUM), max_size=4),
       prompt=st.sampled_from([("--prompt-ids", "1 2 3"), ("--prompt-ids", "96 97"), ("--prompt-ids", "-1"),
                               ("--prompt-ids", "a"), ("--prompt", "hello"), ("--prompt", "")]))
def test_fuzz_generate(ckpt, opts, prompt, capsys):
    argv = ["generate", str(ckpt), *prompt]
    opts.setdefault("--max-new-tokens", "2")
    for k, v in opts.items():
        argv += [k, v]
    _run(argv, capsys)


@pytest.mark.parametrize("spec", ["debug", "nope", "/nonexistent", "{bin}", "{list}", "{bad}"])
def test_info_on_odd_inputs(spec, tmp_path, capsys):
    (tmp_path / "bin.json").write_bytes(b"\x00\xff\xfe")
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text('{"hidden_size": -3}')
    _run(["info", spec.format(bin=tmp_path / "bin.json", list=tmp_path / "list.json", bad=tmp_path / "bad.json")],
         capsys)
