"""Every checkpoint entry point loads the same checkpoint however the user spells its path.

Relative paths (from the checkpoint's parent and from elsewhere), absolute paths, a symbolic link to
the directory, ``~`` and a trailing slash, for ``load_pretrained``, ``AutoModelForCausalLM``, and the
``generate``, ``analyze``, ``quantize``, ``convert`` and ``train --resume`` commands. The checkpoint is
written by ``moge train``, so it carries the SHA-256 manifest that loading verifies (a regression:
names were once joined onto the checkpoint path twice, breaking every relative path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import single_thread  # noqa: F401 (fixture)

from moge.checkpoint import CheckpointError, load_pretrained
from moge.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN = ["--preset", "debug", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--vocab-size", "300",
         "--warmup", "1", "--eval-every", "2", "--log-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A directory holding ``runs/ckpt`` (a trained checkpoint with a manifest) and a symlink to it."""
    root = tmp_path_factory.mktemp("user")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert cli_main(["train", *TRAIN, "--out", "runs/ckpt"]) == 0
    finally:
        os.chdir(cwd)
    (root / "link").symlink_to(root / "runs" / "ckpt", target_is_directory=True)
    (root / "elsewhere").mkdir()
    return root


def spellings(root: Path) -> list[tuple[str, str]]:
    """(working directory relative to ``root``, path to the checkpoint as typed there)."""
    return [(".", "runs/ckpt"), (".", "runs/ckpt/"), (".", "./runs/../runs/ckpt"), ("runs", "ckpt"),
            ("elsewhere", "../runs/ckpt"), ("elsewhere", str(root / "runs" / "ckpt")), (".", "link"),
            ("elsewhere", "../link/"), ("elsewhere", "~/runs/ckpt")]


@pytest.fixture
def at(home, monkeypatch):
    """Move into ``home / sub`` with ``~`` meaning ``home``."""
    monkeypatch.setenv("HOME", str(home))

    def go(sub: str) -> None:
        monkeypatch.chdir(home / sub)
    return go


@pytest.fixture(scope="module")
def reference(home) -> dict[str, torch.Tensor]:
    return load_pretrained(home / "runs" / "ckpt").state_dict()


@pytest.mark.parametrize("where,path", spellings(Path("/ROOT")), ids=lambda v: str(v))
def test_load_pretrained_any_spelling(home, at, reference, where, path):
    at(where)
    sd = load_pretrained(path.replace("/ROOT", str(home))).state_dict()
    assert sd.keys() == reference.keys() and all(torch.equal(sd[k], reference[k]) for k in sd)


@pytest.mark.parametrize("where,path", [(".", "runs/ckpt"), ("runs", "ckpt/"), ("elsewhere", "../link/")])
def test_auto_model_relative(home, at, where, path):
    from transformers import AutoModelForCausalLM

    import moge.hf  # noqa: F401 (registers the classes)
    at(where)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(ids).logits, load_pretrained(home / "runs" / "ckpt")(ids).logits)


def test_model_class_from_pretrained_home(home, at):
    """``~`` through the model class itself (transformers' Auto classes treat ``~/x`` as a hub id)."""
    from moge.hf import PanguProMoEForCausalLM

    at("elsewhere")
    model = PanguProMoEForCausalLM.from_pretrained("~/runs/ckpt")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(ids).logits, load_pretrained(home / "runs" / "ckpt")(ids).logits)


def test_confinement_unchanged_for_relative_paths(home, at, tmp_path):
    """A relative checkpoint whose index names a shard outside it is still refused."""
    bad = home / "runs" / "escape"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text((home / "runs" / "ckpt" / "config.json").read_text())
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../ckpt/model.safetensors"}}))
    at(".")
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        load_pretrained("runs/escape")


def test_relative_checkpoint_altered_file_still_detected(home, at, tmp_path):
    """Verification still hashes files when the checkpoint is named relatively."""
    import shutil
    copy = home / "runs" / "altered"
    if not copy.exists():
        shutil.copytree(home / "runs" / "ckpt", copy)
        with open(copy / "tokenizer.json", "a") as f:
            f.write(" ")
    at("runs")
    assert cli_main(["generate", "altered", "--prompt", "def ", "--max-new-tokens", "2"]) != 0


@pytest.mark.parametrize("where,path", [("runs", "ckpt"), ("elsewhere", "../link/"), ("elsewhere", "~/runs/ckpt")])
def test_generate_command_relative(home, at, capsys, where, path):
    at(where)
    assert cli_main(["generate", path, "--prompt", "def ", "--max-new-tokens", "3"]) == 0
    assert "generated 3 tokens" in capsys.readouterr().err


def test_analyze_command_relative(home, at):
    at("elsewhere")
    assert cli_main(["analyze", "../runs/ckpt/", "--out", "analysis", "--tokens", "64", "--seq-len", "16",
                     "--no-progress"]) == 0
    assert (home / "elsewhere" / "analysis" / "analysis.json").is_file()


def test_quantize_and_convert_relative(home, at, reference):
    at("runs")
    assert cli_main(["quantize", "ckpt", "--out", "w8a8", "--calib-tokens", "64", "--calib-seq-len", "16",
                     "--no-progress"]) == 0
    assert cli_main(["generate", "w8a8", "--prompt", "def ", "--max-new-tokens", "2"]) == 0
    at("elsewhere")
    assert cli_main(["convert", "~/link", "converted/", "--dtype", "bfloat16"]) == 0
    sd = load_pretrained("converted").state_dict()
    assert all(torch.equal(sd[k], reference[k].to(torch.bfloat16)) for k in reference)


def test_train_resume_relative(home, at):
    import shutil
    at("runs")
    if not (home / "runs" / "resumed").exists():
        shutil.copytree(home / "runs" / "ckpt", home / "runs" / "resumed")
    args = [a if a != "2" else "3" for a in TRAIN[:4]] + TRAIN[4:]  # --steps 3: one more than saved
    assert cli_main(["train", *args, "--out", "resumed/", "--resume"]) == 0
    state = json.loads((home / "runs" / "resumed" / "moge_training_state.json").read_text())
    assert state["step"] == 3
