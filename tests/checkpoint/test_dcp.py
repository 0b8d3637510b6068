"""DCP checkpoints in one process: released <-> DCP round trip with relative paths, hostile metadata
refused without running it, a model that does not fit named, and the dry-run memory plan."""

from __future__ import annotations

import pickle

import pytest
import torch

from moge.checkpoint import CheckpointError, load_pretrained, save_model
from moge.checkpoint.convert import convert
from moge.checkpoint.dcp import load_sharded, read_metadata
from moge.checkpoint.io import CheckpointCorruptError
from moge.cli import main as cli_main
from moge.config import get_config
from moge.model import MoGEForCausalLM


def _model(**kw):
    torch.manual_seed(0)
    return MoGEForCausalLM(get_config("debug", **kw))


def test_released_to_dcp_and_back_is_bitwise_with_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_model(_model(), "hf")
    convert("hf", "runs/dcp", to="dcp")
    assert (tmp_path / "runs" / "dcp" / "dcp" / ".metadata").is_file()
    with pytest.raises(CheckpointError, match="moge convert runs/dcp"):
        load_pretrained("runs/dcp")  # a DCP directory is not the released layout: say how to get one
    assert cli_main(["convert", "runs/dcp", "back"]) == 0
    want, got = load_pretrained("hf").state_dict(), load_pretrained("back").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


class _Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_hostile_dcp_metadata_is_refused_without_running_it(tmp_path, capsys):
    save_model(_model(), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "d", to="dcp")
    meta = tmp_path / "d" / "dcp" / ".metadata"
    meta.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(CheckpointCorruptError, match=r"names builtins\.print"):
        read_metadata(meta.parent)
    with pytest.raises(CheckpointCorruptError):
        convert(tmp_path / "d", tmp_path / "out")
    assert "must never run" not in capsys.readouterr().out
    meta.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointCorruptError, match="corrupt or truncated"):
        read_metadata(meta.parent)


def test_dcp_checkpoint_of_another_model_is_named(tmp_path):
    save_model(_model(), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "d", to="dcp")
    other = _model(vocab_size=640).state_dict()
    with pytest.raises(CheckpointCorruptError, match=r"model\.embed_tokens\.weight \(512, 64\) vs \(640, 64\)"):
        load_sharded(tmp_path / "d" / "dcp", {"model": other})
    with pytest.raises(CheckpointCorruptError, match="missing"):
        load_sharded(tmp_path / "d" / "dcp", {"model": {"extra.weight": torch.zeros(2)}})


def test_dry_run_prints_the_72b_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "--preset", "pangu-pro-moe-72b", "--dp-shard", "8", "--ep", "8", "--batch-size", "64",
                     "--seq-len", "4096", "--mixed-precision", "bf16", "--activation-checkpointing", "--dry-run",
                     "--out", "runs/plan"]) == 0
    out = capsys.readouterr().out
    assert "on 64 rank(s) (dp_shard 8 x ep 8)" in out and "| parameters (float32 shards) | 4.50 |" in out
    assert not (tmp_path / "runs").exists()
    assert cli_main(["train", "--preset", "pangu-pro-moe-72b", "--ep", "3", "--batch-size", "6", "--dry-run",
                     "--out", "x"]) == 2
    assert "--ep 3 must divide the model's 8 expert groups" in capsys.readouterr().err
