"""Speculative decoding with the model's own MTP predictors (:mod:`moge.model.mtp`) on the static KV cache.

Shape legend
    B  batch     W  prompt width (left-padded)     N  max new tokens     V  vocabulary     H  hidden
    D  drafts per step (<= num_mtp_layers)         S = 1 + D  positions verified per step
    T = N + 1  output buffer columns (the last one takes writes that must not land)

One :class:`~moge.model.cache.StaticKVCache` holds L + D layers: the main model's 0..L-1 and predictor
k's at L+k-1 (its attention's ``layer_idx``). Main model and predictors share the per-row lengths:
when a row's main cache holds positions ``0..p-1``, so does each predictor's (predictor 1's slot t
was computed from ``h_t`` and token t+1). A step, for a row whose last emitted token ``c`` sits at
position p and whose drafts are ``d_1..d_D``:

1. *verify*: the main model runs ``[c, d_1..d_D]`` at positions ``p..p+D`` (one
   :class:`~moge.engine.step.DecodeStep` call with S = 1 + D), giving logits and hidden states ``h``;
2. *accept* on the device: greedy keeps the leading drafts equal to the main argmax and emits the
   argmax after them; sampling uses the speculative-sampling rule (:func:`accept_drafts`), so the
   output is distributed exactly as the main model's. ``n`` drafts are kept and one more token
   (correction or bonus) is emitted: ``Z = [d_1..d_n, c', ...]`` are the tokens at ``p+1..``;
3. *draft*: predictor 1 runs over the same positions with ``h`` and ``embed(Z)``, predictor k on
   predictor k-1's output and Z shifted by k-1 with the new drafts in place; each one's output at the
   row's index n (its newest real position) gives the next draft;
4. *rollback*: every row drops its ``D - n`` positions past the kept ones (one subtraction).

Tokens are written into a ``[B, T]`` buffer at per-row offsets (a scatter); tokens after a row's
first EOS, or past ``max_new_tokens``, are not written (the buffer holds pad there). The host reads
two numbers per step (every row done? the longest row, for the attended length), nothing else.
The result equals :meth:`~moge.engine.decode.DecodeEngine.decode`'s (greedy: token for token, up to
floating-point ties between a 1-token and a (1+D)-token forward). The step runs eagerly, also on CUDA
(no CUDA graph: the attended length and the gathers vary per step).

Predictor k >= 2's slot at a row's newest position is computed from a draft token (the one it is
asked to continue); when that draft is rejected the slot keeps it. This affects only how good later
drafts are, never the output (verification is by the main model); predictor 1's slots are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import validate as V
from ..errors import MoGEError
from ..model.cache import StaticKVCache
from .sampling import _filtered_probs, race_sample, sample_next
from .step import DecodeStep, _parts, attended_slots, causal_slot_mask, prefill, slot_positions


__all__ = ["SpeculativeDecoder", "SpeculativeError", "accept_drafts", "mtp_predictors"]


class SpeculativeError(MoGEError, ValueError):
    """Speculative decoding asked of a model or with arguments it cannot serve; the message says why."""


def accept_drafts(p_BSV: Tensor, q_BDV: Tensor, drafts_BD: Tensor,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The speculative-sampling rule: ``(n_B, token_B)``, the number of leading drafts kept and the
    token emitted after them.

    ``p_BSV`` are the main model's (processed) probabilities at the S = D + 1 verified positions
    (row i scores the token after draft i), ``q_BDV`` the drafter's probabilities that ``drafts_BD``
    were sampled from. Draft i is kept with probability ``min(1, p_i(d_i) / q_i(d_i))``, in order; at
    the first rejection the token comes from ``norm(max(0, p_n - q_n))``, and when all D are kept
    from ``p_D`` (the bonus token). The emitted sequence is then distributed exactly as sampling from
    p one token at a time. Rows are independent; everything stays on the device.
    """
    b, s, v = p_BSV.shape
    d = s - 1
    if tuple(q_BDV.shape) != (b, d, v) or tuple(drafts_BD.shape) != (b, d):
        raise SpeculativeError(f"p is [B, 1+D, V] = {tuple(p_BSV.shape)}, so q must be {(b, d, v)} and the "
                               f"drafts {(b, d)}; got {tuple(q_BDV.shape)} and {tuple(drafts_BD.shape)}")
    idx_BD1 = drafts_BD.unsqueeze(-1)
    pd_BD = p_BSV[:, :d].gather(-1, idx_BD1).squeeze(-1)
    qd_BD = q_BDV.gather(-1, idx_BD1).squeeze(-1)
    u_BD = torch.rand(b, d, generator=generator, device=p_BSV.device, dtype=pd_BD.dtype)
    # u < p/q without the division (q(d) > 0 for a sampled draft; q(d) = 0 keeps the draft when p(d) > 0)
    n_B = (u_BD * qd_BD < pd_BD).long().cumprod(-1).sum(-1)
    n_B11 = n_B.view(b, 1, 1).expand(b, 1, v)
    pn_BV = p_BSV.gather(1, n_B11).squeeze(1)
    # Row D of q is zero (no draft there): the residual is p itself, the bonus token's distribution.
    qn_BV = q_BDV.gather(1, n_B11.clamp(max=max(d - 1, 0))).squeeze(1) * (n_B < d).view(b, 1)
    res_BV = (pn_BV - qn_BV).clamp_(min=0)
    # p == q leaves no residual; then rejection had probability 0 and p is the right fallback.
    res_BV = torch.where(res_BV.sum(-1, keepdim=True) > 0, res_BV, pn_BV)
    return n_B, race_sample(res_BV, generator)


def mtp_predictors(model: nn.Module) -> nn.ModuleList:
    """``model.mtp``, or :class:`SpeculativeError` saying the model has no predictors to draft with."""
    mtp = getattr(model, "mtp", None)
    if mtp is None or len(mtp) == 0:
        raise SpeculativeError(f"{type(model).__name__} has no MTP predictors (config num_mtp_layers = 0): "
                               "speculative decoding drafts with them; train some (moge train --mtp 1) or "
                               "decode without speculative=True")
    return mtp


def drafting_predictors(model: nn.Module, draft_tokens: int | None) -> list[nn.Module]:
    """The first D of ``model``'s MTP predictors (D = ``draft_tokens``, default all), each checked to
    write cache layer L + k (L main layers), where the verify step's cache keeps predictor k's keys;
    :class:`SpeculativeError` naming what is wrong otherwise."""
    mtp = mtp_predictors(model)
    d = V.integer("draft_tokens", len(mtp) if draft_tokens is None else draft_tokens, 1, len(mtp),
                  error=SpeculativeError)
    num_main = len(_parts(model)[0].layers)
    for k, pred in enumerate(list(mtp)[:d]):
        if pred.self_attn.layer_idx != num_main + k:
            raise SpeculativeError(f"MTP predictor {k + 1} writes cache layer {pred.self_attn.layer_idx}, "
                                   f"expected {num_main + k} (L = {num_main} main layers)")
    return list(mtp)[:d]


def _verify(logits_BSV: Tensor, ver_BS: Tensor, q_BDV: Tensor | None, temperature: float, top_k: int, top_p: float,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``(n_B, z_BS)`` of one verify step: how many drafts each row keeps, and the main model's tokens
    (the kept drafts, then the correction or bonus token at index n)."""
    b, D = ver_BS.shape[0], ver_BS.shape[1] - 1
    if temperature == 0:
        z_BS = logits_BSV.float().argmax(-1)  # as sample_next picks
        return (ver_BS[:, 1:] == z_BS[:, :D]).long().cumprod(-1).sum(-1), z_BS
    p_BSV = _filtered_probs(logits_BSV.float(), temperature, top_k, top_p)
    n_B, c_B = accept_drafts(p_BSV, q_BDV, ver_BS[:, 1:], generator)
    return n_B, ver_BS.roll(-1, 1).scatter_(1, n_B.view(b, 1), c_B.view(b, 1))


def _emit(z_BS: Tensor, n_B: Tensor, out_BT: Tensor, cnt_B: Tensor, finished_B: Tensor, eos_E: Tensor,
          offsets_1S: Tensor) -> Tensor:
    """Write ``z[0..n]`` into ``out`` at each row's count, up to its first EOS and the last column
    (``cnt_B`` and ``finished_B`` are updated in place); returns which tokens were written ``[B, S]``."""
    b, N = out_BT.shape[0], out_BT.shape[1] - 1
    idx_BS = cnt_B.view(b, 1) + offsets_1S
    write_BS = (offsets_1S <= n_B.view(b, 1)) & (idx_BS < N) & ~finished_B.view(b, 1)
    if eos_E.numel():
        eos_BS = torch.isin(z_BS, eos_E) & write_BS
        write_BS &= (eos_BS.long().cumsum(1) - eos_BS.long()) == 0
        finished_B |= eos_BS.any(1)
    out_BT.scatter_(1, torch.where(write_BS, idx_BS, N), z_BS)
    cnt_B += write_BS.sum(1)
    return write_BS


class SpeculativeDecoder:
    """Speculative generation state for one model: per batch size a :class:`StaticKVCache` with the
    main layers and ``draft_tokens`` predictor layers, its verify :class:`DecodeStep` (S = 1 + D) and
    the per-step buffers; reusable across calls whose prompt width + new tokens fit ``capacity``.

    ``draft_tokens`` (default: every predictor) is D; predictor k drafts the k-th token ahead.
    ``decode`` takes arguments already checked by :func:`moge.generate.generate`, the public front.
    """

    def __init__(self, model: nn.Module, capacity: int, draft_tokens: int | None = None):
        self.model = model
        self.base, self.head = _parts(model)
        self.predictors = drafting_predictors(model, draft_tokens)
        self.num_drafts = len(self.predictors)
        self.capacity = V.integer("capacity", capacity, 1, error=SpeculativeError)
        self._slots: dict[int, tuple[StaticKVCache, DecodeStep]] = {}
        self._cos_CD: Tensor | None = None
        self._sin_CD: Tensor | None = None

    def _slot(self, batch: int) -> tuple[StaticKVCache, DecodeStep]:
        if batch not in self._slots:
            attn, p = self.base.layers[0].self_attn, next(self.base.parameters())
            # Room for a verify window past a row's last kept token (see _room).
            cache = StaticKVCache(len(self.base.layers) + self.num_drafts, batch, attn.n_kv, attn.head_dim,
                                  self.capacity + 2 * (1 + self.num_drafts), p.dtype, p.device)
            self._slots[batch] = (cache, DecodeStep(self.model, cache, num_new=1 + self.num_drafts))
            if self._cos_CD is None or self._cos_CD.shape[0] < cache.slots:
                # RoPE tables per slot (slot = position): two lookups per step instead of recomputing.
                # A padding token's position -1 reads the last row: its query goes nowhere.
                self._cos_CD, self._sin_CD = self.base.rotary(torch.arange(cache.slots, device=p.device), p.dtype)
        return self._slots[batch]

    @torch.inference_mode()
    def decode(self, ids_BW: Tensor, mask_BW: Tensor | None, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, eos: Sequence[int] = (), pad_token_id: int = 0,
               generator: torch.Generator | None = None, stats: dict | None = None) -> Tensor:
        """``[b, W + n]``: the prompts and up to ``max_new_tokens`` new tokens, as plain generation
        returns them (see moge.generate). ``stats`` (a dict), when given, receives ``steps`` (verify
        steps run), ``row_steps`` (rows still generating, summed over steps) and ``accepted`` (a ``[D]``
        list: of those row-steps, how many kept draft i), and ``trace``, per step the drafts each row kept
        and the positions its cache kept (``[B]`` tensors; a finished row keeps none)."""
        b, width = ids_BW.shape
        N, D = max_new_tokens, self.num_drafts
        S = 1 + D
        if width + N > self.capacity:
            raise SpeculativeError(f"prompt width {width} + {N} new tokens exceed the decoder's capacity "
                                   f"{self.capacity}")
        dev = ids_BW.device
        mask_BW = torch.ones_like(ids_BW) if mask_BW is None else mask_BW.to(dev, torch.long)
        cache, step = self._slot(b)
        cache.reset()
        logits_B1V, h_BWH = prefill(self.model, cache, ids_BW, mask_BW, kv_len=width)
        c_B = sample_next(logits_B1V[:, -1], temperature, top_k, top_p, generator)
        eos_E = torch.tensor(list(eos), dtype=torch.long, device=dev)
        out_BT = torch.full((b, N + 1), pad_token_id, dtype=torch.long, device=dev)
        out_BT[:, 0] = c_B
        finished_B = torch.isin(c_B, eos_E) if len(eos) else torch.zeros(b, dtype=torch.bool, device=dev)
        cnt_B = torch.ones(b, dtype=torch.long, device=dev)
        if N == 1 or (len(eos) and bool(finished_B.all())):
            if stats is not None:
                stats.update(steps=0, accepted=[0] * D, row_steps=0, trace=[])
            return torch.cat([ids_BW, out_BT[:, :1]], dim=1)

        ver_BS = torch.empty(b, S, dtype=torch.long, device=dev)  # [last token, drafts] to verify
        q_BDV = None if temperature == 0 else torch.empty(b, D, self.head.out_features, dtype=torch.float32, device=dev)
        # First drafts: the predictors over the prompt (positions as prefill stored them), tokens shifted.
        real_BW = mask_BW.bool()
        pos_BW = slot_positions(real_BW)
        last_B = torch.full((b,), width - 1, dtype=torch.long, device=dev)
        z_BW = torch.cat([ids_BW[:, 1:], c_B.view(b, 1)], dim=1)
        self._draft(h_BWH, z_BW, pos_BW, causal_slot_mask(pos_BW, width), cache, last_B, ver_BS, q_BDV,
                    temperature, top_k, top_p, generator)
        ver_BS[:, 0] = c_B

        offsets_1S = torch.arange(S, device=dev).view(1, S)
        slots_L = torch.arange(cache.slots, device=dev)
        masks: dict[int, Tensor] = {}
        accepted_D = torch.zeros(D, dtype=torch.long, device=dev)
        row_steps = torch.zeros((), dtype=torch.long, device=dev)
        trace: list[tuple[Tensor, Tensor]] = []
        max_len, steps = width, 0
        # Without EOS a row is done after N tokens, at the earliest after ceil((N - 1) / S) steps.
        first_check = -(-(N - 1) // S)
        while True:
            kv_len = attended_slots(max_len + S, cache.capacity)
            pos_BS = cache.lengths_B.view(b, 1) + offsets_1S
            if kv_len not in masks:
                masks[kv_len] = torch.empty(b, 1, S, kv_len, dtype=torch.bool, device=dev)
            mask_B1SL = causal_slot_mask(pos_BS, kv_len, out=masks[kv_len], slots_L=slots_L)
            logits_BSV, h_BSH = step(ver_BS, kv_len=kv_len)
            steps += 1
            n_B, z_BS = _verify(logits_BSV, ver_BS, q_BDV, temperature, top_k, top_p, generator)
            write_BS = _emit(z_BS, n_B, out_BT, cnt_B, finished_B, eos_E, offsets_1S)
            if stats is not None:  # rows still generating at this step (their first token is written)
                accepted_D += ((offsets_1S[:, :D] < n_B.view(b, 1)) & write_BS[:, :1]).sum(0)
                row_steps += write_BS[:, 0].sum()
            done_B = finished_B | (cnt_B >= N)
            # A done row keeps nothing more (its positions stay put: the cache never outgrows capacity).
            keep_B = torch.where(done_B, 0, n_B + 1)
            cache.rollback(S - keep_B)
            if stats is not None:
                trace.append((n_B.clone(), keep_B.clone()))
            if len(eos) or steps >= first_check:
                all_done, max_len = torch.stack((done_B.all().long(), cache.lengths_B.max())).tolist()
                if all_done:
                    break
            else:  # no row can be done yet: skip the read, bound the longest row instead
                max_len += S
            self._draft(h_BSH, z_BS, pos_BS, mask_B1SL, cache, n_B, ver_BS, q_BDV, temperature, top_k, top_p,
                        generator)
            ver_BS[:, 0] = z_BS.gather(1, n_B.view(b, 1)).squeeze(1)
        if stats is not None:
            stats.update(steps=steps, accepted=accepted_D.tolist(), row_steps=int(row_steps), trace=trace)
        n = N
        if len(eos) and bool(finished_B.all()):  # stop where the plain loop would: the last row's first EOS
            n = int(cnt_B.max())
        return torch.cat([ids_BW, out_BT[:, :n]], dim=1)

    def _draft(self, h_BSH: Tensor, z_BS: Tensor, pos_BS: Tensor, mask_B1SL: Tensor, cache: StaticKVCache,
               n_B: Tensor, ver_BS: Tensor, q_BDV: Tensor | None, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> None:
        """Run the predictors over a window (``z``: the tokens one position ahead, real up to index n),
        writing their cache layers, and put the drafts in ``ver[:, 1:]`` (and their probabilities in q)."""
        b, s, hdim = h_BSH.shape
        cos_sin = (self._cos_CD[pos_BS], self._sin_CD[pos_BS])
        cache_kwargs = {"position_ids": pos_BS}
        n_B1 = n_B.view(b, 1)
        n_B11 = n_B.view(b, 1, 1).expand(b, 1, hdim)
        embed = self.base.embed_tokens
        last = len(self.predictors) - 1
        for k, pred in enumerate(self.predictors):
            if k:  # predictor k+1 reads the token k+1 ahead: shift, and the previous draft after index n
                z_BS = z_BS.roll(-1, 1).scatter_(1, n_B1, d_B1)
            if k < last:  # the next predictor reads this one's output at every position of the window
                h_BSH, _ = pred(h_BSH, embed(z_BS), cos_sin, mask_B1SL, cache, cache_kwargs, with_stats=False)
                h_B1H = h_BSH.gather(1, n_B11)
            else:  # the last one is asked for position n only: the others just write its cache
                h_B1H, _ = pred(h_BSH, embed(z_BS), cos_sin, mask_B1SL, cache, cache_kwargs, with_stats=False,
                                rows_BR=n_B1)
            logits_BV = pred.logits(self.head, h_B1H).squeeze(1)
            if q_BDV is None:
                d_B = logits_BV.argmax(-1)
            else:
                q_BV = _filtered_probs(logits_BV.float(), temperature, top_k, top_p)
                q_BDV[:, k] = q_BV
                d_B = race_sample(q_BV, generator)
            ver_BS[:, k + 1] = d_B
            d_B1 = d_B.view(b, 1)
