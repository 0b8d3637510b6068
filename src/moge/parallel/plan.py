"""The memory plan of a training run before launch (``moge train --dry-run``), from the meta device.

Shape legend
    W  ranks (D x E)    D  dp_shard    E  ep    T  tokens per rank per micro-batch    H  hidden size
    N  routed experts   K  experts per token    F  expert width    V  vocabulary

The model is built on the meta device (no memory) and every parameter is placed the way
:func:`moge.parallel.fsdp.shard_model` places it: dense parameters split on dim 0 over all W ranks,
routed experts first into whole-group blocks of N/E over ``ep`` and then split on dim 0 over
``dp_shard``. FSDP2 splits dim 0 like ``torch.chunk`` (ceil(rows/ranks) per rank, the last ones
shorter or empty), so the per-rank numbers are exact for parameters, their gradients (the same
shards, float32) and AdamW's two float32 moments; a test compares them with a real run's local shards.
Two items are estimates, stated as such: the blocks FSDP2 gathers for compute (the current and the
prefetched decoder layer - or embedding / output head, each its own unit - and one unit's unsharded
gradients before the reduce-scatter; nothing on one process) and the
activations (values saved for backward per token and layer, listed in :func:`activation_bytes`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..config import MoGEConfig
from ..model import MoGEForCausalLM

_EXPERT = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")
_BLOCK = re.compile(r"^(model\.layers\.\d+|mtp\.\d+|model\.embed_tokens|lm_head)\.")
ADAM_BYTES = 8  # two float32 moments per parameter (the step counter is one scalar per tensor)


def _rows(d0: int, ranks: int, i: int) -> int:
    """Rows of a dim-0 size ``d0`` that shard ``i`` of ``ranks`` holds (``torch.chunk`` semantics)."""
    chunk = math.ceil(d0 / ranks)
    return max(0, min(chunk, d0 - i * chunk))


def param_shapes(config: MoGEConfig) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every parameter, from the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = MoGEForCausalLM(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def local_numels(shapes: dict[str, tuple[int, ...]], dp_shard: int, ep: int, rank: int) -> dict[str, int]:
    """``{parameter name: elements rank ``rank`` stores}`` under ``shard_model`` at (dp_shard, ep)."""
    world, d = dp_shard * ep, rank // ep
    out = {}
    for name, shape in shapes.items():
        rest = math.prod(shape[1:])
        if _EXPERT.search(name):  # this ep rank's block of whole groups, then FSDP over dp_shard
            out[name] = _rows(shape[0] // ep, dp_shard, d) * rest
        else:
            out[name] = _rows(shape[0], world, rank) * rest
    return out


def activation_bytes(config: MoGEConfig, tokens: int, ep: int, act_bytes: int, checkpointing: bool) -> int:
    """An estimate of the activations one rank keeps for backward in one micro-batch of ``tokens``.

    Per token and decoder layer: attention 3H + 2 x (query and key/value widths); MLP 3H, the router's
    float32 logits and scores 2N, MoGE's exact-size dispatch 2EH (each token goes once to each of
    the E ep ranks and comes back), 4F per chosen expert (gate/up output, activation, weighted), the
    shared expert 3F_s. Output head: float32 logits, log-softmax and gradient, 12 bytes x V.
    With activation checkpointing a layer keeps only its input (H) and one layer is live at a time.
    """
    c = config
    hd = c.resolved_head_dim
    attn = 3 * c.hidden_size + 2 * c.num_attention_heads * hd + 2 * c.num_key_value_heads * hd
    moe = (3 * c.hidden_size + 2 * ep * c.hidden_size + 4 * c.moe_intermediate_size * c.num_experts_per_tok
           + 3 * c.shared_expert_intermediate_size)
    layer = (attn + moe) * act_bytes + 2 * c.num_experts * 4
    layers = c.num_hidden_layers + c.num_mtp_layers
    kept = (layers * c.hidden_size * act_bytes + layer) if checkpointing else layers * layer
    return tokens * (kept + 12 * c.vocab_size * (1 + c.num_mtp_layers))


@dataclass
class MemoryPlan:
    """Per-rank bytes of the rank that needs the most (``rank``), and what the run looks like."""
    rank: int
    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    total_params: int
    world: int
    replicated_ep_bytes: int  # params + grads + moments per rank if dense weights were replicated (no FSDP)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations


def memory_plan(config: MoGEConfig, dp_shard: int, ep: int, batch_size: int, seq_len: int,
                mixed_precision: str = "none", activation_checkpointing: bool = False) -> MemoryPlan:
    """The per-rank memory of training ``config`` at (dp_shard, ep) with a global ``batch_size`` of
    ``seq_len``-token rows (see the module docstring for what is exact and what is estimated)."""
    world = dp_shard * ep
    shapes = param_shapes(config)
    total = sum(math.prod(s) for s in shapes.values())
    compute_bytes = 2 if mixed_precision == "bf16" else 4
    blocks: dict[str, int] = {}  # what a rank gathers per decoder layer: dense whole, experts its ep block
    expert_total = 0
    for name, s in shapes.items():
        n = math.prod(s) // (ep if _EXPERT.search(name) else 1)
        expert_total += math.prod(s) if _EXPERT.search(name) else 0
        m = _BLOCK.match(name)
        blocks[m.group(1) if m else "rest"] = blocks.get(m.group(1) if m else "rest", 0) + n
    # The current and the prefetched block in compute dtype, and one block's unsharded float32 gradients.
    gathered = max(blocks.values()) * (2 * compute_bytes + 4) if world > 1 else 0
    per_rank = [sum(local_numels(shapes, dp_shard, ep, r).values()) for r in _ranks_to_check(world, ep)]
    worst = max(range(len(per_rank)), key=per_rank.__getitem__)
    numel = per_rank[worst]
    tokens = batch_size // world * seq_len
    acts = activation_bytes(config, tokens, ep, compute_bytes, activation_checkpointing)
    replicated = 16 * (total - expert_total + expert_total // ep)
    return MemoryPlan(_ranks_to_check(world, ep)[worst], 4 * numel, 4 * numel, ADAM_BYTES * numel, gathered, acts,
                      total, world, replicated)


def _ranks_to_check(world: int, ep: int) -> list[int]:
    # Shard sizes depend only on the position in the chunking: the first and last rows of the mesh
    # cover every distinct size (rank 0 holds the largest chunks, the last ranks the shortest).
    return sorted({0, ep - 1, world - ep, world - 1} & set(range(world)))


def format_plan(p: MemoryPlan, title: str) -> str:
    """A table of the plan for a terminal or a Markdown file."""
    gb = 1e9
    rows = [("parameters (float32 shards)", p.params), ("gradients (float32 shards)", p.grads),
            ("AdamW moments (2 x float32 shards)", p.optimizer),
            ("gathered for compute (estimate: 2 FSDP units + 1 unit's gradients)", p.gathered),
            ("activations (estimate)", p.activations), ("total per rank", p.total)]
    lines = [title, "", f"| per rank (rank {p.rank}, the largest shards) | GB |", "|---|---|"]
    lines += [f"| {name} | {v / gb:.2f} |" for name, v in rows]
    lines += ["", f"{p.total_params / 1e9:.2f} B parameters on {p.world} ranks; without FSDP (dense weights and "
                  f"their AdamW state replicated, experts split over ep) parameters + gradients + moments alone "
                  f"would take {p.replicated_ep_bytes / gb:.2f} GB per rank."]
    return "\n".join(lines)
