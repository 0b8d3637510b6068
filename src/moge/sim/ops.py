"""The operators of one decoder layer on the busiest chip, and how each is costed (see :mod:`moge.sim.perf`).

Compute operators: ``max(flops / achievable rate of their kernel kind, bytes / achievable bandwidth of
their kernel kind) + launches x per-op overhead``. Communication: :mod:`moge.sim.collectives`. The
MoE block follows the project's dispatchers (docs/design.md sections 7-8): under MoGE with whole groups per EP
rank every token goes to every EP rank, so the dispatch is an all-gather of tokens and the combine a
reduce-scatter (exact sizes, no count exchange), shared with the shared expert when it is TP over the
same ranks; under top-K it is a pair of all-to-alls sized by the expected busiest rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import MoGEConfig
from .collectives import all_to_all_s, collective_s
from .hardware import HardwareProfile
from .imbalance import expected_max_over_mean
from .layout import Layout


# Eager PyTorch (aten) ops per simulator operator, as dispatched by this package's single-device model
# (``moge.model.decoder``, counted with a dispatch hook per submodule): RMSNorm 6; q/k/v projections 12 (Linear on
# 3-D input = t + addmm + 2 views); RoPE with the head views/transposes 14; KV-cache concat + SDPA + output
# reshapes 13; o_proj 4; router plus its inference-time statistics (counts, aux loss) 30; shared SwiGLU 8;
# embedding + RoPE tables 7. Used only by ``eager`` profiles (the local CPU); fused profiles count one
# launch per operator.
EAGER_LAUNCHES = {
    "embed": 7, "attn_norm": 6, "qkv_proj": 12, "rope": 14, "attention": 13, "o_proj": 4, "residual": 1,
    "mlp_norm": 6, "router": 30, "shared_expert": 8, "dense_mlp": 8, "final_norm": 6, "lm_head": 4,
}
# The CPU experts backend (``sorted``, what ``auto`` picks there) dispatches a fixed 18 ops (sort,
# gathers, combine) plus 5 per matmul call, i.e. 10 per active expert (counted with a dispatch hook).
EAGER_EXPERT_LAUNCHES_FIXED, EAGER_EXPERT_LAUNCHES_PER_CALL = 18, 5


def eager_launches(name: str, calls: float = 1.0) -> float:
    """Eager aten ops one instance of simulator operator ``name`` dispatches (``calls`` matmuls)."""
    if name == "experts":
        return EAGER_EXPERT_LAUNCHES_FIXED + EAGER_EXPERT_LAUNCHES_PER_CALL * calls
    return EAGER_LAUNCHES.get(name, 1)


@dataclass
class OpCost:
    """One operator on the busiest chip, per instance (``count`` instances per step)."""

    name: str
    kind: str              # compute | comm
    count: int             # instances per step (layers)
    flops: float = 0.0
    bytes: float = 0.0     # memory traffic (compute ops) or bytes sent per chip (comm ops)
    compute_ms: float = 0.0
    memory_ms: float = 0.0
    comm_ms: float = 0.0
    overhead_ms: float = 0.0
    eager_launches: float = 1.0   # aten ops per instance on an eager profile
    algorithm: str = ""           # collective algorithm chosen (comm ops)
    weight_ms: float = 0.0        # of memory_ms: the time streaming weights (compute ops)

    @property
    def time_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms) + self.comm_ms + self.overhead_ms

    @property
    def bound(self) -> str:
        if self.kind == "comm":
            return "link"
        if self.overhead_ms > max(self.compute_ms, self.memory_ms):
            return "overhead"
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def _interp_rate(curve: tuple[tuple[float, float], ...], flops: float) -> float:
    """GFLOP/s at ``flops`` by log-log interpolation of measured points (clamped at the ends)."""
    pts = sorted(curve)
    if flops <= pts[0][0]:
        return pts[0][1]
    if flops >= pts[-1][0]:
        return pts[-1][1]
    for (f0, r0), (f1, r1) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            t = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
    return pts[-1][1]


class Coster:
    """Costs operators and collectives of one step on one hardware profile."""

    def __init__(self, hw: HardwareProfile, weights: str, phase: str):
        self.hw, self.weights = hw, weights
        self.gemm_tflops = hw.compute_tflops(weights, "gemm")
        self.attn_tflops = hw.compute_tflops("fp32" if weights == "fp32" else "bf16", "attention")
        self.op_us = (hw.decode_op_overhead_us if phase == "decode" and hw.decode_op_overhead_us is not None
                      else hw.op_overhead_us)

    def _gemm_ms(self, flops: float, rate_tflops: float, calls: float) -> float:
        # eager profiles run an operator as `calls` separate matmuls (e.g. one per active expert on a
        # CPU); with a measured curve each call runs at the rate of its own size
        hw = self.hw
        if hw.matmul_curve and flops > 0:
            per = flops / max(calls, 1.0)
            return max(calls, 1.0) * per / (_interp_rate(hw.matmul_curve, per) * 1e9) * 1e3
        return flops / (rate_tflops * 1e12) * 1e3

    def compute(self, name: str, count: int, flops: float, nbytes: float, rate: float | None = None,
                kind: str = "gemm", calls: float = 1.0, bits16: bool = False, wbytes: float = 0.0) -> OpCost:
        """``kind``: gemm (matmul rate, weight-streaming bandwidth), attn (attention rate and KV
        bandwidth, or the measured curve), experts (grouped matmul, or its measured curve), vector.
        ``bits16`` runs a GEMM at the 16-bit rate; ``wbytes`` of ``nbytes`` are weights (reported as
        the weight-reading time)."""
        hw = self.hw
        if rate is None and kind in ("gemm", "experts"):
            w = ("fp32" if self.weights == "fp32" else "bf16") if bits16 else self.weights
            rate = hw.compute_tflops(w, "gmm" if kind == "experts" else "gemm")
        elif rate is None:
            rate = self.gemm_tflops
        if kind == "gemm":
            cm = self._gemm_ms(flops, rate, calls if hw.eager else 1.0)
        elif kind == "attn" and hw.attn_curve and flops > 0:
            cm = flops / (_interp_rate(hw.attn_curve, flops) * 1e9) * 1e3
        elif kind == "experts" and hw.experts_curve and flops > 0:
            cm = flops / (_interp_rate(hw.experts_curve, flops) * 1e9) * 1e3
        elif kind == "experts":
            cm = self._gemm_ms(flops, rate, calls if hw.eager else 1.0)
        else:
            cm = flops / (rate * 1e12) * 1e3
        n_launch = eager_launches(name, calls)
        over = (n_launch if hw.eager else 1) * self.op_us / 1e3
        if hw.eager:
            # measured curves time whole calls, dispatch included: do not charge those launches twice
            if kind == "experts" and hw.experts_curve:
                over = 0.0
            elif kind == "gemm" and hw.matmul_curve:
                over = max(0.0, n_launch - calls) * self.op_us / 1e3
            elif kind == "attn" and hw.attn_curve:
                over = max(0.0, n_launch - 1) * self.op_us / 1e3
            elif kind == "vector":
                # un-fused element-wise code makes one pass over the tensor per eager op
                nbytes *= n_launch
        mem_kind = {"gemm": "gemm", "experts": "gemm", "attn": "attention"}.get(kind, "vector")
        bw = hw.memory_gbs(mem_kind) * 1e9
        return OpCost(name, "compute", count, flops, nbytes, compute_ms=cm, memory_ms=nbytes / bw * 1e3,
                      overhead_ms=over, eager_launches=n_launch, weight_ms=wbytes / bw * 1e3)

    def collective(self, name: str, count: int, kind: str, nbytes: float, ranks: int) -> OpCost:
        sec, algo = collective_s(self.hw, kind, nbytes, ranks)
        return OpCost(name, "comm", count, 0.0, nbytes if sec else 0.0, comm_ms=sec * 1e3, algorithm=algo)

    def all_to_all(self, name: str, count: int, total_bytes: float, ranks: int) -> OpCost:
        if ranks <= 1:
            return OpCost(name, "comm", count)
        sec, algo = all_to_all_s(self.hw, total_bytes / (ranks - 1), ranks)
        return OpCost(name, "comm", count, 0.0, total_bytes if sec else 0.0, comm_ms=sec * 1e3, algorithm=algo)


@dataclass(frozen=True)
class Step:
    """Token counts of one step on the busiest ranks."""
    batch: int
    s: int          # tokens per sequence in this step
    kv_len: int     # keys each new query attends to (decode) / cache length written (prefill)
    t_total: int
    b_a: int        # sequences on the busiest attention DP rank
    t_a: int        # their tokens
    t_sp: int       # sequence-parallel slice per rank
    t_shared: int   # tokens of one shared-expert TP group
    causal: bool


def layer_ops(cost: Coster, c: MoGEConfig, L: Layout, st: Step, n_layers: int, n_moe: int, n_dense: int,
               router: str, ab: int, wb: int, kvb: int, emb_b: int, dispatch_b: int, prefix: str = "") -> tuple[list[OpCost], float]:
    """Operators of ``n_layers`` decoder layers (``n_moe`` MoE + ``n_dense`` dense); returns (ops, top-K factor)."""
    h, hd = c.hidden_size, c.resolved_head_dim
    q_dim, kv_dim = c.num_attention_heads * hd, c.num_key_value_heads * hd
    n, k, f, fs = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size
    kv_heads_rank = math.ceil(c.num_key_value_heads / L.attn_tp)      # KV heads replicate when TP > heads
    keys_per_query = (st.s + 1) / 2 if st.causal else st.kv_len
    ops = [cost.compute(prefix + "attn_norm", n_layers, 4 * st.t_sp * h, 2 * st.t_sp * h * ab, kind="vector"),
           cost.collective(prefix + "attn_allgather", n_layers, "all_gather", st.t_a * h * ab, L.attn_tp)]
    qkv_out = (q_dim + 2 * kv_dim) / L.attn_tp
    ops.append(cost.compute(prefix + "qkv_proj", n_layers, 2 * st.t_a * h * qkv_out,
                            h * qkv_out * wb + st.t_a * (h + qkv_out) * ab, calls=3,
                            wbytes=h * qkv_out * wb))
    ops.append(cost.compute(prefix + "rope", n_layers, 6 * st.t_a * (q_dim + kv_dim) / L.attn_tp,
                            2 * st.t_a * (q_dim + kv_dim) / L.attn_tp * ab, kind="vector"))
    kv_row = 2 * kv_heads_rank * hd
    attn_bytes = st.b_a * st.kv_len * kv_row * kvb + 2 * st.t_a * q_dim / L.attn_tp * ab
    if st.causal:
        attn_bytes += st.t_a * kv_row * kvb                   # writing the new cache
    ops.append(cost.compute(prefix + "attention", n_layers, 4 * st.t_a * keys_per_query * q_dim / L.attn_tp,
                            attn_bytes, rate=cost.attn_tflops, kind="attn"))
    ops.append(cost.compute(prefix + "o_proj", n_layers, 2 * st.t_a * q_dim / L.attn_tp * h,
                            q_dim / L.attn_tp * h * wb + st.t_a * (q_dim / L.attn_tp + h) * ab,
                            wbytes=q_dim / L.attn_tp * h * wb))
    ops.append(cost.collective(prefix + "attn_reducescatter", n_layers, "reduce_scatter", st.t_a * h * ab, L.attn_tp))
    ops.append(cost.compute(prefix + "residual", 2 * n_layers, st.t_sp * h, 3 * st.t_sp * h * ab, kind="vector"))
    ops.append(cost.compute(prefix + "mlp_norm", n_layers, 4 * st.t_sp * h, 2 * st.t_sp * h * ab, kind="vector"))
    factor = 1.0
    if n_moe:
        ep, etp, ranks = L.expert_ep, L.expert_tp, L.ranks
        if router == "topk" and ep > 1:
            factor = expected_max_over_mean(n, k, ep, int(st.t_total))
        ops.append(cost.compute(prefix + "router", n_moe, 2 * st.t_sp * h * n, n * h * emb_b + st.t_sp * (h * ab + n * 4),
                                bits16=True, wbytes=n * h * emb_b))
        pairs = st.t_total * k / ep * factor                  # token-expert pairs on the busiest EP rank
        gathered = st.t_sp * ranks                             # every rank's slice, padded to a multiple of TP
        exact = router == "moge" and c.groups % ep == 0       # every token reaches every EP rank
        fused_shared = bool(fs) and exact and L.shared_tp == ranks
        if exact:
            # MoGE: an all-gather of the tokens (int8 under W8A8) to all ranks, exact sizes
            ops.append(cost.collective(prefix + "dispatch_allgather", n_moe, "all_gather", gathered * h * dispatch_b, ranks))
        else:
            # top-K: each token travels once to every EP rank holding >= 1 of its experts (and to that
            # rank's expert-TP peers); the busiest rank sends `factor` times the mean
            hit = ep * (1 - math.comb(n - n // ep, k) / math.comb(n, k)) if ep > 1 else 1.0
            a2a_rows = st.t_sp * hit * (ep - 1) / ep * etp * factor
            ops.append(cost.all_to_all(prefix + "dispatch_all2all", n_moe, a2a_rows * h * dispatch_b, ranks))
        experts_rank = n // ep
        # distinct experts the busiest rank reads: its pairs spread like balls into its expert bins
        # (small decode batches are weight-read bound, so top-K's extra pairs mean extra weights too)
        used = experts_rank * (1 - (1 - 1 / experts_rank) ** pairs) if experts_rank > 1 else 1.0
        expert_w = used * 3 * h * f / etp * wb
        ops.append(cost.compute(prefix + "experts", n_moe, 2 * pairs * 3 * h * f / etp,
                                expert_w + pairs * (2 * h + 3 * f / etp) * ab, kind="experts",
                                calls=2 * max(1.0, used), wbytes=expert_w))
        if not cost.hw.eager:
            # gather the pairs into expert order and the weighted sum back (the eager CPU backend's
            # sort/gather/combine are in its measured experts curve and op count instead)
            ops.append(cost.compute(prefix + "permute", n_moe, pairs * h, (3 * pairs + st.t_a) * h * ab, kind="vector"))
        if fs:
            t_sh = gathered if fused_shared else st.t_shared
            if not fused_shared:
                ops.append(cost.collective(prefix + "shared_allgather", n_moe, "all_gather", t_sh * h * ab, L.shared_tp))
            shared_w = 3 * h * fs / L.shared_tp * wb
            ops.append(cost.compute(prefix + "shared_expert", n_moe, 2 * t_sh * 3 * h * fs / L.shared_tp,
                                    shared_w + t_sh * (2 * h + 3 * fs / L.shared_tp) * ab, calls=3, wbytes=shared_w))
            if not fused_shared:
                ops.append(cost.collective(prefix + "shared_reducescatter", n_moe, "reduce_scatter", t_sh * h * ab,
                                           L.shared_tp))
        if exact:
            # one reduce-scatter sums expert-TP partials, EP ranks' contributions (and the shared expert's)
            ops.append(cost.collective(prefix + "combine_reducescatter", n_moe, "reduce_scatter", gathered * h * ab, ranks))
        else:
            if etp > 1:
                ops.append(cost.collective(prefix + "expert_tp_reduce", n_moe, "reduce_scatter", pairs * h * ab, etp))
            ops.append(cost.all_to_all(prefix + "combine_all2all", n_moe, a2a_rows * h * ab, ranks))
    if n_dense:
        fd = c.dense_intermediate_size
        dense_w = 3 * h * fd / L.shared_tp * wb
        ops.append(cost.collective(prefix + "mlp_allgather", n_dense, "all_gather", st.t_shared * h * ab, L.shared_tp))
        ops.append(cost.compute(prefix + "dense_mlp", n_dense, 2 * st.t_shared * 3 * h * fd / L.shared_tp,
                                dense_w + st.t_shared * (2 * h + 3 * fd / L.shared_tp) * ab, calls=3, wbytes=dense_w))
        ops.append(cost.collective(prefix + "mlp_reducescatter", n_dense, "reduce_scatter", st.t_shared * h * ab,
                                   L.shared_tp))
    return ops, factor
