"""Operator-level performance model of MoGE / dense decoder inference: step time, throughput, memory.

Ranks are chips (:mod:`moge.sim.hardware`); a card's figures sum its chips. Every operator of one
decoder layer is costed on the *busiest* chip as
``max(flops / achievable compute, bytes / achievable bandwidth of its kernel kind) + launches x per-op
overhead``; collectives as in :mod:`moge.sim.collectives` (latency by algorithm and link tier,
bandwidth by message size). Operators run back to back (no compute/communication overlap), so the
step time is ``layers x layer + embedding + LM head``.

Parallel layout (H2P, docs/design.md section 7.3), over ranks: attention DP x TP (tokens of a DP rank are
sequence-split between attention TP ranks around the projections, so the attention all-reduce is a
reduce-scatter + all-gather pair); routed experts TP x EP (each EP rank owns whole groups); the shared
expert (or the dense MLP of a dense layer) TP over ``shared_tp`` ranks. Under top-K routing the busiest
EP rank gets ``E[max/mean load]`` times the mean expert work (:mod:`moge.sim.imbalance`); under MoGE 1.

Multi-token prediction (:class:`MTP`, decode only): each step verifies ``1 + depth`` tokens per sequence
with the main model and drafts ``depth`` tokens with the predictor (``eh_proj`` + one decoder layer +
the shared head, run ``depth`` times); it yields ``1 + a + ... + a^depth`` tokens per sequence for a
per-token acceptance rate ``a``, and the time per output token is the step over that.

Shape names: B sequences, S tokens per sequence in this step (prompt length for prefill, 1 + MTP depth
for decode), T = B*S tokens, H hidden, N routed experts, K experts per token, F expert width, Fs shared
width, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..config import PRESETS, ConfigError, MoGEConfig, resolve_config
from .hardware import HardwareProfile
from .layout import Layout, PerfError, check_layout, default_layout, param_counts
from .ops import EAGER_LAUNCHES, Coster, OpCost, Step, eager_launches, layer_ops


WEIGHT_BYTES = {"bf16": 2, "int8": 1, "fp32": 4}
KV_BYTES = {"bf16": 2, "int8": 1, "fp32": 4}

def default_kv_cache(weights: str) -> str:
    """The KV-cache precision when none is given: int8 with W8A8 (as the paper's setup), fp32 with
    fp32 weights, else bf16. ``perf``, ``paper`` and ``search`` all use this one rule."""
    return {"int8": "int8", "fp32": "fp32"}.get(weights, "bf16")


class MemoryFitError(PerfError):
    """The model, KV cache and activations do not fit in a chip's memory."""


@dataclass(frozen=True)
class MTP:
    """Multi-token prediction for decode: ``depth`` drafted tokens per step, each accepted with
    probability ``acceptance`` given the previous one was."""
    depth: int = 1
    acceptance: float = 0.85

    def __post_init__(self) -> None:
        if self.depth < 1 or not 0.0 <= self.acceptance <= 1.0:
            raise PerfError(f"MTP needs depth >= 1 and acceptance in [0, 1], got {self.depth}, {self.acceptance}")

    @property
    def tokens_per_step(self) -> float:
        """Expected output tokens per sequence and step: ``1 + a + ... + a^depth``."""
        return sum(self.acceptance ** i for i in range(self.depth + 1))


@dataclass
class PerfResult:
    """Prediction for one step (prefill of the whole prompt, or one decode step)."""

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
    ranks: int = 1
    tokens_per_step: float = 0.0     # output tokens of the whole batch per step (decode)
    tpot_ms: float | None = None     # time per output token of one sequence (decode; = step without MTP)
    mtp: MTP | None = None

    def share(self, *names: str) -> float:
        """Fraction of the step spent in the named operators."""
        return sum(o.time_ms * o.count for o in self.ops if o.name in names) / self.step_ms

    def to_dict(self) -> dict:
        """JSON-ready summary (per-op times are per instance; ``total_ms`` = count x time)."""
        return {
            "phase": self.phase, "batch": self.batch, "context": self.context, "cards": self.cards,
            "ranks": self.ranks, "layout": dataclasses.asdict(self.layout), "step_ms": self.step_ms,
            "tpot_ms": self.tpot_ms, "tokens_per_step": self.tokens_per_step,
            "tokens_per_s_per_card": self.tokens_per_s_per_card, "ttft_ms": self.ttft_ms,
            "mtp": dataclasses.asdict(self.mtp) if self.mtp else None,
            "busiest_device_factor": self.busiest_factor, "memory_gb": self.memory_gb,
            "ops": [{"name": o.name, "kind": o.kind, "count": o.count, "bound": o.bound, "algorithm": o.algorithm,
                     "time_ms": o.time_ms, "total_ms": o.time_ms * o.count, "gflops": o.flops / 1e9,
                     "mbytes": o.bytes / 1e6} for o in self.ops],
        }


def simulate(config: MoGEConfig, hw: HardwareProfile, cards: int = 1, phase: str = "decode", batch: int = 1,
             context: int = 2048, weights: str = "bf16", router: str | None = None,
             layout: Layout | None = None, kv_cache: str | None = None, check_memory: bool = True,
             mtp: MTP | None = None) -> PerfResult:
    """Predict one inference step of ``config`` on ``cards`` cards (``cards x chips_per_card`` ranks).

    ``phase`` ``prefill`` processes ``batch`` prompts of ``context`` tokens (TTFT = step time);
    ``decode`` generates for each of ``batch`` sequences holding ``context`` cached tokens (with
    ``mtp``, verifying and drafting several tokens per step). ``weights`` ``int8`` means W8A8 (int8
    weights and GEMM rate; embedding, head, router stay 16-bit); ``kv_cache`` defaults to
    :func:`default_kv_cache`. ``router`` (``moge``/``topk``; default the config's) sets the busiest-EP-rank
    factor. ``layout`` is over ranks. Raises :class:`MemoryFitError` when weights + KV cache +
    activations exceed a chip's usable memory.
    """
    if phase not in ("prefill", "decode"):
        raise PerfError(f"phase must be prefill or decode, got {phase!r}")
    if weights not in WEIGHT_BYTES:
        raise PerfError(f"weights must be one of {sorted(WEIGHT_BYTES)}, got {weights!r}")
    kv_cache = kv_cache or default_kv_cache(weights)
    if kv_cache not in KV_BYTES:
        raise PerfError(f"kv_cache must be one of {sorted(KV_BYTES)}, got {kv_cache!r}")
    if batch < 1 or context < 1 or cards < 1:
        raise PerfError(f"batch, context and cards must be >= 1, got batch={batch} context={context} cards={cards}")
    if mtp is not None and phase != "decode":
        raise PerfError("multi-token prediction applies to decode only")
    router = router or config.router
    if router not in ("moge", "topk"):
        raise PerfError(f"router must be moge or topk, got {router!r}")
    ranks = cards * hw.chips_per_card
    layout = layout or default_layout(config, ranks)
    check_layout(config, layout, ranks)
    if ranks > 1 and hw.host_link_gbs <= 0:
        raise PerfError(f"hardware {hw.name} has no interconnect (host_link_gbs = 0): use one rank")
    c, L = config, layout
    cost = Coster(hw, weights, phase)

    wb = WEIGHT_BYTES[weights]
    ab = 4 if weights == "fp32" else 2                        # activation bytes (16-bit between GEMMs)
    dispatch_b = 1 if weights == "int8" else ab               # W8A8 dispatches int8 activations
    kvb = KV_BYTES[kv_cache]
    emb_b = 4 if weights == "fp32" else 2                     # embedding / head / router / norms precision
    h = c.hidden_size
    n_dense = len(set(c.mlp_only_layers))
    n_moe = c.num_hidden_layers - n_dense

    s = context if phase == "prefill" else 1 + (mtp.depth if mtp else 0)
    b_a = math.ceil(batch / L.attn_dp)
    t_a = b_a * s
    t_sp = math.ceil(t_a / L.attn_tp)                          # tokens padded to a multiple of TP
    kv_len = context if phase == "prefill" else context + s
    st = Step(batch, s, kv_len, batch * s, b_a, t_a, t_sp, min(batch * s, t_sp * L.shared_tp), phase == "prefill")
    sizes = dict(router=router, ab=ab, wb=wb, kvb=kvb, emb_b=emb_b, dispatch_b=dispatch_b)

    ops: list[OpCost] = [cost.compute("embed", 1, 0.0, t_a * h * emb_b * 2, kind="vector")]
    main_ops, factor = layer_ops(cost, c, L, st, c.num_hidden_layers, n_moe, n_dense, **sizes)
    ops += main_ops
    # logits for each sequence's last position (every verified position with MTP); vocab split over TP
    v_rank = c.vocab_size / L.attn_tp
    rows = b_a * (s if phase == "decode" else 1)
    ops.append(cost.compute("final_norm", 1, 4 * rows * h, 2 * rows * h * ab, kind="vector"))
    ops.append(cost.compute("lm_head", 1, 2 * rows * h * v_rank, h * v_rank * emb_b + rows * v_rank * 4, bits16=True, wbytes=h * v_rank * emb_b))
    if mtp:
        # the predictor, once per drafted token: cat[enorm(embed), hnorm(h)] -> eh_proj [H, 2H] -> one
        # decoder layer (MoE, like the main model's) -> shared head, on one token per sequence
        dst = Step(batch, 1, context + s, batch, b_a, b_a, math.ceil(b_a / L.attn_tp),
                    min(batch, math.ceil(b_a / L.attn_tp) * L.shared_tp), False)
        d = mtp.depth
        ops.append(cost.compute("mtp_norms_eh_proj", d, 2 * b_a * 2 * h * h / L.attn_tp,
                                2 * h * h / L.attn_tp * wb + b_a * 3 * h * ab,
                                wbytes=2 * h * h / L.attn_tp * wb))
        ops.append(cost.collective("mtp_eh_allgather", d, "all_gather", b_a * h * ab, L.attn_tp))
        mtp_ops, _ = layer_ops(cost, c, L, dst, d, d if n_moe else 0, 0 if n_moe else d, prefix="mtp_", **sizes)
        ops += mtp_ops
        ops.append(cost.compute("mtp_head", d, 2 * b_a * h * v_rank, h * v_rank * emb_b + b_a * v_rank * 4, bits16=True, wbytes=h * v_rank * emb_b))

    step_ms = sum(o.time_ms * o.count for o in ops)
    per_seq = mtp.tokens_per_step if mtp else 1.0
    tokens = batch * s if phase == "prefill" else batch * per_seq
    tps = tokens / (step_ms / 1e3) / cards
    mem = _memory(c, hw, L, weights, wb, emb_b, kvb, b_a, kv_len, t_a, st.t_shared, st.t_total, factor, n_moe,
                  n_dense, mtp)
    if check_memory and mem["total"] > mem["usable"]:
        raise MemoryFitError(
            f"does not fit: needs {mem['total']:.1f} GB per chip (weights {mem['weights']:.1f} + KV cache "
            f"{mem['kv_cache']:.1f} + activations {mem['activations']:.1f}) but each {hw.name} chip has "
            f"{mem['usable']:.1f} GB usable ({hw.memory_gb:g} GB x {hw.usable_memory_frac:g}); use more cards, "
            f"--weights int8, or a smaller --batch / --context")
    return PerfResult(phase, batch, context, cards, L, step_ms, tps, step_ms if phase == "prefill" else None,
                      factor, mem, ops, ranks=ranks, tokens_per_step=tokens,
                      tpot_ms=step_ms / per_seq if phase == "decode" else None, mtp=mtp)


def _memory(c: MoGEConfig, hw: HardwareProfile, L: Layout, weights: str, wb: int, emb_b: int, kvb: int, b_a: int,
            kv_len: int, t_a: int, t_shared: int, t_total: int, factor: float, n_moe: int, n_dense: int,
            mtp: MTP | None) -> dict[str, float]:
    """Memory per chip (GB): weights as sharded by the layout, KV cache, activation workspace."""
    pc = param_counts(c)
    h, hd = c.hidden_size, c.resolved_head_dim
    f, fs = c.moe_intermediate_size, c.shared_expert_intermediate_size
    layers = c.num_hidden_layers
    attn_layer = pc["attention_per_layer"] / L.attn_tp * wb + 2 * h * emb_b
    moe_layer = ((c.num_experts * h + c.num_experts) * emb_b + c.num_experts // L.expert_ep * pc["expert"]
                 / L.expert_tp * wb + pc["shared_expert"] / L.shared_tp * wb)
    dense_layer = 3 * h * c.dense_intermediate_size / L.shared_tp * wb
    embed_w = (pc["embedding"] + pc["lm_head"]) / L.attn_tp * emb_b
    weights_b = attn_layer * layers + moe_layer * n_moe + dense_layer * n_dense + embed_w
    kv_layers = layers
    if mtp:
        weights_b += mtp.depth * (attn_layer + (moe_layer if n_moe else dense_layer) + 2 * h * h / L.attn_tp * wb)
        kv_layers += mtp.depth
    kv_gb = b_a * kv_len * 2 * math.ceil(c.num_key_value_heads / L.attn_tp) * hd * kvb * kv_layers / 1e9
    qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd / L.attn_tp
    widest = max(qkv_out, 3 * fs / L.shared_tp if fs else 0, 3 * f / max(1, L.expert_tp) if n_moe else 0,
                 3 * c.dense_intermediate_size / L.shared_tp if n_dense else 0)
    rows = max(t_a, t_shared, (t_total * c.num_experts_per_tok / L.expert_ep * factor) if n_moe else 0)
    ab = 4 if weights == "fp32" else 2
    act_gb = (rows * (4 * h + widest) * ab + b_a * c.vocab_size / L.attn_tp * 4) / 1e9
    w_gb = weights_b / 1e9
    return {"weights": w_gb, "kv_cache": kv_gb, "activations": act_gb, "total": w_gb + kv_gb + act_gb,
            "usable": hw.memory_gb * hw.usable_memory_frac}


def format_result(res: PerfResult, title: str = "") -> str:
    """Human-readable table of the per-operator breakdown and the totals."""
    lines = [title] if title else []
    lines.append(f"layout: {res.layout.describe()}  ({res.ranks} ranks on {res.cards} cards)")
    lines.append(f"{'operator':<24}{'count':>6}{'bound':>10}{'GFLOP':>10}{'MB':>10}{'ms each':>10}{'ms total':>10}"
                 f"{'share':>7}  algorithm")
    for o in res.ops:
        tot = o.time_ms * o.count
        lines.append(f"{o.name:<24}{o.count:>6}{o.bound:>10}{o.flops / 1e9:>10.3f}{o.bytes / 1e6:>10.2f}"
                     f"{o.time_ms:>10.4f}{tot:>10.3f}{tot / res.step_ms:>7.1%}  {o.algorithm}")
    m = res.memory_gb
    lines.append(f"memory per chip: weights {m['weights']:.2f} GB + KV {m['kv_cache']:.2f} GB + activations "
                 f"{m['activations']:.2f} GB = {m['total']:.2f} GB of {m['usable']:.1f} GB usable")
    if res.busiest_factor != 1.0:
        lines.append(f"top-K busiest EP rank factor (E[max/mean load]): {res.busiest_factor:.3f}")
    if res.phase == "prefill":
        lines.append(f"prefill: batch {res.batch} x {res.context} tokens: TTFT {res.step_ms:.2f} ms, "
                     f"{res.tokens_per_s_per_card:,.1f} tokens/s per card")
    else:
        extra = (f" (MTP depth {res.mtp.depth}, acceptance {res.mtp.acceptance:g}: step {res.step_ms:.2f} ms, "
                 f"{res.mtp.tokens_per_step:.2f} tokens per sequence and step)" if res.mtp else "")
        lines.append(f"decode: batch {res.batch}, context {res.context}: time per output token {res.tpot_ms:.2f} ms"
                     f"{extra}, {res.tokens_per_s_per_card:,.1f} tokens/s per card")
    return "\n".join(lines)


# ---- model lookup -----------------------------------------------------------------------------------
# Dense baselines for comparisons. The paper's 72B and 32B dense baselines are not published; these are
# the closest public shapes (Qwen2.5-72B and Qwen2.5-32B): every layer a dense SwiGLU MLP.
_DENSE = dict(num_experts=1, num_experts_per_tok=1, num_groups=1, moe_intermediate_size=1,
              shared_expert_intermediate_size=0, head_dim=128, max_position_embeddings=131072, vocab_size=152064)
SIM_MODELS: dict[str, dict] = {
    "dense-72b": dict(_DENSE, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      mlp_only_layers=list(range(80)), intermediate_size=29568),
    "dense-32b": dict(_DENSE, hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                      mlp_only_layers=list(range(64)), intermediate_size=27648),
}


def resolve_model(name: str) -> MoGEConfig:
    """A config from a preset name (:data:`moge.config.PRESETS` or :data:`SIM_MODELS`), a checkpoint directory or a config.json path."""

    if name in SIM_MODELS:
        return MoGEConfig(**SIM_MODELS[name])
    try:
        return resolve_config(name)
    except ConfigError:
        raise ConfigError(f"unknown model {name!r}; use a preset {sorted(PRESETS) + sorted(SIM_MODELS)}, a "
                          f"checkpoint directory or a config.json path") from None
