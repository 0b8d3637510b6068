"""Checkpoints are verified on load: a directory with a manifest is checked against it (SHA-256) in
every loader, NaN/inf and non-float tensors are refused by name, ``verify=False`` / ``--no-verify``
skip it; and the remaining paths read from a checkpoint (fixed names, commit/staging directories,
tokenizer files) stay confined."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import write_published_checkpoint
from moge.checkpoint import CheckpointCorruptError, CheckpointError, load_pretrained
from moge.checkpoint.convert import convert
from moge.checkpoint.io import CheckpointWriteError
from moge.checkpoint.training_state import STATE_FILE, commit_checkpoint, recover_checkpoint_dir, verify_files
from moge.cli import main as cli_main


def flip(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def with_manifest(tmp_path):
    """A released-layout checkpoint committed with a training manifest (as ``moge train`` writes it)."""
    src = write_published_checkpoint(tmp_path / "src")
    out = tmp_path / "ck"
    out.mkdir()

    def write(staging):
        for name in ("config.json", "model.safetensors"):
            (staging / name).write_bytes((src / name).read_bytes())
    commit_checkpoint(out, write, {"step": 1})
    return out


def test_flipped_byte_is_refused_by_every_loader_and_skipped_on_request(with_manifest, capsys):
    load_pretrained(with_manifest)  # intact: loads
    flip(with_manifest / "model.safetensors")
    with pytest.raises(CheckpointCorruptError, match=r"model.safetensors is corrupt: its SHA-256"):
        load_pretrained(with_manifest)
    assert cli_main(["generate", str(with_manifest), "--prompt-ids", "1 2", "--max-new-tokens", "1"]) == 2
    assert "SHA-256" in capsys.readouterr().err
    import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
    from transformers import AutoModelForCausalLM
    with pytest.raises(CheckpointCorruptError, match="SHA-256"):
        AutoModelForCausalLM.from_pretrained(with_manifest)
    load_pretrained(with_manifest, verify=False)  # the flipped bit is inside a float: loads unchecked
    AutoModelForCausalLM.from_pretrained(with_manifest, verify=False)
    assert cli_main(["generate", str(with_manifest), "--prompt-ids", "1 2", "--max-new-tokens", "1",
                     "--no-verify"]) == 0


def test_a_file_the_manifest_does_not_list_is_refused(with_manifest):
    state = json.loads((with_manifest / STATE_FILE).read_text())
    del state["files"]["model.safetensors"]
    (with_manifest / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointCorruptError, match="not listed in the manifest"):
        load_pretrained(with_manifest)
    assert verify_files(with_manifest, ["config.json"])


def _rewrite(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))


def test_non_finite_weight_is_refused_naming_the_tensor(tmp_path):
    d = write_published_checkpoint(tmp_path / "nan")
    _rewrite(d, lambda t: t["model.layers.1.mlp.experts.3.up_proj.weight"].view(-1).__setitem__(0, float("inf")))
    with pytest.raises(CheckpointCorruptError, match=r"model.layers.1.mlp.experts.3.up_proj.weight .* 1 non-finite"):
        load_pretrained(d)
    assert not torch.isfinite(load_pretrained(d, verify=False).model.layers[1].mlp.experts.gate_up_proj).all()


def test_integer_tensor_is_refused_naming_it(tmp_path):
    d = write_published_checkpoint(tmp_path / "int")
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(torch.int32)))
    with pytest.raises(CheckpointError, match=r"not floating point.*model.norm.weight \(I32\)"):
        load_pretrained(d)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_fixed_names_that_are_links_out_are_refused(tmp_path, name):
    d = write_published_checkpoint(tmp_path / "ck")
    outside = tmp_path / f"outside-{name}"
    os.replace(d / name, outside)
    os.symlink(outside, d / name)
    with pytest.raises(CheckpointError, match="leads outside the checkpoint"):
        load_pretrained(d)


@pytest.mark.parametrize("which", [".ckpt-commit", ".ckpt-staging"])
def test_linked_commit_or_staging_directory_is_refused_and_nothing_outside_moves(tmp_path, which):
    out = tmp_path / "run"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    os.symlink(elsewhere, out / which)
    with pytest.raises(CheckpointError, match="symbolic link"):
        recover_checkpoint_dir(out)
    assert (elsewhere / "precious.txt").read_text() == "keep me" and not (out / "precious.txt").exists()


def test_convert_copies_only_real_tokenizer_files(tmp_path):
    src = write_published_checkpoint(tmp_path / "src")
    for bad in (tmp_path / "x.bin", tmp_path / "x.json"):
        bad.write_bytes(b"\x00\xffnot a tokenizer" if bad.suffix == ".bin" else b'{"hello": 1}')
        with pytest.raises(CheckpointError, match="is not a tokenizer file"):
            convert(src, tmp_path / "dst", tokenizer_file=bad)
        assert not (tmp_path / "dst").exists()  # refused before anything was written


def test_a_failed_checkpoint_write_is_named_and_leaves_the_previous_one(with_manifest, monkeypatch):
    import errno

    def full(staging):
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "model.safetensors"))
    with pytest.raises(CheckpointWriteError, match=r"step 2 .*No space left on device.*previous checkpoint is intact"):
        commit_checkpoint(with_manifest, full, {"step": 2})
    assert json.loads((with_manifest / STATE_FILE).read_text())["step"] == 1
    assert not (with_manifest / ".ckpt-staging").exists()
    load_pretrained(with_manifest)
