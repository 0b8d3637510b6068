"""The Ascend W8A8 layout: names, shapes and dtypes as the spec lists them, exact round trips through
moge and transformers, other encodings the Ascend tools write, and named errors for what moge cannot run."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import single_thread  # noqa: F401 (fixture)
from moge.checkpoint import CheckpointError, load_pretrained, save_model
from moge.checkpoint.quantized import save_quantized
from moge.cli import main as cli_main
from moge.config import get_config
from moge.generate import generate
from moge.model import MoGEForCausalLM
from moge.quant import Int8Linear, QuantizedExperts, quantize

pytestmark = pytest.mark.usefixtures("single_thread")
ROWS = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return MoGEForCausalLM(get_config("debug")).eval()


@pytest.fixture(scope="module", params=["static", "dynamic"])
def saved(request, float_model, tmp_path_factory):
    q = copy.deepcopy(float_model)
    quantize(q, ROWS, act=request.param, progress=False)
    d = tmp_path_factory.mktemp(f"w8a8-{request.param}")
    save_model(q, d)
    return request.param, q, d


def logits(model, ids=ROWS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_layout_names_shapes_and_dtypes(saved):
    act, q, d = saved
    t = load_file(str(d / "model.safetensors"))
    desc = json.loads((d / "quant_model_description.json").read_text())
    typ = {"static": "W8A8", "dynamic": "W8A8_DYNAMIC"}[act]
    assert desc["model_quant_type"] == typ
    h, f, n = 64, 32, 8
    fields = {"weight": ((h, h), torch.int8), "weight_scale": ((h, 1), None), "weight_offset": ((h, 1), None)}
    if act == "static":
        fields |= {"input_scale": ((1,), None), "input_offset": ((1,), torch.int8), "quant_bias": ((h,), torch.int32),
                   "deq_scale": ((h,), torch.float32)}
    for p in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.shared_expert.down_proj",
              "model.layers.1.mlp.experts.5.up_proj"):
        for name, (shape, dtype) in fields.items():
            k = f"{p}.{name}"
            want = shape if "experts" not in p and "shared" not in p else \
                {"weight": (f, h), "input_scale": (1,), "input_offset": (1,)}.get(name, (f, 1) if shape[-1:] == (1,)
                                                                                 and len(shape) == 2 else (f,))
            if "shared_expert.down" in p:
                want = {"weight": (h, 64)}.get(name, shape)
            assert tuple(t[k].shape) == want, k
            assert dtype is None or t[k].dtype == dtype, k
            assert desc[k] == typ
        assert bool((t[f"{p}.weight_offset"] == 0).all())
    assert "model.layers.0.mlp.experts.gate_up_proj.weight" not in t  # stored per expert
    for k in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.router_scale", "lm_head.weight",
              "model.embed_tokens.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert desc[k] == "FLOAT" and t[k].dtype == torch.float32
    if act == "static":
        p = "model.layers.0.self_attn.q_proj"
        assert torch.allclose(t[f"{p}.deq_scale"], t[f"{p}.input_scale"] * t[f"{p}.weight_scale"].squeeze(1))
        scales = {float(t[f"model.layers.1.mlp.experts.{e}.{proj}_proj.input_scale"])
                  for e in range(n) for proj in ("gate", "up")}
        assert len(scales) == 1  # one static activation scale for all experts of a layer
        assert len({float(t[f"model.layers.1.mlp.experts.{e}.down_proj.input_scale"]) for e in range(n)}) == 1
    else:
        assert t["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32


def test_round_trip_is_exact_through_moge_and_transformers(saved, tmp_path):
    act, q, d = saved
    back = load_pretrained(d)
    assert isinstance(back.model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(back.model.layers[0].mlp.experts, QuantizedExperts)
    sd, sd2 = q.state_dict(), back.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(logits(back), logits(q))
    from transformers import AutoModelForCausalLM

    import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
    hf = AutoModelForCausalLM.from_pretrained(d)
    assert torch.equal(logits(hf), logits(q))
    hf.save_pretrained(tmp_path / "again")
    a, b = load_file(str(d / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    bf = load_pretrained(d, dtype="bfloat16")
    assert bf.lm_head.weight.dtype == torch.bfloat16 and bf.model.layers[0].self_attn.q_proj.weight_scale.dtype == torch.float32
    assert torch.allclose(logits(bf).float(), logits(q), atol=0.1)


def test_generate_runs_a_quantized_directory(saved, capsys):
    act, q, d = saved
    assert cli_main(["generate", str(d), "--prompt-ids", "1 5 9 33", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip().split("-> ")[1].split()
    want = generate(q, torch.tensor([[1, 5, 9, 33]]), max_new_tokens=5, eos_token_id=2)[0, 4:].tolist()
    assert [int(x) for x in printed] == want[:len(printed)] and printed


def _rewrite(src, dst, change):
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    desc = json.loads((dst / "quant_model_description.json").read_text())
    change(t, desc)
    save_file(t, str(dst / "model.safetensors"))
    (dst / "quant_model_description.json").write_text(json.dumps(desc))
    return dst


def test_reads_the_encodings_ascend_tools_write(float_model, tmp_path):
    q = copy.deepcopy(float_model)
    quantize(q, ROWS, progress=False)
    save_model(q, tmp_path / "ours")
    p = "model.layers.0.self_attn.k_proj"

    def foreign(t, desc):
        t[f"{p}.deq_scale"] = t[f"{p}.deq_scale"].view(torch.int32).to(torch.int64)  # fp16 deployments: int64 bits
        t[f"{p}.weight_scale"] = t[f"{p}.weight_scale"].bfloat16()  # a lower-precision copy; deq_scale rules
        t[f"{p}.input_offset"] = torch.tensor([-3], dtype=torch.int8)  # an asymmetric activation zero point
        t[f"{p}.quant_bias"] = t[f"{p}.quant_bias"] + 3 * t[f"{p}.weight"].int().sum(1)
        t[f"{p}.bias"] = torch.zeros(32)  # a redundant float bias next to quant_bias (ignored, as on Ascend)
        desc[f"{p}.bias"] = "W8A8"

    d = _rewrite(tmp_path / "ours", tmp_path / "foreign", foreign)
    raw = load_file(str(d / "model.safetensors"))
    lin = load_pretrained(d).model.layers[0].self_attn.k_proj
    x = torch.randn(7, 64, dtype=torch.float64)
    s, off = float(raw[f"{p}.input_scale"]), -3.0
    xq = (torch.round(x / s) + off).clamp(-128, 127)
    deq = raw[f"{p}.deq_scale"].to(torch.int32).view(torch.float32).double()
    want = (xq @ raw[f"{p}.weight"].double().T + raw[f"{p}.quant_bias"].double()) * deq  # the Ascend formula
    assert torch.allclose(lin(x), want, rtol=1e-6, atol=1e-9)


BAD = [
    ("W4A8 type", lambda t, d: d.update({"model.layers.0.self_attn.q_proj.weight": "W4A8"}),
     r"unsupported quantization types .*model.layers.0.self_attn.q_proj.weight: 'W4A8'"),
    ("int8 KV cache", lambda t, d: d.update({"kv_quant_type": "C8"}), r"kv_quant_type 'C8' .* is not supported"),
    ("asymmetric weights", lambda t, d: t["model.layers.0.self_attn.o_proj.weight_offset"].fill_(2.0),
     r"o_proj.weight_offset is not zero: asymmetric int8 weights are not supported"),
    ("inconsistent deq_scale", lambda t, d: t["model.layers.0.self_attn.v_proj.deq_scale"].mul_(3.0),
     r"v_proj.deq_scale is not input_scale \* weight_scale"),
    ("gate/up scales differ", lambda t, d: [t[f"model.layers.1.mlp.experts.2.up_proj.{f}"].mul_(2.0)
                                            for f in ("input_scale", "deq_scale")],
     r"experts.2: gate_proj and up_proj have different input_scale"),
    ("quantized router", lambda t, d: d.update({"model.layers.0.mlp.gate.weight": "W8A8"}),
     r"model.layers.0.mlp.gate cannot be quantized by moge"),
    ("int8 described as float", lambda t, d: [d.update({k: "FLOAT"}) if k.endswith(".weight") else t.pop(k)
                                              for k in list(t) if k.startswith("model.layers.1.mlp.experts.")],
     r"integer tensors described as FLOAT \(not in quant_model_description.json as W8A8\) \(24\)"),
    ("mixed expert types", lambda t, d: d.update({"model.layers.1.mlp.experts.3.down_proj.weight": "W8A8_DYNAMIC"}),
     r"the experts of model.layers.1.mlp.experts mix quantization types"),
    ("NaN in a float tensor", lambda t, d: t["model.layers.0.mlp.gate.weight"].__setitem__((0, 0), float("nan")),
     r"tensor model.layers.0.mlp.gate.weight in .* holds 1 non-finite value"),
    ("missing tensor", lambda t, d: t.pop("model.layers.1.mlp.experts.7.down_proj.deq_scale"),
     r"missing tensors in .* model.layers.1.mlp.experts.7.down_proj.deq_scale"),
]


@pytest.mark.parametrize("what,change,message", BAD, ids=[b[0] for b in BAD])
def test_bad_quantized_checkpoints_are_named(float_model, tmp_path, what, change, message):
    q = copy.deepcopy(float_model)
    quantize(q, ROWS[:2], progress=False)
    save_model(q, tmp_path / "ok")
    d = _rewrite(tmp_path / "ok", tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(d)


def test_per_expert_smoothing_cannot_be_written_and_float_saves_clean_up(float_model, tmp_path):
    q = copy.deepcopy(float_model)
    quantize(q, ROWS[:2], smoothing="per-expert", progress=False)
    with pytest.raises(CheckpointError, match=r"carries its own input smoothing \(per-expert smoothing\), which the "
                                              r"Ascend W8A8 layout cannot hold"):
        save_quantized(tmp_path / "pe", q.config, q.state_dict())
    q = copy.deepcopy(float_model)
    quantize(q, ROWS[:2], progress=False)
    save_model(q, tmp_path / "d")
    save_model(float_model, tmp_path / "d")  # a float model saved over the quantized directory
    assert not (tmp_path / "d" / "quant_model_description.json").exists()
    assert torch.equal(logits(load_pretrained(tmp_path / "d")), logits(float_model))
