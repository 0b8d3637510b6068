"""Prefill and the fixed-shape decode step against a :class:`~moge.model.cache.StaticKVCache`.

Shape legend
    B  batch     S  new positions per row (1 when decoding, 1 + drafts when verifying)
    L  key/value slots attended (a prefix of the cache's slots)     H  hidden     V  vocabulary

Positions come from the cache's per-row lengths on the device (``pos = lengths + [0..S-1]``), and the
attention mask is one comparison, ``slot <= pos`` (a row's tokens sit at slots equal to their
positions, see :mod:`moge.model.cache`), written into a buffer the step owns. Nothing reads a tensor
on the host, shapes do not depend on the data, and the router skips its statistics, so with a
sync-free experts backend (``grouped_mm``, CUDA's ``auto``) the whole step can be captured as one
CUDA graph (:mod:`moge.engine.graphs`). On CUDA the step pins SDPA to the memory-efficient kernel
(math as the fallback): it takes a boolean mask and grouped heads, and unlike cuDNN's it does not
build a plan per key length.

The step takes any S, so speculative decoding can score ``1 + drafts`` tokens per row in one call
(logits for every position come back) and then :meth:`~moge.model.cache.StaticKVCache.rollback`
each row by its rejected count.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..model import Backbone
from ..model.cache import CacheError, StaticKVCache


__all__ = ["DecodeStep", "KV_BUCKET", "attended_slots", "causal_slot_mask", "lm_head", "prefill", "slot_positions"]

# Eager CPU steps attend to the slots in use rounded up to this many (less attention work early on,
# and few distinct mask shapes).
KV_BUCKET = 64


def attended_slots(in_use: int, capacity: int) -> int:
    """How many leading cache slots an eager step attends when ``in_use`` slots may hold tokens:
    rounded up to :data:`KV_BUCKET`, at most ``capacity``."""
    return min(capacity, -(-in_use // KV_BUCKET) * KV_BUCKET)


def slot_positions(real_BS: Tensor, start_B: Tensor | None = None) -> Tensor:
    """Slot (= RoPE position) of each real token of a left-padded chunk written after ``start_B`` tokens
    per row (none by default), -1 at padding: ``[B, S]``. A row's tokens sit at consecutive slots."""
    pos_BS = real_BS.long().cumsum(-1) - 1
    if start_B is not None:
        pos_BS = pos_BS + start_B.view(-1, 1)
    return pos_BS.masked_fill(~real_BS, -1)


def causal_slot_mask(pos_BS: Tensor, kv_len: int, out: Tensor | None = None, slots_L: Tensor | None = None) -> Tensor:
    """Boolean ``[B,1,S,L]`` mask, True where slot ``l <= pos[b,s]``: a query sees its row's tokens up to
    its own position. Padding queries (negative positions) see slot 0 only, so no row is all-False.
    ``slots_L`` (``arange`` of at least ``kv_len``), given once, spares a captured step the arange."""
    b, s = pos_BS.shape
    slots_L = torch.arange(kv_len, device=pos_BS.device) if slots_L is None else slots_L[:kv_len]
    return torch.le(slots_L.view(1, 1, 1, kv_len), pos_BS.clamp(min=0).view(b, 1, s, 1), out=out)


def _attention_kernels(device: torch.device):
    """On CUDA, SDPA restricted to the memory-efficient kernel (math as fallback); elsewhere unchanged."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _parts(model: nn.Module) -> tuple[Backbone, nn.Module]:
    """``(backbone, lm_head)`` of a :class:`~moge.model.MoGEForCausalLM` or the transformers wrapper; the
    engine runs the backbone through :meth:`~moge.model.Backbone.backbone_forward`, which both share (the
    transformers base model's own ``forward`` takes transformers' arguments)."""
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(base, Backbone) or head is None:
        raise CacheError(f"{type(model).__name__} is not a moge causal LM (needs a moge backbone as .model and "
                         f".lm_head)")
    return base, head


def lm_head(model: nn.Module) -> nn.Module:
    """The output head of a moge causal LM (hidden states -> logits), e.g. for prompt log-probabilities."""
    return _parts(model)[1]


@torch.inference_mode()
def prefill(model: nn.Module, cache: StaticKVCache, input_ids_BS: Tensor, attention_mask_BS: Tensor | None = None,
            logits_to_keep: int = 1, kv_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Run left-padded prompts (``attention_mask`` 1 = real token) into ``cache`` after each row's
    stored tokens; returns ``(logits [B, logits_to_keep or S, V], hidden [B,S,H])``.

    Padding tokens are not stored. ``kv_len``: how many leading slots to attend, at least the longest
    row's length afterwards (default: the whole cache; for an empty cache the prompt width suffices).
    Rows may already hold tokens (``cache.lengths_B``); the caller keeps every row within
    ``cache.capacity``, which the host cannot check without reading the lengths.
    """
    base, head = _parts(model)
    b, s = input_ids_BS.shape
    kv_len = cache.capacity if kv_len is None else kv_len
    if not s <= kv_len <= cache.capacity:
        raise CacheError(f"a prompt of {s} positions attending {kv_len} slots does not fit a cache of "
                         f"capacity {cache.capacity}")
    if attention_mask_BS is None:
        real_BS = torch.ones(b, s, dtype=torch.bool, device=input_ids_BS.device)
    else:
        real_BS = attention_mask_BS.to(input_ids_BS.device).bool()
    pos_BS = slot_positions(real_BS, cache.lengths_B)
    mask_B1SL = causal_slot_mask(pos_BS, kv_len)
    h_BSH, _ = base.backbone_forward(input_ids_BS, attention_mask=mask_B1SL, position_ids=pos_BS,
                                     past_key_values=cache, router_stats=False)
    cache.advance(real_BS.sum(-1))
    return head(h_BSH[:, -logits_to_keep:] if logits_to_keep else h_BSH), h_BSH


def _compile_replayed(fn):
    """``torch.compile`` for a step that replays its trace, as a CUDA graph replays its capture.

    dynamic=False: one graph (the step's shapes never change: the cache's batch and slots, S). Each
    step compiles in a region of its own (``isolate_recompiles``) and keeps none of Dynamo's guards:
    the step's model and cache are fixed at construction, ids are shape-checked by the step and mask and
    positions are its own buffers, so the ~2,400 guards (module structure, hooks, every weight's
    metadata) would check nothing that a call can change, at 0.6 ms per call (8% of a bf16 ``small``
    step at batch 1 on the 2-core VM, ``benchmarks/probe_step.py``). The price is the CUDA graph's contract: change the model after
    the first call (its modules, dtype, hooks) and build a new step."""
    return torch.compile(fn, dynamic=False, isolate_recompiles=True,
                         options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})


class DecodeStep:
    """``num_new`` new tokens per row against ``cache``: fixed shapes, device-side positions, no host sync.

    ``step(ids_BS) -> (logits [B,S,V], hidden [B,S,H])`` writes the tokens at each row's next
    positions and advances the lengths by S. ``kv_len`` (default: the whole cache) is how many leading
    slots are attended; a call may pass a smaller one (CPU: less attention work early on) as long as
    it covers every row's last new position. Positions and the mask live in buffers the step owns, so
    repeated calls allocate nothing for them and a CUDA graph can capture a call.

    ``compile=True`` runs the model's forward through ``torch.compile`` (one graph per step, compiled
    on the first call: tens of seconds for the ``small`` preset on 2 cores). On a CPU the one-row
    products and the routed experts are then traced in reduce form (:mod:`moge.experts.reduce`), which
    Inductor compiles to weight streams at the memory's speed: the fast batch-1 decode path. The
    compiled step always attends all ``kv_len`` slots (fixed shapes, one compile) and, like a captured
    CUDA graph, replays what its first call traced: build a new step after changing the model.
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache, num_new: int = 1, kv_len: int | None = None,
                 compile: bool = False):
        self.base, self.head = _parts(model)
        self.compiled = compile
        self._forward = _compile_replayed(self._model_forward) if compile else self._model_forward
        self.cache, self.num_new = cache, num_new
        self.kv_len = cache.capacity if kv_len is None else kv_len
        if not 1 <= num_new <= self.kv_len <= cache.capacity:
            raise CacheError(f"num_new={num_new} and kv_len={self.kv_len} must satisfy 1 <= num_new <= kv_len "
                             f"<= capacity={cache.capacity}")
        dev, b = cache.lengths_B.device, cache.batch_size
        self.offsets_1S = torch.arange(num_new, device=dev).view(1, num_new)
        self.slots_L = torch.arange(self.kv_len, device=dev)
        self.pos_BS = torch.zeros(b, num_new, dtype=torch.long, device=dev)
        # A compiled step keeps no guards, so its ids go through a buffer of fixed dtype and strides
        # (a caller may pass a column of a wider tensor).
        self._ids_BS = torch.zeros(b, num_new, dtype=torch.long, device=dev) if compile else None
        # One contiguous mask buffer per attended length (a strided view of a longer one sends CPU
        # SDPA down its slow math path); a CUDA graph uses the full length only.
        self._masks: dict[int, Tensor] = {}

    @torch.inference_mode()
    def __call__(self, ids_BS: Tensor, kv_len: int | None = None) -> tuple[Tensor, Tensor]:
        b, s = self.cache.batch_size, self.num_new
        if tuple(ids_BS.shape) != (b, s):
            raise CacheError(f"this step takes ids of shape [{b}, {s}], got {tuple(ids_BS.shape)}")
        # A compiled step attends every slot: one graph, where each attended length would be another compile.
        L = self.kv_len if kv_len is None or self.compiled else kv_len
        if not s <= L <= self.kv_len:
            raise CacheError(f"kv_len={L} must be in [{s}, {self.kv_len}]")
        torch.add(self.cache.lengths_B.view(b, 1), self.offsets_1S, out=self.pos_BS)
        if L not in self._masks:
            self._masks[L] = torch.zeros(b, 1, s, L, dtype=torch.bool, device=self.pos_BS.device)
        mask_B1SL = self._masks[L]
        causal_slot_mask(self.pos_BS, L, out=mask_B1SL, slots_L=self.slots_L)
        with _attention_kernels(ids_BS.device):
            if self._ids_BS is not None:
                ids_BS = self._ids_BS.copy_(ids_BS)
            logits_BSV, h_BSH = self._forward(ids_BS, mask_B1SL, self.pos_BS)
        self.cache.advance(s)
        return logits_BSV, h_BSH

    def _model_forward(self, ids_BS: Tensor, mask_B1SL: Tensor, pos_BS: Tensor) -> tuple[Tensor, Tensor]:
        # check_ids=False: the step feeds back ids the model sampled (generate checks the prompt once);
        # reading them to check would be the host sync the step exists to avoid.
        h_BSH, _ = self.base.backbone_forward(ids_BS, attention_mask=mask_B1SL, position_ids=pos_BS,
                                              past_key_values=self.cache, router_stats=False, check_ids=False)
        return self.head(h_BSH), h_BSH
