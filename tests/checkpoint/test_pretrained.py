"""Published checkpoint layout: round trips, sharding, dtype, errors naming the tensor or file, convert."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TINY_CONFIG, published_tensors, write_published_checkpoint, single_thread  # noqa: F401 (fixture)
from moge.checkpoint import (CheckpointError, from_published_state_dict, load_pretrained, parse_size, save_model,
                             to_published_state_dict)
from moge.checkpoint.io import _umask
from moge.cli import main as cli_main
from moge.config import MoGEConfig
from moge.errors import MoGEError
from moge.model import MoGEForCausalLM

SPEC_KEYS = ["model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
             "tie_word_embeddings", "moe_intermediate_size", "shared_expert_intermediate_size",
             "num_experts_per_tok", "num_experts", "router_aux_loss_coef", "initializer_range", "pad_token_id",
             "bos_token_id", "eos_token_id"]
IDS = torch.tensor([[1, 5, 9, 33, 70, 12]])

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tensors():
    return published_tensors(TINY_CONFIG)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tensors):
    return write_published_checkpoint(tmp_path_factory.mktemp("tiny"), tensors=tensors)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _read_all(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_checkpoint_error_is_a_moge_error():
    assert issubclass(CheckpointError, MoGEError)


def test_load_save_round_trip_is_bit_exact(ckpt, tensors, tmp_path):
    model = load_pretrained(ckpt)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 32, 32)
    out = save_model(model, tmp_path / "re")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((out / "generation_config.json").read_text()) == {"pad_token_id": 0, "bos_token_id": 1,
                                                                        "eos_token_id": 2}
    saved = _read_all(out)
    assert set(saved) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(saved[name], t), name
    cfg = json.loads((out / "config.json").read_text())
    assert all(k in cfg for k in SPEC_KEYS)
    assert cfg["model_type"] == "PanguProMoE" and cfg["architectures"] == ["PanguProMoEForCausalLM"]
    assert cfg["torch_dtype"] == "float32" and cfg["attention_dropout"] == 0.0
    assert "num_groups" not in cfg and "router" not in cfg  # as released: groups = num_experts_per_tok
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    assert mode == (out / "config.json").stat().st_mode & 0o777 and mode & 0o044 == 0o044 & ~_umask()
    torch.testing.assert_close(_logits(load_pretrained(out)), _logits(model), rtol=0, atol=0)


def test_stacked_expert_layout(ckpt, tensors):
    """gate_up rows :F are the gate projection and F: the up projection, down is [N,H,F]."""
    model = load_pretrained(ckpt)
    ex = model.model.layers[1].mlp.experts
    f = TINY_CONFIG["moe_intermediate_size"]
    assert torch.equal(ex.gate_up_proj[5, :f], tensors["model.layers.1.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(ex.gate_up_proj[5, f:], tensors["model.layers.1.mlp.experts.5.up_proj.weight"])
    assert torch.equal(ex.down_proj[5], tensors["model.layers.1.mlp.experts.5.down_proj.weight"])


def test_state_dict_conversion_functions_round_trip():
    cfg = MoGEConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                     shared_expert_intermediate_size=8)
    sd = MoGEForCausalLM(cfg).state_dict()
    pub = to_published_state_dict(sd, cfg)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in pub
    assert not any("gate_up_proj" in k or "inv_freq" in k for k in pub)
    back = from_published_state_dict(pub, cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_tied_embeddings_and_compiled_wrapper_round_trip(tmp_path):
    cfg = MoGEConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                     shared_expert_intermediate_size=0, tie_word_embeddings=True)
    model = MoGEForCausalLM(cfg)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule looks like from outside
    out = save_model(wrapped, tmp_path / "tied")
    saved = _read_all(out)
    assert "lm_head.weight" not in saved and not any(k.startswith("_orig_mod") for k in saved)
    back = load_pretrained(out)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    torch.testing.assert_close(_logits(back), _logits(model), rtol=0, atol=0)


def test_sharded_save_writes_index_and_loads_back(ckpt, tmp_path):
    model = load_pretrained(ckpt)
    out = save_model(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _read_all(out).values())
    torch.testing.assert_close(_logits(load_pretrained(out)), _logits(model), rtol=0, atol=0)
    # Saving again unsharded into the same directory removes the stale shards and the index.
    save_model(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((out / "generation_config.json").read_text()) == {"pad_token_id": 0, "bos_token_id": 1,
                                                                        "eos_token_id": 2}


def test_sharded_published_checkpoint_loads(tmp_path, tensors, ckpt):
    d = write_published_checkpoint(tmp_path / "three", tensors=tensors, shards=3)
    assert len(list(d.glob("*.safetensors"))) == 3
    torch.testing.assert_close(_logits(load_pretrained(d)), _logits(load_pretrained(ckpt)), rtol=0, atol=0)


def test_bf16_load_is_honoured(ckpt):
    model = load_pretrained(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_pretrained(ckpt, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    ref = _logits(load_pretrained(ckpt))
    torch.testing.assert_close(_logits(model), ref, rtol=0.1, atol=0.15)


def test_inv_freq_in_checkpoint_is_ignored(tmp_path, tensors, ckpt):
    extra = dict(tensors)
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    extra["model.rotary.inv_freq"] = torch.ones(4)
    d = write_published_checkpoint(tmp_path / "rope", tensors=extra)
    torch.testing.assert_close(_logits(load_pretrained(d)), _logits(load_pretrained(ckpt)), rtol=0, atol=0)


def test_missing_tensor_is_named(tmp_path, tensors):
    bad = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.experts.6.up_proj.weight"}
    d = write_published_checkpoint(tmp_path / "missing", tensors=bad)
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.experts\.6\.up_proj\.weight"):
        load_pretrained(d)


def test_wrong_shape_is_named_with_both_shapes(tmp_path, tensors):
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(15)
    d = write_published_checkpoint(tmp_path / "shape", tensors=bad)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias: expected \[16\], found \[15\]"):
        load_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path, tensors):
    bad = dict(tensors)
    bad["model.layers.0.mlp.experts.8.gate_proj.weight"] = torch.zeros(16, 32)
    d = write_published_checkpoint(tmp_path / "extra", tensors=bad)
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.mlp\.experts\.8\.gate_proj\.weight"):
        load_pretrained(d)


def test_truncated_file_is_named(tmp_path, tensors):
    d = write_published_checkpoint(tmp_path / "trunc", tensors=tensors)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(d)


def test_missing_shard_and_config_are_named(tmp_path, tensors):
    d = write_published_checkpoint(tmp_path / "shards", tensors=tensors, shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        load_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_pretrained(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("10KiB") == 10240 and parse_size(123) == 123
    with pytest.raises(CheckpointError):
        parse_size("lots")


def test_convert_stacked_state_dict_files(tmp_path, ckpt, capsys):
    model = load_pretrained(ckpt)
    ref = _logits(model)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "native.safetensors"))
    torch.save({"model": sd, "step": 3}, tmp_path / "train.pt")
    (tmp_path / "cfg.json").write_text((ckpt / "config.json").read_text())
    for src, dst in (("native.safetensors", "out1"), ("train.pt", "out2")):
        rc = cli_main(["convert", str(tmp_path / src), str(tmp_path / dst), "--config", str(tmp_path / "cfg.json")])
        assert rc == 0
        assert (tmp_path / dst / "model.safetensors").is_file()
        torch.testing.assert_close(_logits(load_pretrained(tmp_path / dst)), ref, rtol=0, atol=0)
    assert "wrote" in capsys.readouterr().out


def test_convert_directory_reshards_and_casts(tmp_path, ckpt):
    rc = cli_main(["convert", str(ckpt), str(tmp_path / "bf16"), "--dtype", "bfloat16", "--max-shard-size", "30KB"])
    assert rc == 0
    out = tmp_path / "bf16"
    assert (out / "model.safetensors.index.json").is_file()
    assert {t.dtype for t in _read_all(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_pretrained(out).lm_head.weight.dtype == torch.bfloat16


def test_convert_errors_are_one_line(tmp_path, ckpt, capsys):
    assert cli_main(["convert", str(tmp_path / "none"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = dict(load_pretrained(ckpt).state_dict())
    bad.pop("model.norm.weight")
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    (tmp_path / "cfg.json").write_text((ckpt / "config.json").read_text())
    assert cli_main(["convert", str(tmp_path / "bad.safetensors"), str(tmp_path / "y"),
                     "--config", str(tmp_path / "cfg.json")]) == 2
    err = capsys.readouterr().err
    assert "missing tensors" in err and "model.norm.weight" in err and len(err.strip().splitlines()) == 1
