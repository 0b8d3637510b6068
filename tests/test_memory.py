"""Weights and caches on transparent huge pages (``moge.memory``): values, identity and ties kept, each
tensor its own storage (saving works), the memory really on huge pages where the kernel offers them,
and ``load_pretrained`` / ``StaticKVCache`` using it on a CPU."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import load_file, save_file

from moge.checkpoint import load_pretrained, save_model
from moge.config import MoGEConfig
from moge.memory import HUGE_PAGE, huge_page_bytes, huge_page_policy, huge_pages_zeros, move_to_huge_pages
from moge.model import MoGEForCausalLM
from moge.model.cache import StaticKVCache


needs_thp = pytest.mark.skipif(huge_page_policy() in (None, "never"),
                               reason="the kernel offers no transparent huge pages here")


def model_of(mib: float = 8) -> MoGEForCausalLM:
    """A MoGE model whose embedding and head (untied) hold about ``mib`` MiB in float32."""
    vocab = int(mib * 2**20 / 4 / 2 / 64)
    cfg = MoGEConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, num_experts=8, num_experts_per_tok=4, num_groups=4, moe_intermediate_size=16,
                     shared_expert_intermediate_size=24)
    torch.manual_seed(0)
    return MoGEForCausalLM(cfg).eval()


def test_moving_keeps_values_parameters_ties_and_outputs():
    model = model_of()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, to check it survives
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 7, 30, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    moved = move_to_huge_pages(model)
    if huge_page_policy() in (None, "never"):
        assert moved == 0
        return
    assert moved >= sum(p.numel() * p.element_size() for p in params.values())
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


@needs_thp
def test_moved_tensors_have_their_own_storages_and_save(tmp_path):
    """Each tensor is a storage of its own (a slice of one mapping), so safetensors' shared-memory check
    and a reload see ordinary tensors."""
    model = model_of()
    move_to_huge_pages(model)
    sd = model.state_dict()
    for v in sd.values():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
    save_file({k: v for k, v in sd.items()}, tmp_path / "w.safetensors")
    back = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], v) for k, v in sd.items())


@needs_thp
def test_weights_land_on_huge_pages_and_outlive_their_module():
    gc.collect()
    base = huge_page_bytes()
    model = model_of(16)
    move_to_huge_pages(model)
    assert huge_page_bytes() - base >= 4 * HUGE_PAGE
    head = model.lm_head.weight
    ref = head.detach().clone()
    del model
    gc.collect()
    assert torch.equal(head, ref)  # the mapping lives as long as any of its tensors


def test_small_modules_and_tensors_stay_put():
    lin = torch.nn.Linear(8, 8)
    ptr = lin.weight.data_ptr()
    assert move_to_huge_pages(lin) == 0 and lin.weight.data_ptr() == ptr
    assert huge_pages_zeros([(4, 4)], torch.float32) is None


@needs_thp
def test_huge_page_zeros_and_the_cpu_kv_cache():
    planes = huge_pages_zeros([(3, 1000, 400), (5,)], torch.bfloat16)
    assert [tuple(p.shape) for p in planes] == [(3, 1000, 400), (5,)]
    assert all(p.dtype == torch.bfloat16 and not p.any() for p in planes)
    planes[0][1, 2, 3] = 7  # writable, and the planes do not overlap
    assert planes[0].sum() == 7 and not planes[1].any()
    base = huge_page_bytes()
    cache = StaticKVCache(num_layers=4, batch_size=2, num_kv_heads=4, head_dim=64, capacity=1023)
    cache.keys[0].fill_(1)
    cache.values[3].fill_(1)
    assert huge_page_bytes() - base >= HUGE_PAGE
    assert not cache.keys[1].any() and not cache.values[0].any()


@needs_thp
def test_load_pretrained_puts_cpu_weights_on_huge_pages(tmp_path):
    model = model_of(16)
    save_model(model, tmp_path / "ckpt")
    gc.collect()
    base = huge_page_bytes()
    plain = load_pretrained(tmp_path / "ckpt", huge_pages=False)
    assert huge_page_bytes() - base < HUGE_PAGE
    placed = load_pretrained(tmp_path / "ckpt")
    assert huge_page_bytes() - base >= 4 * HUGE_PAGE
    for (k, a), b in zip(plain.state_dict().items(), placed.state_dict().values()):
        assert torch.equal(a, b), k


def test_without_huge_pages_nothing_moves_and_caches_allocate_as_usual(monkeypatch):
    """Policy ``never`` (or no THP at all): weights stay where they are, a KV cache is ordinary zeros."""
    import moge.memory as memory
    monkeypatch.setattr(memory, "huge_page_policy", lambda: "never")
    model = model_of()
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert move_to_huge_pages(model) == 0 and [p.data_ptr() for p in model.parameters()] == ptrs
    assert huge_pages_zeros([(3, 1000, 400)], torch.bfloat16) is None
    cache = StaticKVCache(num_layers=2, batch_size=2, num_kv_heads=4, head_dim=64, capacity=1023)
    assert not cache.keys[0].any() and cache.keys[0].shape == (2, 4, 1024, 64)


@needs_thp
def test_transformers_auto_class_puts_cpu_weights_on_huge_pages(tmp_path):
    from transformers import AutoModelForCausalLM

    import moge.hf  # noqa: F401 (registers the Auto classes)
    save_model(model_of(16), tmp_path / "ckpt")
    gc.collect()
    base = huge_page_bytes()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert huge_page_bytes() - base >= 4 * HUGE_PAGE
    native = load_pretrained(tmp_path / "ckpt", huge_pages=False)
    ids = torch.tensor([[1, 7, 30, 2]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, native(ids).logits)
