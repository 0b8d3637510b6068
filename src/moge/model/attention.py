"""Grouped-query attention with rotate-half RoPE (docs/design.md section 5), single-device.

Shape legend
    B  batch        S  new positions in this call     R  positions selected for output (``rows_BR``)
    L  key/value slots attended     h  query heads     g  key/value heads     D  head dim     H  hidden

q, k, v and o carry biases; attention is PyTorch SDPA with grouped heads. A cache (``DynamicKVCache``
or ``StaticKVCache`` of :mod:`moge.model.cache`) receives every position's key and value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import validate as V
from ..config import MoGEConfig
from ..experts.linear import Linear


__all__ = ["ATTENTION_KERNELS", "DECODE_QUERIES", "Attention", "RotaryEmbedding", "apply_rope", "decode_attention",
           "eager_attention", "gather_rows", "rotate_half", "sdpa_attention"]


class RotaryEmbedding(nn.Module):
    """Rotate-half (GPT-NeoX / Llama) RoPE tables for given positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # Not persistent: recomputed from the config, and ignored in checkpoints (docs/design.md section 5).
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids_BS: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs_BSd = position_ids_BS.float().unsqueeze(-1) * self.inv_freq.float()
        emb_BSD = torch.cat([freqs_BSd, freqs_BSd], dim=-1)
        return emb_BSD.cos().to(dtype), emb_BSD.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BhSD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    return x_BhSD * cos_BSD.unsqueeze(1) + rotate_half(x_BhSD) * sin_BSD.unsqueeze(1)


# Up to this many queries per row, CPU inference takes decode_attention instead of SDPA's CPU kernel.
DECODE_QUERIES = 8


def decode_attention(q_BhSD: Tensor, k_BgLD: Tensor, v_BgLD: Tensor, mask_B1SL: Tensor) -> Tensor:
    """Masked attention for a few queries per row as two batched matmuls with the query heads of a
    key/value head stacked as rows (no repeated keys), in float32 (float64 kept), the output in the
    query's dtype.

    Why: SDPA's CPU kernel (flash attention for CPU) costs 1.08 ms for one decode query per row at batch
    16, 12 heads over 4 key/value heads, 128 slots (bf16, 2 threads, the 2-core AMD EPYC VM), where these
    two matmuls take 0.11 ms (``benchmarks/probe_reduce.py``): its fixed cost per call is larger than the work.
    The matmuls run in float32 even for bf16 keys and values: compiled, one ``small`` layer's attention
    at batch 1 took 56 us with bf16 matmuls and 39 us with float32 ones (``benchmarks/probe_step.py``;
    torch's bf16 ``bmm`` copies its operands first), while converting the attended keys and values is
    one pass over a few hundred kilobytes. In eager mode the two forms cost about the same."""
    b, h, s, d = q_BhSD.shape
    g = k_BgLD.shape[1]
    acc = torch.promote_types(q_BhSD.dtype, torch.float32)
    q_BgRD = q_BhSD.reshape(b, g, (h // g) * s, d).to(acc)  # R = the group's heads x S queries, heads outer
    scores_BgRL = (q_BgRD @ k_BgLD.to(acc).transpose(-1, -2)) * d ** -0.5
    keep_B1RL = mask_B1SL.unsqueeze(2).expand(b, 1, h // g, s, mask_B1SL.shape[-1]).reshape(b, 1, (h // g) * s, -1)
    probs_BgRL = scores_BgRL.masked_fill(~keep_B1RL, float("-inf")).softmax(-1)
    return (probs_BgRL @ v_BgLD.to(acc)).to(q_BhSD.dtype).view(b, h, s, d)


def sdpa_attention(q_BhSD: Tensor, k_BgLD: Tensor, v_BgLD: Tensor, mask_B1SL: Tensor | None, causal: bool,
                   dropout_p: float) -> Tensor:
    """Attention output ``[B,h,S,D]`` through PyTorch SDPA (grouped heads; ``mask`` boolean, True = attend);
    on CPU without autograd, with a mask and at most :data:`DECODE_QUERIES` queries per row (decoding),
    through :func:`decode_attention`, which is an order of magnitude faster there."""
    if (q_BhSD.device.type == "cpu" and q_BhSD.shape[2] <= DECODE_QUERIES and not torch.is_grad_enabled()
            and mask_B1SL is not None and mask_B1SL.dtype == torch.bool and mask_B1SL.dim() == 4
            and mask_B1SL.shape[1] == 1 and dropout_p == 0.0):
        return decode_attention(q_BhSD, k_BgLD, v_BgLD, mask_B1SL)
    return F.scaled_dot_product_attention(q_BhSD, k_BgLD, v_BgLD, attn_mask=mask_B1SL, is_causal=causal,
                                          dropout_p=dropout_p, enable_gqa=q_BhSD.shape[1] != k_BgLD.shape[1])


def eager_attention(q_BhSD: Tensor, k_BgLD: Tensor, v_BgLD: Tensor, mask_B1SL: Tensor | None, causal: bool,
                    dropout_p: float) -> tuple[Tensor, Tensor]:
    """The same attention written out: output ``[B,h,S,D]`` and the softmax probabilities ``[B,h,S,L]``
    (scores and softmax in float32), which the output is computed from, so they carry its gradient."""
    groups = q_BhSD.shape[1] // k_BgLD.shape[1]
    k_BhLD, v_BhLD = k_BgLD.repeat_interleave(groups, 1), v_BgLD.repeat_interleave(groups, 1)
    scores_BhSL = (q_BhSD @ k_BhLD.transpose(-1, -2)).float() * q_BhSD.shape[-1] ** -0.5
    if mask_B1SL is None and causal:  # SDPA's is_causal: queries and keys start together
        mask_B1SL = torch.ones(scores_BhSL.shape[-2:], dtype=torch.bool, device=q_BhSD.device).tril()
    if mask_B1SL is not None:
        scores_BhSL = scores_BhSL.masked_fill(~mask_B1SL, float("-inf"))
    probs_BhSL = scores_BhSL.softmax(-1).to(q_BhSD.dtype)
    return F.dropout(probs_BhSL, dropout_p) @ v_BhLD, probs_BhSL


def _eager_output(*args) -> Tensor:
    return eager_attention(*args)[0]


# Attention kernels by name (transformers' ``attn_implementation`` names), each ``(q, k, v, mask, causal,
# dropout_p) -> [B,h,S,D]``; an Attention module holds its own in ``attention_kernel``.
ATTENTION_KERNELS = {"sdpa": sdpa_attention, "eager": _eager_output}


class Attention(nn.Module):
    """Grouped-query self-attention with q/k/v/o biases and RoPE; the attention itself is ``attention_kernel``
    (one of :data:`ATTENTION_KERNELS`, SDPA by default)."""

    def __init__(self, config: MoGEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                  config.resolved_head_dim)
        self.dropout = config.attention_dropout
        h = config.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=True)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=True)
        self.attention_kernel = sdpa_attention

    def forward(self, x_BSH: Tensor, cos_sin: tuple[Tensor, Tensor], mask_B1SL: Tensor | None,
                cache=None, cache_kwargs: dict | None = None, rows_BR: Tensor | None = None) -> Tensor:
        """``[B,S,H]`` in, ``[B,S,H]`` out; with ``rows_BR`` (indices into S) only those positions'
        outputs ``[B,R,H]``: every position's key and value still go into ``cache``, but only the
        selected ones are queried (a speculative drafter needs one output of a window it must cache)."""
        b, s, _ = x_BSH.shape
        cos_BSD, sin_BSD = cos_sin
        k = self.k_proj(x_BSH).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSH).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos_BSD, sin_BSD)
        if rows_BR is not None:
            if mask_B1SL is None:
                raise V.InvalidArgumentError("attention with rows_BR needs an explicit attention mask (the "
                                             "selected queries are not a causal prefix)")
            r = rows_BR.shape[1]
            x_BSH, cos_BSD, sin_BSD = (gather_rows(t, rows_BR) for t in (x_BSH, cos_BSD, sin_BSD))
            mask_B1SL = mask_B1SL.gather(2, rows_BR.view(b, 1, r, 1).expand(b, 1, r, mask_B1SL.shape[-1]))
            s = r
        # Heads counted from the projections (-1): under tensor parallelism each rank holds a share of them.
        q = self.q_proj(x_BSH).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos_BSD, sin_BSD)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, cache_kwargs)
            if mask_B1SL is not None and k.shape[2] > mask_B1SL.shape[-1]:
                # A static cache returns all its slots; the mask says how many lead ones can matter.
                k, v = k[:, :, :mask_B1SL.shape[-1]], v[:, :, :mask_B1SL.shape[-1]]
        # Without a mask, causal masking is implicit: only valid when queries and keys start together.
        causal = mask_B1SL is None and s > 1
        o = self.attention_kernel(q, k, v, mask_B1SL, causal, self.dropout if self.training else 0.0)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


def gather_rows(x_BS_: Tensor, rows_BR: Tensor) -> Tensor:
    """``x[b, rows[b, r], ...]``: the selected positions of each row, ``[B, R, ...]``."""
    b, r = rows_BR.shape
    x_BS_ = x_BS_.expand(b, *x_BS_.shape[1:])  # a table shared by the batch ([1, S, ...]) too
    idx = rows_BR.view(b, r, *(1,) * (x_BS_.dim() - 2)).expand(b, r, *x_BS_.shape[2:])
    return x_BS_.gather(1, idx)
