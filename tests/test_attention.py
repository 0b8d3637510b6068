"""Attention with selected output rows (``rows_BR``): the selected positions' outputs and the cache
contents equal a full forward's, for a plain decoder layer and an MTP predictor."""

import pytest
import torch
import torch.nn.functional as F

from moge.config import get_config
from moge.engine.step import causal_slot_mask
from moge.model import MoGEForCausalLM
from moge.model.attention import decode_attention, gather_rows, sdpa_attention
from moge.model.cache import StaticKVCache
from moge.validate import InvalidArgumentError


def _setup(seed=0):
    torch.manual_seed(seed)
    m = MoGEForCausalLM(get_config("debug", num_mtp_layers=1)).double().eval()
    b, s = 3, 5
    # left padding in row 2: its first two positions are padding (-1: not stored)
    pos_BS = torch.arange(s).expand(b, s).clone()
    pos_BS[2] = torch.tensor([-1, -1, 0, 1, 2])
    mask = causal_slot_mask(pos_BS, 8)
    cos_sin = m.model.rotary(pos_BS.clamp(min=0), torch.float64)
    return m, b, s, pos_BS, mask, cos_sin


def _cache(m, b):
    attn = m.model.layers[0].self_attn
    return StaticKVCache(len(m.model.layers) + 1, b, attn.n_kv, attn.head_dim, 8, torch.float64)


@pytest.mark.parametrize("which", ["layer", "predictor"])
def test_selected_rows_equal_the_full_forward_and_cache_every_position(which):
    m, b, s, pos_BS, mask, cos_sin = _setup()
    rows_BR = torch.tensor([[4], [1], [3]])
    x_BSH = torch.randn(b, s, m.config.hidden_size, dtype=torch.float64)
    emb_BSH = torch.randn_like(x_BSH)
    full_c, part_c = _cache(m, b), _cache(m, b)
    kw = {"position_ids": pos_BS}
    with torch.no_grad():
        if which == "layer":
            mod = m.model.layers[1]
            full, _ = mod(x_BSH, cos_sin, mask, full_c, kw, with_stats=False)
            part, _ = mod(x_BSH, cos_sin, mask, part_c, kw, with_stats=False, rows_BR=rows_BR)
        else:
            mod = m.mtp[0]
            full, _ = mod(x_BSH, emb_BSH, cos_sin, mask, full_c, kw, with_stats=False)
            part, _ = mod(x_BSH, emb_BSH, cos_sin, mask, part_c, kw, with_stats=False, rows_BR=rows_BR)
    assert part.shape == (b, 1, m.config.hidden_size)
    torch.testing.assert_close(part, gather_rows(full, rows_BR), rtol=1e-12, atol=1e-12)
    layer = mod.self_attn.layer_idx
    assert full_c.keys[layer].abs().sum() > 0
    torch.testing.assert_close(part_c.keys[layer], full_c.keys[layer], rtol=0, atol=0)
    torch.testing.assert_close(part_c.values[layer], full_c.values[layer], rtol=0, atol=0)


def test_selected_rows_need_an_explicit_mask():
    m, b, s, pos_BS, _, cos_sin = _setup()
    x = torch.randn(b, s, m.config.hidden_size, dtype=torch.float64)
    with pytest.raises(InvalidArgumentError, match="explicit attention mask"):
        m.model.layers[0].self_attn(x, cos_sin, None, None, None, rows_BR=torch.zeros(b, 1, dtype=torch.long))


@pytest.mark.parametrize("b,s,mask_rows", [(3, 1, 3), (2, 4, 2), (2, 1, 1)])
def test_decode_attention_equals_sdpa(b, s, mask_rows):
    """The CPU decoding path (grouped heads as rows, two matmuls) is SDPA's function: grouped heads,
    a boolean mask per row or broadcast over rows, one or a few queries per row."""
    g = torch.Generator().manual_seed(b * 10 + s)
    q, k, v = (torch.randn(b, 8, s, 16, generator=g), torch.randn(b, 2, 20, 16, generator=g),
               torch.randn(b, 2, 20, 16, generator=g))
    mask = torch.rand(mask_rows, 1, s, 20, generator=g) < 0.6
    mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, mask), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # what sdpa_attention takes when decoding on CPU
        torch.testing.assert_close(sdpa_attention(q, k, v, mask, False, 0.0), want, rtol=1e-5, atol=1e-5)
