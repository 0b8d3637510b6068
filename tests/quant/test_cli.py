"""``moge quantize``: end to end on a tiny checkpoint, and the errors of bad input."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import single_thread, train_tokenizer  # noqa: F401 (fixture)
from moge.checkpoint import load_pretrained, save_model
from moge.cli import main as cli_main
from moge.config import get_config
from moge.model import MoGEForCausalLM
from moge.quant import Int8Linear

pytestmark = pytest.mark.usefixtures("single_thread")
TEXT = " ".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7 % 13}; hello moge." for i in range(600))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp")
    tok = train_tokenizer(d / "tok.json")
    torch.manual_seed(0)
    save_model(MoGEForCausalLM(get_config("debug")), d / "ckpt", tokenizer_file=tok)
    (d / "calib.txt").write_text(TEXT)
    return d


def test_quantize_writes_an_ascend_checkpoint_and_evaluates_it(ckpt, tmp_path, capsys):
    out = tmp_path / "w8a8"
    rc = cli_main(["quantize", str(ckpt / "ckpt"), "--out", str(out), "--calib-data", str(ckpt / "calib.txt"),
                   "--calib-tokens", "512", "--calib-seq-len", "32", "--min-expert-tokens", "200", "--eval",
                   "--eval-rows", "4", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quantized" in printed and "expert-aware smoothing, alpha 0.5, static activations" in printed
    assert "were routed fewer than 200 calibration tokens and were topped up" in printed
    assert "| MoE layer | routing agreement | routing KL |" in printed
    model = load_pretrained(out)
    assert isinstance(model.model.layers[1].mlp.shared_expert.up_proj, Int8Linear)
    meta = json.loads((out / "moge_quantization.json").read_text())
    assert meta["smoothing"] == "expert-aware" and meta["calib_tokens"] == 512 and meta["starved_experts"]
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["loss_fp"]) == {"calib"} and 0 <= quality["agreement"]["0"] <= 1
    assert (out / "tokenizer.json").is_file()
    # the quantized directory is refused as a source, with its format named
    assert cli_main(["quantize", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "is already quantized (Ascend W8A8" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    ([], "nothing to do: give --out DIR"),
    (["--out", "X", "--smoothing", "per-expert"], "per-expert gives every expert its own input smoothing"),
    (["--out", "X", "--calib-tokens", "0"], "--calib-tokens must be >= 1, got 0"),
    (["--out", "X", "--alpha", "2"], r"--alpha must be in \[0, 1\], got 2.0"),
    (["--out", "X", "--calib-data", "EMPTY"], "no calibration tokens"),
])
def test_bad_arguments_are_named(ckpt, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("a b")
    args = [str(tmp_path / "q") if a == "X" else str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    assert cli_main(["quantize", str(ckpt / "ckpt"), "--no-progress", *args]) == 2
    import re
    assert re.search(message, capsys.readouterr().err)


def test_unknown_option_values_and_missing_tokenizer(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", str(ckpt / "ckpt"), "--out", "x", "--act", "per-channel"])
    assert e.value.code == 2 and "argument --act: invalid choice: 'per-channel'" in capsys.readouterr().err
    bare = tmp_path / "bare"
    save_model(MoGEForCausalLM(get_config("debug")), bare)
    assert cli_main(["quantize", str(bare), "--out", str(tmp_path / "q")]) == 2
    assert "no tokenizer.json in" in capsys.readouterr().err
