"""The building blocks every decoder stack here is made of: norm, pre-norm decoder layer, masks,
positions and the causal-LM loss; shared by the main model and the MTP predictors (:mod:`moge.model.mtp`).

Shape legend: see :mod:`moge.model.decoder` (B batch, S new positions, L key/value positions, H hidden).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoGEConfig
from ..experts import SwiGLU
from .attention import Attention, gather_rows
from .moe import MoGELayer, RouterStats


__all__ = ["DecoderLayer", "RMSNorm", "build_attention_mask", "causal_lm_loss", "positions_from_padding"]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled by a learned weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: MoGEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = (MoGELayer.from_config(config) if self.is_moe
                    else SwiGLU(config.hidden_size, config.dense_intermediate_size))

    def forward(self, x_BSH: Tensor, cos_sin, mask, cache, cache_kwargs: dict | None = None,
                with_stats: bool = True, rows_BR: Tensor | None = None) -> tuple[Tensor, RouterStats | None]:
        """``[B,S,H]`` -> ``[B,S,H]`` and the router's statistics; with ``rows_BR`` only those positions'
        outputs ``[B,R,H]`` (all positions still write the cache; see :class:`~moge.model.attention.Attention`)."""
        attn_BRH = self.self_attn(self.input_layernorm(x_BSH), cos_sin, mask, cache, cache_kwargs, rows_BR)
        x_BSH = (x_BSH if rows_BR is None else gather_rows(x_BSH, rows_BR)) + attn_BRH
        h_BSH = self.post_attention_layernorm(x_BSH)
        if self.is_moe:
            m_BSH, stats = self.mlp(h_BSH, with_stats=with_stats)
        else:
            m_BSH, stats = self.mlp(h_BSH), None
        return x_BSH + m_BSH, stats


def positions_from_padding(attention_mask_BL: Tensor) -> Tensor:
    """RoPE positions ``[B, L]`` of a left-padded 2-D mask (1 = real token): a row's first real token is 0."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(attention_mask_BL: Tensor | None, b: int, s: int, past: int,
                         device: torch.device) -> Tensor | None:
    """Boolean SDPA mask ``[B,1,S,L]`` (True = attend), or None when plain causal masking suffices.

    Queries are the last S of L positions. Padded keys are masked; a query whose every key is masked
    (a left-pad position) may attend to itself so SDPA never sees an all-False row (no NaNs). A 4-D
    mask is taken as the ready boolean ``[B,1,S,L]`` (then pass position ids too).
    """
    if attention_mask_BL is not None and attention_mask_BL.dim() == 4:
        return attention_mask_BL  # already [B,1,S,L] boolean (the transformers wrapper converts its masks)
    if attention_mask_BL is None and (past == 0 or s == 1):
        return None
    L = past + s
    q_pos_S = torch.arange(past, L, device=device)
    allowed_SL = torch.arange(L, device=device).view(1, L) <= q_pos_S.view(s, 1)
    mask_B1SL = allowed_SL.view(1, 1, s, L).expand(b, 1, s, L)
    if attention_mask_BL is not None:
        if attention_mask_BL.shape != (b, L):
            raise ValueError(f"attention_mask must be [B, past+S] = [{b}, {L}], got {tuple(attention_mask_BL.shape)}")
        mask_B1SL = mask_B1SL & attention_mask_BL.bool().view(b, 1, 1, L)
        self_SL = torch.zeros(s, L, dtype=torch.bool, device=device)
        self_SL[torch.arange(s, device=device), q_pos_S] = True
        mask_B1SL = mask_B1SL | (self_SL & ~mask_B1SL.any(-1, keepdim=True))
    return mask_B1SL


def causal_lm_loss(logits_BSV: Tensor, labels_BS: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Next-token cross-entropy in float32: position s predicts ``labels[s+1]``; ``-100`` is ignored.

    The mean over this batch's labelled tokens, or with ``num_items_in_batch`` the sum divided by that
    count (what gradient accumulation needs: the micro-batches' losses then add up to the mean over
    the whole accumulated batch, as transformers' ``Trainer`` expects).
    """
    logits_PV = logits_BSV[:, :-1].flatten(0, 1).float()
    labels_P = labels_BS[:, 1:].flatten().to(logits_BSV.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits_PV, labels_P, ignore_index=-100)
    total = F.cross_entropy(logits_PV, labels_P, ignore_index=-100, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
