"""Multi-token prediction (MTP) predictors, as the public code of the next Pangu models stores them.

Shape legend
    B  batch     S  positions     H  hidden size     V  vocabulary     D  predictors (``num_mtp_layers``)

Predictor k (1-based) is one decoder layer with a MoGE MLP that reads, for position t, the previous
stage's hidden state (the main model's final hidden state for k = 1, predictor k-1's output after
that, as DeepSeek-V3 chains them) and the embedding of token t+k, and predicts token t+k+1:

    x_t   = eh_proj( cat[ enorm(embed(tok_{t+k})), hnorm(h^{k-1}_t) ] )        [B,S,2H] -> [B,S,H]
    h^k_t = DecoderLayer(x)_t                                                   causal over t
    logits = lm_head( shared_head.norm(h^k_t) )                                 predicts tok_{t+k+1}

The main model's hidden state is the one its head reads (after the final norm), which is what the
serving engines pass to MTP drafters. The embedding and the output head are the main model's own
(shared, not copied): a predictor owns ``enorm``, ``hnorm``, ``eh_proj``, its decoder layer and
``shared_head.norm``. The checkpoint stores predictor k at ``model.layers.{L+k-1}`` with those names
plus ``shared_head.head.weight`` (a copy of the head, written for the released loaders and checked
against the head on load), see :mod:`moge.checkpoint.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import validate as V
from ..config import MoGEConfig
from ..experts.linear import Linear
from .blocks import DecoderLayer, RMSNorm, build_attention_mask, causal_lm_loss, positions_from_padding
from .moe import RouterStats


__all__ = ["MTPOutput", "MTPPredictor", "SharedHead", "make_predictors", "mtp_losses"]


class SharedHead(nn.Module):
    """``shared_head``: the norm before the (shared) output head; the head matrix is the model's ``lm_head``."""

    def __init__(self, config: MoGEConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPPredictor(DecoderLayer):
    """Predictor ``layer_idx - L + 1``: a decoder layer (attention + MoGE MLP, cache layer ``layer_idx``)
    fed ``eh_proj(cat[enorm(emb), hnorm(h)])``; see the module docstring."""

    def __init__(self, config: MoGEConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h_BSH: Tensor, emb_BSH: Tensor, cos_sin: tuple[Tensor, Tensor], mask: Tensor | None,
                cache=None, cache_kwargs: dict | None = None, with_stats: bool = True,
                rows_BR: Tensor | None = None) -> tuple[Tensor, RouterStats | None]:
        """This predictor's output hidden state ``[B,S,H]`` (before ``shared_head.norm``) and its router
        statistics, from the previous stage's ``h_BSH`` and the embeddings of the tokens k ahead; with
        ``rows_BR`` only those positions' outputs ``[B,R,H]`` (every position still writes the cache)."""
        x_BSH = self.eh_proj(torch.cat([self.enorm(emb_BSH), self.hnorm(h_BSH)], dim=-1))
        return super().forward(x_BSH, cos_sin, mask, cache, cache_kwargs, with_stats, rows_BR)

    def logits(self, lm_head: nn.Module, h_BSH: Tensor) -> Tensor:
        """``lm_head(shared_head.norm(h))``: the distribution of the token k+1 ahead, ``[B,S,V]``."""
        return lm_head(self.shared_head.norm(h_BSH))


def make_predictors(config: MoGEConfig) -> nn.ModuleList:
    """``config.num_mtp_layers`` predictors, predictor k at decoder index ``L + k - 1`` (its cache layer and
    its checkpoint layer); empty for a model without MTP."""
    L = config.num_hidden_layers
    return nn.ModuleList(MTPPredictor(config, L + k) for k in range(config.num_mtp_layers))


@dataclass
class MTPOutput:
    """One predictor's training outputs: mean cross-entropy, top-1 accuracy on labelled positions
    (the acceptance-rate proxy, detached) and its router statistics."""
    loss: Tensor
    accuracy: Tensor
    router_stats: RouterStats | None


def mtp_losses(model: nn.Module, h_BSH: Tensor, input_ids_BS: Tensor, labels_BS: Tensor,
               attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> list[MTPOutput]:
    """Every predictor's loss on a training batch, given the main model's final hidden states.

    ``model`` is a :class:`~moge.model.MoGEForCausalLM` (``.mtp``, ``.model.embed_tokens``,
    ``.model.rotary``, ``.lm_head``). Predictor k sees positions ``0..S-k-1`` and the tokens
    ``input_ids[:, k:]``; position t predicts ``labels[t+k+1]`` (``-100`` ignored), so a batch needs
    at least k + 2 positions. A 2-D padding mask and position ids are cut to the same positions.
    """
    b, s, _ = h_BSH.shape
    if position_ids is None:
        if attention_mask is not None and attention_mask.dim() == 2:
            position_ids = positions_from_padding(attention_mask)
        else:
            position_ids = torch.arange(s, device=h_BSH.device).expand(b, s)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise V.InvalidArgumentError("MTP training takes a 2-D [B, S] padding mask (or none), got a "
                                     f"{attention_mask.dim()}-D mask")
    out: list[MTPOutput] = []
    prev_BSH = h_BSH
    cos_BSD, sin_BSD = model.model.rotary(position_ids, h_BSH.dtype)  # predictor k uses the first S-k
    for k, predictor in enumerate(model.mtp, start=1):
        n = s - k
        if n < 2:
            raise V.InvalidArgumentError(f"MTP predictor {k} needs sequences of at least {k + 2} positions, got {s}")
        emb_BnH = model.model.embed_tokens(input_ids_BS[:, k:])
        cos_sin = (cos_BSD[:, :n], sin_BSD[:, :n])
        mask = build_attention_mask(attention_mask[:, :n] if attention_mask is not None else None, b, n, 0,
                                    h_BSH.device)
        h_BnH, stats = predictor(prev_BSH[:, :n], emb_BnH, cos_sin, mask)
        logits_BnV = predictor.logits(model.lm_head, h_BnH)
        lab_Bn = labels_BS[:, k:]
        loss = causal_lm_loss(logits_BnV, lab_Bn)
        with torch.no_grad():
            target = lab_Bn[:, 1:].to(logits_BnV.device)
            valid = target != -100
            hits = (logits_BnV[:, :-1].argmax(-1) == target) & valid
            accuracy = hits.sum() / valid.sum().clamp(min=1)
        out.append(MTPOutput(loss, accuracy, stats))
        prev_BSH = h_BnH
    return out
