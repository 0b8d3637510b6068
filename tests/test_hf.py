"""transformers integration: AutoConfig / AutoModelForCausalLM after `import moge.hf`, generate, save."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
from helpers import TINY_CONFIG, published_tensors, reference_logits, write_published_checkpoint, single_thread  # noqa: F401 (fixture)
from moge.generate import generate

import transformers
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

NEW_CACHE_NAME = "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__

IDS = torch.tensor([[1, 5, 9, 33, 70, 12, 4, 96], [1, 44, 3, 3, 18, 61, 90, 7]])

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_published_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def hf_model(ckpt):
    return AutoModelForCausalLM.from_pretrained(ckpt)


def test_autoconfig_reads_published_config(ckpt):
    cfg = AutoConfig.from_pretrained(ckpt)
    assert type(cfg).__name__ == "PanguProMoEConfig" and cfg.model_type == "PanguProMoE"
    assert cfg.num_groups is None and cfg.to_moge_config().groups == 4


def test_automodel_logits_match_float64_reference(hf_model):
    assert type(hf_model).__name__ == "PanguProMoEForCausalLM"
    assert hf_model.dtype == torch.float32
    with torch.no_grad():
        got = hf_model(input_ids=IDS).logits
    want = reference_logits(published_tensors(TINY_CONFIG), TINY_CONFIG, IDS)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_dtype_is_honoured(ckpt, hf_model):
    for kw in ({"torch_dtype": torch.bfloat16}, {"dtype": "bfloat16"}):
        m = AutoModelForCausalLM.from_pretrained(ckpt, **kw)
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}, kw
    m = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
    assert m.dtype == torch.float32
    with torch.no_grad():
        out = m(input_ids=IDS[:1], labels=IDS[:1])
    assert out.loss is not None and torch.isfinite(out.loss)


def test_hf_generate_greedy_equals_ours_with_left_padding(hf_model):
    ids = torch.tensor([[1, 5, 9, 33, 70], [0, 0, 1, 44, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    hf = hf_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                           min_new_tokens=8)
    ours = generate(hf_model, ids, mask, max_new_tokens=8)
    assert hf.shape == (2, 13)
    assert torch.equal(hf, ours)


def test_hf_generate_decodes_in_inference_mode_where_the_fast_kernels_apply(hf_model):
    """The wrapper's ``generate`` runs transformers' loop under ``inference_mode`` (moge.experts.linear's and the
    experts' few-rows kernels apply there only), with the tokens of transformers' ``no_grad`` loop."""
    seen = []
    hook = hf_model.model.register_forward_pre_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, eos_token_id=None)
    try:
        fast = hf_model.generate(ids, **kw)
        assert seen and all(seen)
        seen.clear()
        plain = transformers.GenerationMixin.generate(hf_model, ids, **kw)  # transformers' own, under no_grad
        assert seen and not any(seen)
    finally:
        hook.remove()
    assert torch.equal(fast, plain)


def test_hf_generate_sampling_uses_the_cache(hf_model):
    from transformers.cache_utils import DynamicCache

    ids = torch.tensor([[1, 5, 9, 33]])
    torch.manual_seed(0)
    out = hf_model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=0.8, top_k=10,
                            top_p=0.9, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 10)
    cache = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.24
    assert isinstance(cache, DynamicCache)
    assert cache.get_seq_length() == 9  # the last token is never fed back


def test_save_pretrained_writes_published_layout(hf_model, tmp_path, ckpt):
    hf_model.save_pretrained(tmp_path / "out", max_shard_size="50KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "PanguProMoE" and "num_groups" not in cfg
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in index["weight_map"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, hf_model(input_ids=IDS).logits, rtol=0, atol=0)


def test_bad_path_is_a_clear_error(tmp_path):
    from moge.checkpoint import CheckpointError
    from moge.hf import PanguProMoEForCausalLM

    with pytest.raises(CheckpointError, match="not a local checkpoint directory"):
        PanguProMoEForCausalLM.from_pretrained(tmp_path / "missing")
    # Through the Auto class, transformers (or huggingface_hub, whose wording changes between releases)
    # may answer first; whoever does, the error is an OSError or ours and names the path.
    with pytest.raises((CheckpointError, OSError), match="missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "missing", config=AutoConfig.for_model("PanguProMoE"))


@pytest.mark.slow
def test_fresh_process_import_moge_hf_registers_without_an_import_hook(ckpt):
    """`import moge` stays light (no transformers, no import hook); `import moge.hf` registers the Auto classes."""
    code = f"""
import sys, torch
hooks = list(sys.meta_path)
import moge
assert "transformers" not in sys.modules, "import moge must not import transformers"
assert sys.meta_path == hooks, "import moge must not install an import hook"
import moge.hf
assert not [f for f in sys.meta_path if type(f).__module__.startswith("moge")], "moge installed an import hook"
from transformers import AutoConfig, AutoModelForCausalLM
assert AutoConfig.from_pretrained({str(ckpt)!r}).model_type == "PanguProMoE"
m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, torch_dtype=torch.bfloat16)
assert m.dtype == torch.bfloat16
print(m.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1])
"""
    src = str(Path(moge.__file__).parents[1])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "6"


def test_hf_config_declares_the_same_fields_and_defaults_as_moge_config():
    """PanguProMoEConfig re-declares MoGEConfig's fields for transformers; they must not drift apart."""
    import dataclasses

    from moge.config import MoGEConfig
    from moge.hf.config import PanguProMoEConfig

    hf = PanguProMoEConfig()
    native = MoGEConfig()
    for f in dataclasses.fields(MoGEConfig):
        assert hasattr(hf, f.name), f"PanguProMoEConfig lacks {f.name}"
        assert getattr(hf, f.name) == getattr(native, f.name), f"default of {f.name} differs"
    assert hf.to_moge_config() == native


def test_moe_output_with_router_logits_and_aux_loss(hf_model, ckpt):
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    from moge.checkpoint import load_pretrained

    with torch.no_grad():
        plain = hf_model(input_ids=IDS, labels=IDS)
        out = hf_model(input_ids=IDS, labels=IDS, output_router_logits=True)
        native = load_pretrained(ckpt)(input_ids=IDS, labels=IDS)
    assert isinstance(out, MoeCausalLMOutputWithPast)
    assert plain.aux_loss is None and plain.router_logits is None
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (IDS.numel(), 8)
    torch.testing.assert_close(out.aux_loss, native.aux_loss)  # the native model's per-layer loss, scaled
    torch.testing.assert_close(out.loss, plain.loss + native.aux_loss)
    torch.testing.assert_close(plain.loss, native.loss)
    tup = hf_model(input_ids=IDS, return_dict=False, use_cache=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], plain.logits)


def test_cache_is_accepted_under_both_names_and_unknown_kwargs_are_refused(hf_model):
    from transformers.cache_utils import DynamicCache

    from moge.hf import UnsupportedArgumentError

    with torch.no_grad():
        full = hf_model(input_ids=IDS[:, :6], use_cache=False).logits
        for name in ("cache", "past_key_values"):
            c = DynamicCache(config=hf_model.config)
            hf_model(input_ids=IDS[:, :4], **{name: c}, use_cache=True)
            assert c.get_seq_length() == 4, name
            step = hf_model(input_ids=IDS[:, 4:6], **{name: c}, use_cache=True).logits
            torch.testing.assert_close(step, full[:, 4:6], rtol=1e-5, atol=1e-5)
        with pytest.raises(UnsupportedArgumentError, match=r"unexpected keyword arguments \['bogus'\]"):
            hf_model(input_ids=IDS, bogus=1)
        with pytest.raises(UnsupportedArgumentError, match="cu_seq_lens_q"):
            hf_model(input_ids=IDS, cu_seq_lens_q=torch.tensor([0, 8]))
        if NEW_CACHE_NAME:  # transformers' rule for both names: the new one wins, with a warning
            with pytest.warns(FutureWarning, match="past_key_values"):
                hf_model(input_ids=IDS, cache=DynamicCache(), past_key_values=DynamicCache())
        else:
            with pytest.raises(TypeError, match="not both"):
                hf_model(input_ids=IDS, cache=DynamicCache(), past_key_values=DynamicCache())


@pytest.mark.skipif(not NEW_CACHE_NAME, reason="transformers before 5.24 names the cache past_key_values")
def test_old_cache_name_warns_like_transformers_models_and_gives_the_same_cache(hf_model):
    """From 5.24 the cache is `cache`; `past_key_values` still works on every class, with a FutureWarning."""
    from transformers.cache_utils import DynamicCache

    with torch.no_grad():
        new, old = DynamicCache(config=hf_model.config), DynamicCache(config=hf_model.config)
        a = hf_model(input_ids=IDS[:, :5], cache=new, use_cache=True)
        with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
            b = hf_model(input_ids=IDS[:, :5], past_key_values=old, use_cache=True)
    assert a.cache.get_seq_length() == b.cache.get_seq_length() == 5
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(new.layers[0].keys, old.layers[0].keys, rtol=0, atol=0)


def test_num_items_in_batch_makes_the_loss_a_sum_over_that_count(hf_model):
    labels = IDS.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        mean = hf_model(input_ids=IDS, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        summed = hf_model(input_ids=IDS, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
    torch.testing.assert_close(summed, mean / 2)
