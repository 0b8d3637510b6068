"""Speculative decoding with the MTP predictors for the continuous-batching scheduler's rows.

Shape legend
    B  rows of the static cache     b  rows of a decode bucket (the leading b)     R  rows in a prefill
    W  a prefill's width (left-padded)     D  drafts per step     S = 1 + D  positions verified per step
    V  vocabulary     H  hidden     L  key/value slots attended

The scheduler's :class:`~moge.model.cache.StaticKVCache` gets D more layers (predictor k writes layer
L + k - 1, as in :mod:`moge.engine.speculative`) and S spare slots per row. Each row keeps its own
drafts (``drafts_BD``) and, when it samples, the drafter's probabilities they came from (``q_BDV``):

* after a prompt chunk is prefilled, the predictors run over the chunk's positions (the main model's
  hidden states and the tokens one ahead: the prompt's, then the first sampled token), so their cache
  layers hold every prompt position; a chunk that ends the prompt leaves the row's first drafts;
* a decode step verifies ``[last token, drafts]`` of every decoding row in one
  :class:`~moge.engine.step.DecodeStep` with S new positions, keeps the leading drafts the main model
  agrees with (greedy rows: equal to its argmax; sampling rows: the speculative-sampling rule,
  :func:`~moge.engine.speculative.accept_drafts`, with the row's settings and generator) and emits the
  token after them; then the predictors run over the same window for the next drafts.

The scheduler owns the rows' lengths on the host (restored before every call), so dropping rejected
positions is the host adding ``n + 1`` instead of S: nothing to roll back on the device. A row's
output equals what plain decoding gives it (greedy: token for token; sampling: in distribution), and
depends on no other row. Predictor k >= 2's slot at a chunk's last position is computed from a draft
where the next prompt token belongs (the one it would be asked to continue); that only affects how
good later drafts are, never the output. Steps run eagerly (no CUDA graph: the gathers vary per step).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model.cache import RowSubsetCache, StaticKVCache
from .sampling import _filtered_probs_rows, race_sample
from .speculative import accept_drafts, drafting_predictors
from .step import DecodeStep, _parts, causal_slot_mask, slot_positions

__all__ = ["RowDrafter", "RowSampling"]


class RowSampling:
    """The sampling settings of the rows at hand, aligned with them: ``[R]`` temperature / top-k / top-p
    tensors, each row's generator, and ``hot``: the rows (indices into these) that sample and may draw
    from their generator now (a greedy row, or one not decoding, draws nothing)."""

    def __init__(self, temp_R: Tensor, topk_R: Tensor, topp_R: Tensor, generators: list, hot: list[int]):
        self.temp_R, self.topk_R, self.topp_R, self.generators, self.hot = temp_R, topk_R, topp_R, generators, hot

    def probs(self, logits_XV: Tensor, rows: list[int]) -> Tensor:
        """``logits_XV[x]`` filtered under the settings of row ``rows[x]``: ``[X, V]`` float32."""
        i_X = torch.tensor(rows, device=logits_XV.device)
        return _filtered_probs_rows(logits_XV.float(), self.temp_R[i_X], self.topk_R[i_X], self.topp_R[i_X])


class RowDrafter:
    """Per-row MTP drafting and verification over the scheduler's cache (see the module docstring).

    ``draft_tokens``: D (default: every predictor); :class:`SpeculativeError` when the model has no
    predictors or fewer than D."""

    def __init__(self, model: nn.Module, max_batch: int, draft_tokens: int | None = None):
        self.model = model
        self.base, self.head = _parts(model)
        self.predictors = drafting_predictors(model, draft_tokens)
        self.num_drafts, self.num_main = len(self.predictors), len(self.base.layers)
        p = next(self.base.parameters())
        self.drafts_BD = torch.zeros(max_batch, self.num_drafts, dtype=torch.long, device=p.device)
        self.q_BDV = torch.zeros(max_batch, self.num_drafts, self.head.out_features, device=p.device)
        self._steps: dict[int, DecodeStep] = {}

    @property
    def window(self) -> int:
        """S = 1 + D: the positions a decode step verifies per row."""
        return 1 + self.num_drafts

    def new_cache(self, max_batch: int, max_model_len: int) -> StaticKVCache:
        """The scheduler's cache: the main layers and the predictors', room for a verify window past a
        row's last position (a row at ``max_model_len - 1`` writes S slots from there)."""
        attn, p = self.base.layers[0].self_attn, next(self.base.parameters())
        return StaticKVCache(self.num_main + self.num_drafts, max_batch, attn.n_kv, attn.head_dim,
                             max_model_len + self.window, p.dtype, p.device)

    def after_prefill(self, view: RowSubsetCache, chunks, starts: list[int], firsts: dict[int, int], mask_RW: Tensor,
                      h_RWH: Tensor, settings_B: tuple[Tensor, Tensor, Tensor]) -> None:
        """Run the predictors over a prefilled, left-padded chunk: ``view`` its rows of the cache,
        ``chunks`` the scheduler's ``(request, tokens read)`` pairs, ``starts`` where each read from,
        ``firsts`` the first sampled token of each row whose prompt is now done, ``settings_B`` the
        scheduler's temperature / top-k / top-p rows. Each position's token one ahead is the prompt's,
        after a prompt's last the first sampled token. Leaves the rows' drafts (a row that now
        decodes and samples draws them from its generator)."""
        r, w = h_RWH.shape[:2]
        next_RW = torch.zeros(r, w, dtype=torch.long)
        for i, ((req, n), start) in enumerate(zip(chunks, starts)):
            ahead = req.prompt_ids[start + 1:start + n + 1] + ([firsts[i]] if i in firsts else [])
            next_RW[i, w - n:] = torch.tensor(ahead, dtype=torch.long)
        dev = h_RWH.device
        rows_R = view.rows_R
        hot = [i for i, (req, _) in enumerate(chunks)
               if i in firsts and not req.finished and req.params.temperature > 0]
        sampling = RowSampling(*(t[rows_R] for t in settings_B), [req.generator for req, _ in chunks], hot)
        pos_RW = slot_positions(mask_RW.to(dev).bool(), torch.tensor(starts, device=dev))
        last_R = torch.full((r,), w - 1, dtype=torch.long, device=dev)
        self._draft(view, rows_R.tolist(), h_RWH, next_RW.to(dev), pos_RW, causal_slot_mask(pos_RW, view.attend),
                    last_R, sampling)

    @torch.inference_mode()
    def decode(self, cache: StaticKVCache, last_b: list[int], len_b: list[int], kv_len: int,
               sampling: RowSampling) -> tuple[Tensor, list[int], list[list[int]]]:
        """One speculative step over the leading ``b = len(len_b)`` rows of ``cache``: ``last_b`` each
        row's newest token (pad for rows not decoding), ``len_b`` their stored lengths. Returns the
        logits ``[b, S, V]``, per row the drafts kept n, and its tokens z: ``z[0..n]`` is what the main
        model emits (the kept drafts, then its correction or bonus token). Leaves the next drafts."""
        b, S, D = len(len_b), self.window, self.num_drafts
        dev = self.drafts_BD.device
        ver_bS = torch.cat([torch.tensor(last_b, device=dev).view(b, 1), self.drafts_BD[:b]], dim=1)
        if b not in self._steps:
            self._steps[b] = DecodeStep(self.model, cache.rows(0, b), num_new=S)
        view = self._steps[b].cache
        view.lengths_B.copy_(torch.tensor(len_b))
        logits_bSV, h_bSH = self._steps[b](ver_bS, kv_len=kv_len)
        z_bS = logits_bSV.float().argmax(-1)
        n_b = (ver_bS[:, 1:] == z_bS[:, :D]).long().cumprod(-1).sum(-1)
        for r in sampling.hot:  # the speculative-sampling rule, row by row with the row's own noise
            p_SV = sampling.probs(logits_bSV[r], [r] * S)  # row r's settings at each of its S positions
            n_1, c_1 = accept_drafts(p_SV.unsqueeze(0), self.q_BDV[r:r + 1], ver_bS[r:r + 1, 1:],
                                     sampling.generators[r])
            n_b[r] = n_1[0]
            z_bS[r] = ver_bS[r].roll(-1).scatter_(0, n_1, c_1)
        pos_bS = torch.tensor(len_b, device=dev).view(b, 1) + torch.arange(S, device=dev).view(1, S)
        self._draft(view, list(range(b)), h_bSH, z_bS, pos_bS, causal_slot_mask(pos_bS, kv_len), n_b, sampling)
        return logits_bSV, n_b.tolist(), z_bS.tolist()

    def _draft(self, cache, rows: list[int], h_RSH: Tensor, z_RS: Tensor, pos_RS: Tensor, mask_R1SL: Tensor,
               n_R: Tensor, sampling: RowSampling) -> None:
        """The predictors over a window (``z``: the tokens one position ahead, real up to index n),
        writing their cache layers; each row's drafts (and q when it samples) from its position n."""
        r, s, hdim = h_RSH.shape
        cos_sin = self.base.rotary(pos_RS.clamp(min=0), h_RSH.dtype)
        kwargs = {"position_ids": pos_RS}
        n_R1 = n_R.view(r, 1)
        n_R11 = n_R.view(r, 1, 1).expand(r, 1, hdim)
        embed, last = self.base.embed_tokens, len(self.predictors) - 1
        rows_R = torch.tensor(rows, device=h_RSH.device)
        for k, pred in enumerate(self.predictors):
            if k:  # predictor k+1 reads the token k+1 ahead: shift, and the previous draft after index n
                z_RS = z_RS.roll(-1, 1).scatter_(1, n_R1, d_R.view(r, 1))
            if k < last:  # the next predictor reads this one's output at every position of the window
                h_RSH, _ = pred(h_RSH, embed(z_RS), cos_sin, mask_R1SL, cache, kwargs, with_stats=False)
                h_R1H = h_RSH.gather(1, n_R11)
            else:  # the last one is asked for position n only: the others just write its cache
                h_R1H, _ = pred(h_RSH, embed(z_RS), cos_sin, mask_R1SL, cache, kwargs, with_stats=False, rows_BR=n_R1)
            logits_RV = pred.logits(self.head, h_R1H).squeeze(1).float()
            d_R = logits_RV.argmax(-1)
            if sampling.hot:
                probs_hV = sampling.probs(logits_RV[torch.tensor(sampling.hot, device=logits_RV.device)], sampling.hot)
                for j, i in enumerate(sampling.hot):
                    self.q_BDV[rows[i], k] = probs_hV[j]
                    d_R[i] = race_sample(probs_hV[j], sampling.generators[i])
            self.drafts_BD[rows_R, k] = d_R
