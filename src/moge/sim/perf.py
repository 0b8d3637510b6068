"""Operator-level performance model of MoGE / dense decoder inference: step time, throughput, memory.

Every operator of one decoder layer is costed on the *busiest* card as
``max(flops / achievable compute, bytes / achievable bandwidth) + launches x per-op overhead``;
collectives cost ``bytes / (link bandwidth x efficiency) + steps x latency``. Operators run back to
back (no compute/communication overlap), so the layer time is their sum and the step time is
``layers x layer + embedding + LM head``.

Parallel layout (H2P, spec section 7): attention runs DP x TP (tokens of a DP rank are sequence-split
between attention TP ranks around the projections, so the attention all-reduce is a reduce-scatter +
all-gather pair); routed experts run TP x EP (each EP rank owns whole groups); the shared expert (or the
dense MLP of a dense layer) runs TP over ``shared_tp`` cards. Under top-K routing the busiest EP rank gets
``E[max/mean load]`` times the mean expert work (from :mod:`moge.sim.imbalance`); under MoGE it is 1.

Shape names: B sequences, S tokens per sequence in this step (prompt length for prefill, 1 for decode),
T = B*S tokens, H hidden, N routed experts, K experts per token, F expert width, Fs shared width, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..config import MoGEConfig
from ..errors import MoGEError
from .hardware import HardwareProfile
from .imbalance import expected_max_over_mean

WEIGHT_BYTES = {"bf16": 2, "int8": 1, "fp32": 4}
KV_BYTES = {"bf16": 2, "int8": 1, "fp32": 4}

# Eager PyTorch (aten) ops per simulator operator, as dispatched by this package's single-device model
# (``moge.model``, counted with a dispatch hook per submodule): RMSNorm 6; q/k/v projections 12 (Linear on
# 3-D input = t + addmm + 2 views); RoPE with the head views/transposes 14; KV-cache concat + SDPA + output
# reshapes 13; o_proj 4; router plus its inference-time statistics (counts, aux loss) 30; grouped_mm
# experts: see below; shared SwiGLU 8; embedding + RoPE tables 7. Used only by ``eager`` profiles (the
# local CPU); fused profiles count one launch per operator.
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


class PerfError(MoGEError, ValueError):
    """Inconsistent performance-model inputs (layout, batch, precision)."""


class MemoryFitError(PerfError):
    """The model, KV cache and activations do not fit in the cards' memory."""


# ---- parameter counts -------------------------------------------------------------------------------
def param_counts(config: MoGEConfig) -> dict[str, int]:
    """Analytical parameter counts: ``total``, ``activated`` (per token) and their parts.

    Per layer: q/k/v/o projections with biases, two RMSNorms; an MoE layer adds the router ``[N, H]``,
    ``router_scale [N]``, N experts of ``3 H F`` and a shared expert ``3 H Fs``; a dense
    (``mlp_only_layers``) layer a SwiGLU MLP ``3 H F_dense``. Plus embedding, final norm and the LM head
    (untied unless ``tie_word_embeddings``). Activated counts K experts per MoE layer instead of N and
    include the embedding and the head (the paper's convention).
    """
    c = config
    h, hd = c.hidden_size, c.resolved_head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = h * q + q + 2 * (h * kv + kv) + q * h + h
    norms = 2 * h
    expert = 3 * h * c.moe_intermediate_size
    shared = 3 * h * c.shared_expert_intermediate_size
    router = c.num_experts * h + c.num_experts
    dense_mlp = 3 * h * c.dense_intermediate_size
    n_dense = len(set(c.mlp_only_layers))
    n_moe = c.num_hidden_layers - n_dense
    embed = c.vocab_size * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    common = embed + head + h + c.num_hidden_layers * (attn + norms) + n_dense * dense_mlp
    total = common + n_moe * (router + c.num_experts * expert + shared)
    activated = common + n_moe * (router + c.num_experts_per_tok * expert + shared)
    return {"total": total, "activated": activated, "embedding": embed, "lm_head": head,
            "attention_per_layer": attn, "expert": expert, "shared_expert": shared,
            "moe_layers": n_moe, "dense_layers": n_dense}


# ---- layout -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """H2P hybrid parallel layout; every product must equal the card count."""

    attn_dp: int
    attn_tp: int
    expert_tp: int
    expert_ep: int
    shared_tp: int

    @property
    def cards(self) -> int:
        return self.attn_dp * self.attn_tp

    def describe(self) -> str:
        return (f"attention DP{self.attn_dp} x TP{self.attn_tp}, experts TP{self.expert_tp} x "
                f"EP{self.expert_ep}, shared TP{self.shared_tp}")


def default_layout(config: MoGEConfig, cards: int, attn_tp: int | None = None, expert_ep: int | None = None,
                   shared_tp: int | None = None) -> Layout:
    """Paper-like defaults: attention TP up to 4 (DP over the rest), EP over up to 4 ranks holding whole
    groups (expert TP over the rest), shared expert TP over every card (spec s.7 at 8 cards: attention
    DP2 x TP4, experts TP2 x EP4, shared TP8). Explicit values override."""
    if cards < 1:
        raise PerfError(f"--cards must be >= 1, got {cards}")
    tp = attn_tp or math.gcd(cards, 4)
    if expert_ep is None:
        ep = max(e for e in range(1, min(cards, 4) + 1) if cards % e == 0 and config.groups % e == 0)
    else:
        ep = expert_ep
    layout = Layout(cards // tp if cards % tp == 0 else -1, tp, cards // ep if cards % ep == 0 else -1, ep,
                    shared_tp or cards)
    check_layout(config, layout, cards)
    return layout


def check_layout(config: MoGEConfig, layout: Layout, cards: int) -> None:
    """Raise :class:`PerfError` naming the problem if the layout does not fit the cards or the model."""
    if layout.attn_dp < 1 or layout.attn_dp * layout.attn_tp != cards:
        raise PerfError(f"attention TP {layout.attn_tp} does not divide {cards} cards")
    if layout.expert_tp < 1 or layout.expert_tp * layout.expert_ep != cards:
        raise PerfError(f"expert EP {layout.expert_ep} does not divide {cards} cards")
    if layout.shared_tp < 1 or cards % layout.shared_tp:
        raise PerfError(f"shared-expert TP {layout.shared_tp} does not divide {cards} cards")
    if config.num_experts % layout.expert_ep:
        raise PerfError(f"{config.num_experts} experts cannot be split over EP {layout.expert_ep}")
    if config.num_attention_heads % layout.attn_tp:
        raise PerfError(f"{config.num_attention_heads} query heads cannot be split over attention TP {layout.attn_tp}")


# ---- results ----------------------------------------------------------------------------------------
@dataclass
class OpCost:
    """One operator on the busiest card, per instance (``count`` instances per step)."""

    name: str
    kind: str              # compute | comm
    count: int             # instances per step (layers)
    flops: float = 0.0
    bytes: float = 0.0     # memory traffic (compute ops) or bytes sent per card (comm ops)
    compute_ms: float = 0.0
    memory_ms: float = 0.0
    comm_ms: float = 0.0
    overhead_ms: float = 0.0
    eager_launches: float = 1.0   # aten ops per instance on an eager profile

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


@dataclass
class PerfResult:
    """Prediction for one step (prefill of the whole prompt, or one decode token step)."""

    phase: str
    batch: int
    context: int
    cards: int
    layout: Layout
    step_ms: float
    tokens_per_s_per_card: float
    ttft_ms: float | None
    busiest_factor: float
    memory_gb: dict[str, float]
    ops: list[OpCost] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary (per-op times are per instance; ``total_ms`` = count x time)."""
        return {
            "phase": self.phase, "batch": self.batch, "context": self.context, "cards": self.cards,
            "layout": dataclasses.asdict(self.layout), "step_ms": self.step_ms,
            "tokens_per_s_per_card": self.tokens_per_s_per_card, "ttft_ms": self.ttft_ms,
            "busiest_device_factor": self.busiest_factor, "memory_gb": self.memory_gb,
            "ops": [{"name": o.name, "kind": o.kind, "count": o.count, "bound": o.bound,
                     "time_ms": o.time_ms, "total_ms": o.time_ms * o.count, "gflops": o.flops / 1e9,
                     "mbytes": o.bytes / 1e6} for o in self.ops],
        }


# ---- the model --------------------------------------------------------------------------------------
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


def simulate(config: MoGEConfig, hw: HardwareProfile, cards: int = 1, phase: str = "decode", batch: int = 1,
             context: int = 2048, weights: str = "bf16", router: str | None = None,
             layout: Layout | None = None, kv_cache: str | None = None, check_memory: bool = True) -> PerfResult:
    """Predict one inference step of ``config`` on ``cards`` cards of ``hw``.

    ``phase`` ``prefill`` processes ``batch`` prompts of ``context`` tokens (TTFT = step time);
    ``decode`` generates one token for each of ``batch`` sequences holding ``context`` cached tokens.
    ``weights`` ``int8`` means W8A8 (int8 weights and GEMM rate; embedding, head, router stay 16-bit).
    ``router`` (``moge``/``topk``; default the config's) sets the busiest-EP-rank factor.
    Raises :class:`MemoryFitError` when weights + KV cache + activations exceed a card's usable memory.
    """
    if phase not in ("prefill", "decode"):
        raise PerfError(f"phase must be prefill or decode, got {phase!r}")
    if weights not in WEIGHT_BYTES:
        raise PerfError(f"weights must be one of {sorted(WEIGHT_BYTES)}, got {weights!r}")
    if batch < 1 or context < 1:
        raise PerfError(f"batch and context must be >= 1, got batch={batch} context={context}")
    router = router or config.router
    if router not in ("moge", "topk"):
        raise PerfError(f"router must be moge or topk, got {router!r}")
    layout = layout or default_layout(config, cards)
    check_layout(config, layout, cards)
    c, L = config, layout

    wb = WEIGHT_BYTES[weights]
    ab = 4 if weights == "fp32" else 2                        # activation bytes (16-bit between GEMMs)
    dispatch_b = 1 if weights == "int8" else ab               # W8A8 dispatches int8 activations
    kvb = KV_BYTES[kv_cache or ("fp32" if weights == "fp32" else "bf16")]
    emb_b = 4 if weights == "fp32" else 2                     # embedding / head / router / norms precision
    gemm_tflops = hw.compute_tflops(weights)
    attn_tflops = hw.compute_tflops("fp32" if weights == "fp32" else "bf16")  # attention stays 16-bit
    bw = hw.mem_bw_gbs * hw.mem_eff * 1e9
    link = hw.link_bw_gbs * hw.comm_eff * 1e9
    lat_ms = hw.link_latency_us / 1e3

    h, hd = c.hidden_size, c.resolved_head_dim
    nq, nkv = c.num_attention_heads, c.num_key_value_heads
    q_dim, kv_dim = nq * hd, nkv * hd
    n, k, f, fs = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size
    n_dense = len(set(c.mlp_only_layers))
    n_moe = c.num_hidden_layers - n_dense

    s = context if phase == "prefill" else 1
    t_total = batch * s
    b_a = math.ceil(batch / L.attn_dp)                         # sequences on the busiest attention DP rank
    t_a = b_a * s                                              # its tokens
    t_sp = math.ceil(t_a / L.attn_tp)                          # sequence-parallel slice per card
    kv_heads_card = math.ceil(nkv / L.attn_tp)                 # KV heads replicate when TP > heads
    kv_len = context + (0 if phase == "prefill" else 1)
    keys_per_query = (s + 1) / 2 if phase == "prefill" else kv_len   # causal prefill: half on average
    # all tokens of a shared-expert TP group (it spans shared_tp cards = shared_tp/attn_tp DP ranks' slices)
    t_shared = min(t_total, t_sp * L.shared_tp)

    def gemm_ms(flops: float, rate_tflops: float, calls: float) -> float:
        # eager profiles run an operator as `calls` separate matmuls (e.g. one per active expert on a
        # CPU grouped_mm); with a measured curve each call runs at the rate of its own size
        if hw.matmul_curve and flops > 0:
            per = flops / max(calls, 1.0)
            return max(calls, 1.0) * per / (_interp_rate(hw.matmul_curve, per) * 1e9) * 1e3
        return flops / (rate_tflops * 1e12) * 1e3

    def launches(name: str, calls: float) -> float:
        return (eager_launches(name, calls) if hw.eager else 1) * hw.op_overhead_us / 1e3

    def compute(name: str, count: int, flops: float, nbytes: float, rate: float = gemm_tflops,
                kind: str = "gemm", calls: float = 1.0) -> OpCost:
        """``kind``: gemm (matmul rate), attn / experts (the measured curve of that operator if the profile
        has one), vector (element-wise)."""
        if kind == "gemm":
            cm = gemm_ms(flops, rate, calls if hw.eager else 1.0)
        elif kind == "attn" and hw.attn_curve and flops > 0:
            cm = flops / (_interp_rate(hw.attn_curve, flops) * 1e9) * 1e3
        elif kind == "experts" and hw.experts_curve and flops > 0:
            cm = flops / (_interp_rate(hw.experts_curve, flops) * 1e9) * 1e3
        elif kind == "experts":
            cm = gemm_ms(flops, rate, calls if hw.eager else 1.0)
        else:
            cm = flops / (rate * 1e12) * 1e3
        over = launches(name, calls)
        n_launch = eager_launches(name, calls)
        if hw.eager:
            # measured curves time whole calls, dispatch included: do not charge those launches twice
            if kind == "experts" and hw.experts_curve:
                over = 0.0
            elif kind == "gemm" and hw.matmul_curve:
                over = max(0.0, n_launch - calls) * hw.op_overhead_us / 1e3
            elif kind == "attn" and hw.attn_curve:
                over = max(0.0, n_launch - 1) * hw.op_overhead_us / 1e3
            elif kind == "vector":
                # un-fused element-wise code makes one pass over the tensor per eager op
                nbytes *= n_launch
        return OpCost(name, "compute", count, flops, nbytes, compute_ms=cm, memory_ms=nbytes / bw * 1e3,
                      overhead_ms=over, eager_launches=n_launch)

    def comm(name: str, count: int, nbytes: float, steps: int) -> OpCost:
        if steps <= 0 or nbytes <= 0:
            return OpCost(name, "comm", count)
        return OpCost(name, "comm", count, 0.0, nbytes, comm_ms=nbytes / link * 1e3 + steps * lat_ms)

    def ring(nbytes_full: float, ranks: int) -> tuple[float, int]:
        """Reduce-scatter or all-gather of a ``nbytes_full`` tensor over ``ranks``: each card sends
        (ranks-1)/ranks of it, in one step on a full mesh or ranks-1 ring steps otherwise."""
        if ranks <= 1:
            return 0.0, 0
        return nbytes_full * (ranks - 1) / ranks, 1 if hw.full_mesh else ranks - 1

    layers = c.num_hidden_layers
    ops: list[OpCost] = [compute("embed", 1, 0.0, t_a * h * emb_b * 2, kind="vector")]

    # attention block (every layer)
    ag = ring(t_a * h * ab, L.attn_tp)
    ops.append(compute("attn_norm", layers, 4 * t_sp * h, 2 * t_sp * h * ab, kind="vector"))
    ops.append(comm("attn_allgather", layers, *ag))
    qkv_out = (q_dim + 2 * kv_dim) / L.attn_tp
    ops.append(compute("qkv_proj", layers, 2 * t_a * h * qkv_out,
                       h * qkv_out * wb + t_a * (h + qkv_out) * ab, calls=3))
    ops.append(compute("rope", layers, 6 * t_a * (q_dim + kv_dim) / L.attn_tp,
                       2 * t_a * (q_dim + kv_dim) / L.attn_tp * ab, kind="vector"))
    kv_card = 2 * kv_heads_card * hd
    attn_bytes = b_a * kv_len * kv_card * kvb + 2 * t_a * q_dim / L.attn_tp * ab
    if phase == "prefill":
        attn_bytes += t_a * kv_card * kvb                        # writing the new cache
    ops.append(compute("attention", layers, 4 * t_a * keys_per_query * q_dim / L.attn_tp, attn_bytes,
                       rate=attn_tflops, kind="attn"))
    ops.append(compute("o_proj", layers, 2 * t_a * q_dim / L.attn_tp * h,
                       q_dim / L.attn_tp * h * wb + t_a * (q_dim / L.attn_tp + h) * ab))
    ops.append(comm("attn_reducescatter", layers, *ring(t_a * h * ab, L.attn_tp)))
    ops.append(compute("residual", 2 * layers, t_sp * h, 3 * t_sp * h * ab, kind="vector"))
    ops.append(compute("mlp_norm", layers, 4 * t_sp * h, 2 * t_sp * h * ab, kind="vector"))

    factor = 1.0
    if n_moe:
        ep, etp = L.expert_ep, L.expert_tp
        if router == "topk" and ep > 1:
            factor = expected_max_over_mean(n, k, ep, int(t_total))
        ops.append(compute("router", n_moe, 2 * t_sp * h * n, n * h * emb_b + t_sp * (h * ab + n * 4),
                           rate=attn_tflops))
        # tokens travel once to every EP rank holding >= 1 of their experts, to all of its expert-TP ranks
        if router == "moge" and c.groups % ep == 0:
            ranks_hit = float(ep)
        else:
            ranks_hit = ep * (1 - math.comb(n - n // ep, k) / math.comb(n, k)) if ep > 1 else 1.0
        remote = ranks_hit * (ep - 1) / ep
        a2a_rows = t_sp * remote * etp * factor                 # rows the busiest card receives
        a2a_steps = 0 if ep * etp == 1 else (1 if hw.full_mesh else ep * etp - 1)
        ops.append(comm("dispatch_all2all", n_moe, a2a_rows * h * dispatch_b, a2a_steps))
        pairs = t_total * k / ep * factor                       # token-expert pairs on the busiest EP rank
        experts_rank = n // ep
        # distinct experts the busiest rank must read: its pairs spread like balls into its expert bins
        # (small decode batches are weight-read bound, so top-K's extra pairs mean extra weights too)
        p_used = 1 - (1 - 1 / experts_rank) ** pairs if experts_rank > 1 else 1.0
        ops.append(compute("experts", n_moe, 2 * pairs * 3 * h * f / etp,
                           experts_rank * p_used * 3 * h * f / etp * wb + pairs * (2 * h + 3 * f / etp) * ab,
                           kind="experts", calls=2 * max(1.0, experts_rank * p_used)))
        if etp > 1:
            ops.append(comm("expert_tp_reduce", n_moe, *ring(pairs * h * ab, etp)))
        ops.append(comm("combine_all2all", n_moe, a2a_rows * h * ab, a2a_steps))
        if fs:
            ops.append(comm("shared_allgather", n_moe, *ring(t_shared * h * ab, L.shared_tp)))
            ops.append(compute("shared_expert", n_moe, 2 * t_shared * 3 * h * fs / L.shared_tp,
                               3 * h * fs / L.shared_tp * wb + t_shared * (2 * h + 3 * fs / L.shared_tp) * ab, calls=3))
            ops.append(comm("shared_reducescatter", n_moe, *ring(t_shared * h * ab, L.shared_tp)))
    if n_dense:
        fd = c.dense_intermediate_size
        ops.append(comm("mlp_allgather", n_dense, *ring(t_shared * h * ab, L.shared_tp)))
        ops.append(compute("dense_mlp", n_dense, 2 * t_shared * 3 * h * fd / L.shared_tp,
                           3 * h * fd / L.shared_tp * wb + t_shared * (2 * h + 3 * fd / L.shared_tp) * ab, calls=3))
        ops.append(comm("mlp_reducescatter", n_dense, *ring(t_shared * h * ab, L.shared_tp)))
    # logits only for each sequence's last position; vocab split over attention TP
    ops.append(compute("final_norm", 1, 4 * b_a * h, 2 * b_a * h * ab, kind="vector"))
    v_card = c.vocab_size / L.attn_tp
    ops.append(compute("lm_head", 1, 2 * b_a * h * v_card, h * v_card * emb_b + b_a * v_card * 4, rate=attn_tflops))

    step_ms = sum(o.time_ms * o.count for o in ops)
    tokens = t_total if phase == "prefill" else batch
    tps = tokens / (step_ms / 1e3) / cards

    # memory per card
    pc = param_counts(c)
    attn_w = pc["attention_per_layer"] / L.attn_tp * wb * layers + 2 * h * emb_b * layers
    moe_w = n_moe * ((n * h + n) * emb_b + n // L.expert_ep * pc["expert"] / L.expert_tp * wb
                     + pc["shared_expert"] / L.shared_tp * wb)
    dense_w = n_dense * 3 * h * c.dense_intermediate_size / L.shared_tp * wb
    embed_w = (pc["embedding"] + pc["lm_head"]) / L.attn_tp * emb_b
    weights_gb = (attn_w + moe_w + dense_w + embed_w) / 1e9
    kv_gb = b_a * kv_len * kv_card * kvb * layers / 1e9
    widest = max(qkv_out, 3 * fs / L.shared_tp if fs else 0, 3 * f / max(1, L.expert_tp) if n_moe else 0,
                 3 * c.dense_intermediate_size / L.shared_tp if n_dense else 0)
    rows = max(t_a, t_shared, (t_total * k / L.expert_ep * factor) if n_moe else 0)
    act_gb = (rows * (4 * h + widest) * ab + b_a * v_card * 4) / 1e9
    usable = hw.memory_gb * hw.usable_memory_frac
    mem = {"weights": weights_gb, "kv_cache": kv_gb, "activations": act_gb,
           "total": weights_gb + kv_gb + act_gb, "usable": usable}
    if check_memory and mem["total"] > usable:
        raise MemoryFitError(
            f"does not fit: needs {mem['total']:.1f} GB per card (weights {weights_gb:.1f} + KV cache "
            f"{kv_gb:.1f} + activations {act_gb:.1f}) but each {hw.name} card has {usable:.1f} GB usable "
            f"({hw.memory_gb:g} GB x {hw.usable_memory_frac:g}); use more cards, --weights int8, or a "
            f"smaller --batch / --context")
    return PerfResult(phase, batch, context, cards, L, step_ms, tps, step_ms if phase == "prefill" else None,
                      factor, mem, ops)


def format_result(res: PerfResult, title: str = "") -> str:
    """Human-readable table of the per-operator breakdown and the totals."""
    lines = []
    if title:
        lines.append(title)
    lines.append(f"layout: {res.layout.describe()}  ({res.cards} cards)")
    lines.append(f"{'operator':<22}{'count':>6}{'bound':>10}{'GFLOP':>10}{'MB':>10}{'ms each':>10}{'ms total':>10}{'share':>7}")
    for o in res.ops:
        tot = o.time_ms * o.count
        lines.append(f"{o.name:<22}{o.count:>6}{o.bound:>10}{o.flops / 1e9:>10.3f}{o.bytes / 1e6:>10.2f}"
                     f"{o.time_ms:>10.4f}{tot:>10.3f}{tot / res.step_ms:>7.1%}")
    m = res.memory_gb
    lines.append(f"memory per card: weights {m['weights']:.2f} GB + KV {m['kv_cache']:.2f} GB + activations "
                 f"{m['activations']:.2f} GB = {m['total']:.2f} GB of {m['usable']:.1f} GB usable")
    if res.busiest_factor != 1.0:
        lines.append(f"top-K busiest EP rank factor (E[max/mean load]): {res.busiest_factor:.3f}")
    unit = "TTFT" if res.phase == "prefill" else "time per output token step"
    lines.append(f"{res.phase}: batch {res.batch}, context {res.context}: {unit} {res.step_ms:.2f} ms, "
                 f"{res.tokens_per_s_per_card:,.1f} tokens/s per card")
    return "\n".join(lines)


# ---- model lookup -----------------------------------------------------------------------------------
# Extra model shapes for comparisons. ``dense-72b`` is a Qwen2.5-72B-like dense model (the paper's 72B
# dense baseline is not published; this is the closest public shape): every layer a dense SwiGLU MLP.
SIM_MODELS: dict[str, dict] = {
    "dense-72b": dict(vocab_size=152064, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, num_experts=1,
                      num_experts_per_tok=1, num_groups=1, moe_intermediate_size=1,
                      shared_expert_intermediate_size=0, mlp_only_layers=list(range(80)),
                      intermediate_size=29568),
}


def resolve_model(name: str) -> MoGEConfig:
    """A config from a preset name (:data:`moge.config.PRESETS` or :data:`SIM_MODELS`), a checkpoint directory or a config.json path."""
    from ..config import PRESETS, ConfigError, resolve_config

    if name in SIM_MODELS:
        return MoGEConfig(**SIM_MODELS[name])
    try:
        return resolve_config(name)
    except ConfigError:
        raise ConfigError(f"unknown model {name!r}; use a preset {sorted(PRESETS) + sorted(SIM_MODELS)}, a "
                          f"checkpoint directory or a config.json path") from None
