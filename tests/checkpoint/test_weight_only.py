"""Weight-only int8 / int4 checkpoints (compressed-tensors pack-quantized): the stored words against the
format's packing written out here, exact round trips through all three loaders from relative paths,
``moge generate`` on them, ``moge quantize --weights``, and named errors for corrupt or foreign files."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import single_thread, train_tokenizer  # noqa: F401 (fixture)
from moge.checkpoint import CheckpointError, load_pretrained, save_model
from moge.cli import main as cli_main
from moge.config import get_config
from moge.generate import generate
from moge.model import MoGEForCausalLM
from moge.quant import WeightOnlyExperts, WeightOnlyLinear, quantize_weights

pytestmark = pytest.mark.usefixtures("single_thread")
IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(5))
TEXT = " ".join(f"the quick brown fox {i} jumps over the lazy dog {i * 7 % 13}; hello moge." for i in range(600))


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return MoGEForCausalLM(get_config("debug")).eval()


@pytest.fixture(scope="module", params=[(8, True), (4, False)], ids=["int8+head", "int4"])
def saved(request, float_model, tmp_path_factory):
    bits, head = request.param
    q = copy.deepcopy(float_model)
    quantize_weights(q, bits, head=head)
    d = tmp_path_factory.mktemp(f"int{bits}")
    save_model(q, d / "ckpt")
    return bits, head, q, d


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def spec_words(q_int, bits):
    """compressed-tensors' packing, written out: value ``i`` of a row, as ``q + 2**(bits-1)``, at bits
    ``[bits * (i % k), ...)`` of int32 word ``i // k`` with ``k = 32 / bits``."""
    k = 32 // bits
    u = (q_int.to(torch.int64) + 2 ** (bits - 1)).reshape(q_int.shape[0], -1, k)
    words = sum(u[:, :, i] << (bits * i) for i in range(k))
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def test_layout_is_compressed_tensors_pack_quantized(saved):
    bits, head, q, d = saved
    t = load_file(str(d / "ckpt" / "model.safetensors"))
    qc = json.loads((d / "ckpt" / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (qc["quant_method"], qc["format"], w["num_bits"], w["symmetric"]) == ("compressed-tensors", "pack-quantized",
                                                                               bits, True)
    assert (w["strategy"], w["group_size"]) == (("channel", None) if bits == 8 else ("group", 32))
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    assert ("lm_head" in qc["ignore"]) != head and "re:.*mlp\\.gate$" in qc["ignore"]
    lin = q.model.layers[0].self_attn.k_proj  # [32, 64]
    p = "model.layers.0.self_attn.k_proj"
    values = lin.qweight if bits == 8 else torch.stack([(lin.qweight & 15), lin.qweight >> 4], -1).flatten(-2).to(
        torch.int8) - 8
    assert t[f"{p}.weight_packed"].dtype == torch.int32 and t[f"{p}.weight_packed"].shape == (32, 64 * bits // 32)
    assert torch.equal(t[f"{p}.weight_packed"], spec_words(values, bits))
    assert t[f"{p}.weight_shape"].tolist() == [32, 64]
    assert torch.equal(t[f"{p}.weight_scale"], lin.weight_scale)
    assert f"{p}.weight" not in t
    # experts one entry per expert: rows :F of the stacked gate_up are expert e's gate_proj
    ex = q.model.layers[1].mlp.experts.gate_up_proj
    e3 = "model.layers.1.mlp.experts.3"
    assert torch.equal(t[f"{e3}.up_proj.weight_scale"], ex.weight_scale[3, 32:])
    assert t[f"{e3}.down_proj.weight_shape"].tolist() == [64, 32]
    for k in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert t[k].dtype == torch.float32
    assert ("lm_head.weight_packed" in t) == head and ("lm_head.weight" in t) != head


def test_round_trip_is_exact_through_all_loaders_from_relative_paths(saved, tmp_path, monkeypatch):
    bits, head, q, d = saved
    monkeypatch.chdir(d)
    back = load_pretrained("ckpt")
    assert isinstance(back.model.layers[0].self_attn.q_proj, WeightOnlyLinear)
    assert isinstance(back.model.layers[1].mlp.experts, WeightOnlyExperts)
    assert type(back.model.layers[1].mlp.gate) is torch.nn.Linear
    sd, sd2 = q.state_dict(), back.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(logits(back), logits(q))
    from transformers import AutoModelForCausalLM

    import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
    hf = AutoModelForCausalLM.from_pretrained("ckpt")
    assert torch.equal(logits(hf), logits(q))
    hf.save_pretrained("again")
    a, b = load_file("ckpt/model.safetensors"), load_file("again/model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    bf = load_pretrained("ckpt", dtype="bfloat16")
    assert bf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert bf.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    assert torch.allclose(logits(bf).float(), logits(q), atol=0.05)


def test_generate_runs_a_weight_only_directory(saved, capsys, monkeypatch):
    bits, head, q, d = saved
    monkeypatch.chdir(d)
    assert cli_main(["generate", "ckpt", "--prompt-ids", "1 5 9 33", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().split("-> ")[1].split()
    want = generate(q, torch.tensor([[1, 5, 9, 33]]), max_new_tokens=6, eos_token_id=2)[0, 4:].tolist()
    assert printed and [int(x) for x in printed] == want[:len(printed)]


def _rewrite(src, dst, change):
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    change(t, cfg)
    save_file(t, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _group(cfg):
    return cfg["quantization_config"]["config_groups"]["group_0"]["weights"]


K = "model.layers.0.self_attn.k_proj"
E = "model.layers.1.mlp.experts.5.down_proj"
BAD = [
    ("missing int4 tensor", lambda t, c: t.pop(f"{E}.weight_packed"), rf"missing tensors in .*: {E}.weight_packed"),
    ("float packed weight", lambda t, c: t.update({f"{K}.weight_packed": t[f"{K}.weight_packed"].float()}),
     rf"tensors with the wrong dtype in .*{K}.weight_packed: F32 \(expected I32\)"),
    ("wrong group size", lambda t, c: _group(c).update(group_size=64),
     r"quantization_config: int4, group size 64\): .*group size 64 does not divide its input dim 32"),
    ("scales of another group size", lambda t, c: t.update({f"{K}.weight_scale": t[f"{K}.weight_scale"][:, :1].contiguous()}),
     rf"tensors with the wrong shape in .*group size 32\).*{K}.weight_scale: expected \[32, 2\], found \[32, 1\]"),
    ("unsupported group size", lambda t, c: _group(c).update(group_size=16),
     r"int4 group size must be one of \(32, 64, 128, 256\), got 16"),
    ("wrong weight_shape", lambda t, c: t[f"{E}.weight_shape"].__setitem__(1, 33),
     rf"{E}.weight_shape is \[64, 33\], expected \[64, 32\]"),
    ("NaN scale", lambda t, c: t[f"{K}.weight_scale"].__setitem__((0, 0), float("nan")),
     rf"tensor {K}.weight_scale in .* holds 1 non-finite value"),
    ("asymmetric", lambda t, c: _group(c).update(symmetric=False), r"only symmetric, static weights"),
    ("num_bits not a number", lambda t, c: _group(c).update(num_bits=[4]),
     r"weights 'int' \[4\]-bit with strategy 'group' are not supported"),
    ("float packed as 8-bit", lambda t, c: _group(c).update(num_bits=8),
     r"weights 'int' 8-bit with strategy 'group' are not supported"),
    ("another method", lambda t, c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}),
     r"quant_method 'gptq' / format None is not supported; moge reads compressed-tensors 'pack-quantized'"),
    ("quantized activations", lambda t, c: c["quantization_config"]["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8}), r"quantized activations are not supported"),
    ("quantized router", lambda t, c: t.update({"model.layers.1.mlp.gate.weight_packed": t[f"{K}.weight_packed"][:8].clone(),
                                                 "model.layers.1.mlp.gate.weight_scale": t[f"{K}.weight_scale"][:8].clone(),
                                                 "model.layers.1.mlp.gate.weight_shape": torch.tensor([8, 64])}),
     r"model.layers.1.mlp.gate cannot be quantized by moge"),
]


@pytest.mark.parametrize("what,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_weight_only_checkpoints_are_named(float_model, tmp_path, what, change, message):
    q = copy.deepcopy(float_model)
    quantize_weights(q, 4)
    save_model(q, tmp_path / "ok")
    d = _rewrite(tmp_path / "ok", tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(d)


def test_truncated_file_is_named(float_model, tmp_path):
    q = copy.deepcopy(float_model)
    quantize_weights(q, 4)
    save_model(q, tmp_path / "d")
    f = tmp_path / "d" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*model.safetensors"):
        load_pretrained(tmp_path / "d")


def test_quantize_cli_writes_weight_only_and_evaluates(tmp_path, capsys, monkeypatch):
    tok = train_tokenizer(tmp_path / "tok.json")
    torch.manual_seed(0)
    save_model(MoGEForCausalLM(get_config("debug")), tmp_path / "fp", tokenizer_file=tok)
    (tmp_path / "val.txt").write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    rc = cli_main(["quantize", "fp", "--weights", "int4", "--group-size", "32", "--out", "q4", "--eval",
                   "--calib-data", "val.txt", "--calib-seq-len", "32", "--eval-rows", "4", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "to weight-only int4 (groups of 32 inputs, output head float)" in out
    assert "compressed-tensors pack-quantized layout" in out and "| MoE layer | routing agreement |" in out
    quality = json.loads((tmp_path / "q4" / "quality.json").read_text())
    assert abs(quality["relative_loss"]["val"]) < 0.05 and 0 <= quality["agreement"]["0"] <= 1
    assert json.loads((tmp_path / "q4" / "moge_quantization.json").read_text())["group_size"] == 32
    assert isinstance(load_pretrained("q4").model.layers[0].self_attn.v_proj, WeightOnlyLinear)
    assert cli_main(["quantize", "q4", "--weights", "int8", "--out", "again"]) == 2
    assert "is already quantized (compressed-tensors pack-quantized" in capsys.readouterr().err
    for args, message in [(["--weights", "int4", "--smoothing", "none"], "--smoothing does not apply to --weights int4"),
                          (["--weights", "int8", "--group-size", "32"], "--group-size does not apply to --weights int8"),
                          (["--weights", "int4", "--group-size", "48"], "--group-size must be one of 32, 64, 128, 256"),
                          (["--head"], "--head does not apply to --weights w8a8")]:
        assert cli_main(["quantize", "fp", "--out", "x", *args]) == 2
        assert re.search(message, capsys.readouterr().err), args


def test_serve_runs_a_weight_only_directory(tmp_path, capsys, monkeypatch):
    from serve_helpers import MODEL, Server
    from tokenizers import Tokenizer

    from helpers import TINY_CONFIG, write_published_checkpoint
    from moge.checkpoint import read_config, write_tokenizer_config

    fp = tmp_path / "tiny"
    fp.mkdir()
    tok = train_tokenizer(fp / "tokenizer.json")
    write_published_checkpoint(fp, {**TINY_CONFIG, "vocab_size": Tokenizer.from_file(str(tok)).get_vocab_size()})
    write_tokenizer_config(fp, read_config(fp))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["quantize", "tiny", "--weights", "int8", "--out", "q8", "--no-progress"]) == 0
    server = Server("q8")
    try:
        assert isinstance(server.engine.scheduler.model.model.layers[0].mlp.experts, WeightOnlyExperts)
        status, body = server.raw("POST", "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": [1, 5, 9, 33], "max_tokens": 5, "temperature": 0, "ignore_eos": True}).encode())
    finally:
        server.close()
    assert status == 200, body
    q = load_pretrained("q8")
    want = generate(q, torch.tensor([[1, 5, 9, 33]]), max_new_tokens=5)[0, 4:].tolist()
    text = Tokenizer.from_file("q8/tokenizer.json").decode(want, skip_special_tokens=False)
    assert body["choices"][0]["text"] == text and body["usage"]["completion_tokens"] == 5
