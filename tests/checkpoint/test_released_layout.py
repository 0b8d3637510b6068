"""The released Pangu Pro MoE layout both ways (docs/design.md section 5): a directory written exactly as released
loads through transformers and natively, matches an independent float64 forward and generates; what we
write is what the released loaders read; draft and moge-0.1 checkpoints keep loading."""

import json
import warnings

import pytest
import torch

from helpers import TINY_CONFIG, published_tensors, reference_logits, write_published_checkpoint, single_thread  # noqa: F401 (fixture)
import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
from moge.checkpoint import CheckpointError, load_pretrained, read_config, released_config_dict, save_model
from moge.checkpoint.layout import config_from_dict, special_token_ids
from moge.config import get_config

from transformers import AutoConfig, AutoModelForCausalLM

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tensors():
    return published_tensors(TINY_CONFIG)


@pytest.fixture(scope="module")
def released(tmp_path_factory, tensors):
    """Released config keys, sharded safetensors with an index (written without moge's writer)."""
    return write_published_checkpoint(tmp_path_factory.mktemp("released"), tensors=tensors, shards=3)


def _reference_greedy(tensors, row: list[int], steps: int) -> list[int]:
    ids = list(row)
    for _ in range(steps):
        logits = reference_logits(tensors, TINY_CONFIG, torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(row):]


def test_released_directory_loads_through_transformers_and_matches_float64(released, tensors):
    assert (released / "model.safetensors.index.json").is_file()
    cfg = AutoConfig.from_pretrained(released)
    assert type(cfg).__name__ == "PanguProMoEConfig" and cfg.to_moge_config().groups == 4
    model = AutoModelForCausalLM.from_pretrained(released)
    assert type(model).__name__ == "PanguProMoEForCausalLM"
    ids = torch.tensor([[1, 5, 9, 33, 70, 12], [1, 44, 3, 3, 18, 61]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got.double(), reference_logits(tensors, TINY_CONFIG, ids), rtol=1e-4, atol=1e-4)


def test_batched_left_padded_greedy_through_auto_generate_equals_the_reference(released, tensors):
    model = AutoModelForCausalLM.from_pretrained(released)
    rows = [[1, 5, 9, 33, 70], [1, 44, 3]]
    ids = torch.tensor([rows[0], [0, 0] + rows[1]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         eos_token_id=None)
    for i, row in enumerate(rows):
        assert out[i, 5:].tolist() == _reference_greedy(tensors, row, 5), i


def test_what_we_write_is_the_released_config(released, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(released)
    model.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "PanguProMoE" and cfg["architectures"] == ["PanguProMoEForCausalLM"]
    assert set(TINY_CONFIG) <= set(cfg), set(TINY_CONFIG) - set(cfg)  # every released key
    assert {k: cfg[k] for k in TINY_CONFIG} == TINY_CONFIG  # with the same values
    assert set(cfg) - set(TINY_CONFIG) == set()  # and nothing of ours: MoGE, one expert per group
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_our_own_keys_appear_only_where_they_differ():
    base = get_config("debug")
    assert not {"num_groups", "router", "experts_backend", "head_dim"} & set(released_config_dict(base))
    d = released_config_dict(base.replace(router="topk", num_groups=2, experts_backend="eager", head_dim=32))
    assert (d["router"], d["num_groups"], d["experts_backend"], d["head_dim"]) == ("topk", 2, "eager", 32)
    assert config_from_dict(d).replace(num_groups=2) == base.replace(router="topk", num_groups=2,
                                                                       experts_backend="eager", head_dim=32)


def test_draft_and_moge_0_1_checkpoints_keep_loading(tmp_path, tensors):
    """model_type "PanGuMoE" with the keys moge 0.1 wrote (explicit num_groups, router, dtype)."""
    old = dict(TINY_CONFIG, model_type="PanGuMoE", architectures=["PanGuMoEForCausalLM"], num_groups=4,
               router="moge", experts_backend="auto", dtype="float32", mlp_only_layers=[])
    for k in ("use_cache", "attention_dropout", "output_router_logits", "torch_dtype"):
        old.pop(k)
    d = write_published_checkpoint(tmp_path / "old", cfg=old, tensors=tensors)
    ids = torch.tensor([[1, 5, 9, 33]])
    native = load_pretrained(d)
    hf = AutoModelForCausalLM.from_pretrained(d)
    assert type(AutoConfig.from_pretrained(d)).__name__ == "PanGuMoEConfig"
    with torch.no_grad():
        assert torch.equal(native(input_ids=ids).logits, hf(input_ids=ids).logits)
    hf.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == "PanguProMoE"


def test_special_tokens_come_from_the_tokenizer_or_are_assumed_aloud(tmp_path):
    from helpers import train_tokenizer

    cfg = {k: v for k, v in TINY_CONFIG.items() if not k.endswith("_token_id")}
    train_tokenizer(tmp_path / "tokenizer.json")  # moge's <pad>/<bos>/<eos> = 0/1/2
    assert special_token_ids(tmp_path) == {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<eos>", "eos_token": {"content": "<bos>"}}))  # names win over our convention
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = config_from_dict(cfg, tmp_path)
    assert (got.bos_token_id, got.eos_token_id, got.pad_token_id) == (2, 1, 0)
    with pytest.warns(UserWarning, match=r"assuming pad_token_id=0, bos_token_id=1, eos_token_id=45892 "
                                         r"\(the Pangu tokenizer family"):
        pangu = config_from_dict({**cfg, "vocab_size": 153376, "hidden_size": 8}, tmp_path / "none")
    assert pangu.eos_token_id == 45892
    with pytest.warns(UserWarning, match=r"assuming .*eos_token_id=2 \(moge's tokenizer ids\)"):
        assert config_from_dict(cfg).eos_token_id == 2


def test_incomplete_quantized_checkpoints_name_what_is_missing(released, tmp_path, tensors):
    import shutil

    q = tmp_path / "w8a8"
    shutil.copytree(released, q)
    (q / "quant_model_description.json").write_text(json.dumps({"model.layers.0.self_attn.q_proj.weight": "W8A8"}))
    assert read_config(q).num_experts == 8  # a quantized checkpoint has an ordinary config
    for load in (load_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(CheckpointError, match=r"missing tensors in .*w8a8 \(6\): "
                                                  r"model.layers.0.self_attn.q_proj.deq_scale"):
            load(q)
    # int8 weights without the description file: named, not a dtype error from torch
    from safetensors.torch import save_file
    bad = dict(tensors, **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32, dtype=torch.int8)})
    d = tmp_path / "int8"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"integer \(quantized\) weights, e.g. model.layers.0.self_attn.q_proj"
                                              r".*no quant_model_description.json"):
        load_pretrained(d)


def test_save_model_round_trip_keeps_the_group_count_reading(tmp_path, released):
    model = load_pretrained(released)
    save_model(model, tmp_path / "again")
    assert read_config(tmp_path / "again").groups == 4
    with pytest.raises(TypeError, match="save_model"):
        from moge.checkpoint import save_pretrained
        save_pretrained(model, tmp_path / "x", {})  # the old (model, directory) order names the new call
