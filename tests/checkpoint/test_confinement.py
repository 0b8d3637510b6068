"""Paths read from a checkpoint stay inside it: shard names in an index, manifest entries in a training
state. A crafted checkpoint can make moge neither read nor hash nor delete a file outside it."""

import json
import os

import pytest
from safetensors.torch import save_file

from helpers import TINY_CONFIG, published_tensors, write_published_checkpoint
from moge.checkpoint import CheckpointError, confined, load_pretrained
from moge.checkpoint.training_state import STATE_FILE, commit_checkpoint, read_manifest, verify_checkpoint, verify_files


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.safetensors", "a/../../outside.safetensors", "", "~x"])
def test_confined_refuses_names_that_leave(tmp_path, name):
    with pytest.raises(CheckpointError, match="checkpoint"):
        confined(tmp_path, name)


def test_confined_refuses_links_that_leave_and_allows_subdirectories(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"x")
    inside = tmp_path / "ckpt"
    (inside / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "out.bin", inside / "link.bin")
    with pytest.raises(CheckpointError, match="leads outside"):
        confined(inside, "link.bin")
    assert confined(inside, "sub/shard.safetensors") == inside / "sub" / "shard.safetensors"


def test_index_pointing_outside_the_directory_is_refused(tmp_path):
    tensors = published_tensors(TINY_CONFIG)
    outside = tmp_path / "elsewhere.safetensors"
    save_file(tensors, str(outside))
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    for target in (str(outside), "../elsewhere.safetensors"):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in tensors}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            load_pretrained(d)


def _fake_training_dir(tmp_path, victim):
    out = write_published_checkpoint(tmp_path / "run")
    state = {"version": 1, "step": 1, "files": {
        str(victim): {"bytes": victim.stat().st_size, "sha256": "0" * 64},
        "../victim.txt": {"bytes": victim.stat().st_size, "sha256": "0" * 64}}}
    (out / STATE_FILE).write_text(json.dumps(state))
    return out


def test_manifest_entries_outside_are_neither_read_nor_deleted(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = _fake_training_dir(tmp_path, victim)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        verify_checkpoint(out)
    # The next commit into that directory removes the previous checkpoint's files: never these.
    commit_checkpoint(out, lambda staging: (staging / "weights.bin").write_bytes(b"new"), {"step": 2})
    assert victim.read_text() == "keep me"
    assert read_manifest(out)[1]["step"] == 2 and verify_files(out, ["weights.bin"])
