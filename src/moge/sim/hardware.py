"""Hardware profiles for the performance model: chips, cards, links, and efficiencies with their sources.

A *rank* is one chip. A card holds ``chips_per_card`` chips (the Ascend 300I Duo: two, sharing one PCIe
port and with no chip-to-chip fabric); one host (one CPU's domain) drives ``chips_per_host`` chips.
Compute and memory figures are per chip; per-card figures are the sum over the card's chips. Links are
given per tier, as *achievable* per-direction bandwidth of one card's port (its chips share it) and a
latency per message step:

* ``card``  -- between the chips of one card (``card_link_gbs=None``: no fabric, through the host port),
* ``host``  -- between cards of one host (HCCS / NVLink full mesh, or PCIe through the host),
* ``cross`` -- across hosts (RoCE between servers, or PCIe + the CPU-to-CPU path between CPU domains).

Memory efficiency (the achievable fraction of peak bandwidth) is looked up per memory technology and
per kernel kind (``gemm``: weight-streaming matmuls, ``attention``: KV-cache reads, ``vector``:
element-wise ops) in :data:`MEMORY_EFFICIENCY`, each entry with its source; a profile may override one
kind (``attn_mem_eff``) or all (``mem_eff``). ``matmul_eff`` is the achievable fraction of peak compute.
``op_overhead_us`` is a fixed cost per operator launch; ``eager`` profiles count every PyTorch op of an
eager forward pass, fused ones one launch per simulator operator.

Every number is marked with where it comes from: a vendor sheet, the paper (docs/design.md section 7), FITTED
(by :mod:`moge.sim.fit`, to the points named there), or ASSUMPTION.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoGEError


class HardwareError(MoGEError, ValueError):
    """Unknown hardware profile or an unreadable calibrated profile."""


KERNEL_KINDS = ("gemm", "attention", "vector")

# memory technology -> ({kernel kind: achievable fraction of peak bandwidth}, source)
MEMORY_EFFICIENCY: dict[str, tuple[dict[str, float], str]] = {
    "lpddr4x": ({"gemm": 0.95, "attention": 0.89, "vector": 0.89},
                "paper (docs/design.md s.7.2): the 300I Duo kernels reach up to 95% (grouped matmul) and above 89% "
                "(attention) of the memory bandwidth; vector ops ASSUMED at the attention figure"),
    "hbm": ({"gemm": 0.95, "attention": 0.89, "vector": 0.89},
            "ASSUMPTION: the paper's kernels (same team, same fused-operator design) reach on HBM the "
            "fractions they reach on LPDDR4X; the 800I A2's attention fraction is FITTED instead (fit.py)"),
    "hbm-gpu": ({"gemm": 0.85, "attention": 0.8, "vector": 0.85},
                "ASSUMPTION: typical fractions of HBM peak reached by cuBLAS GEMV / FlashAttention decode "
                "/ fused element-wise kernels; not measured here (no GPU lent)"),
    "ddr": ({"gemm": 1.0, "attention": 1.0, "vector": 1.0},
            "measured: the local-cpu profile's bandwidth is itself a measured copy rate"),
}


@dataclass(frozen=True)
class HardwareProfile:
    """One chip (a rank), the card and host it sits in, and the links between them."""

    name: str
    description: str
    bf16_tflops: float             # dense peak per chip, 16-bit floating point
    int8_tops: float | None        # dense peak per chip, int8 (None: int8 weights run at the bf16 rate)
    fp32_tflops: float             # peak used for fp32 weights (CPU runs)
    memory_gb: float               # device memory per chip (GB = 1e9 bytes)
    mem_bw_gbs: float              # peak memory bandwidth per chip, GB/s
    mem_tech: str = "ddr"          # key of MEMORY_EFFICIENCY
    chips_per_card: int = 1
    chips_per_host: int = 1
    card_link_gbs: float | None = None   # on-card chip-to-chip fabric per chip (None: via the host port)
    card_link_us: float = 0.0
    host_link_gbs: float = 0.0     # achievable per-direction bandwidth of one card's port inside a host
    host_link_us: float = 0.0      # latency per message step inside a host
    host_full_mesh: bool = False   # every card reaches every other directly: a collective is one step
    cross_link_gbs: float = 0.0    # achievable per-direction bandwidth per card across hosts
    cross_link_us: float = 0.0
    matmul_eff: float = 0.6        # achievable fraction of peak compute for GEMMs
    gmm_eff: float | None = None   # ... for the routed experts' grouped matmul (None: as matmul_eff)
    attn_eff: float | None = None  # ... for attention (None: as matmul_eff)
    mem_eff: float | None = None   # overrides MEMORY_EFFICIENCY for every kernel kind (what-if, CPU)
    attn_mem_eff: float | None = None  # overrides the attention kind only
    op_overhead_us: float = 0.0    # fixed cost per operator launch
    usable_memory_frac: float = 0.9  # the rest: runtime, allocator fragmentation, workspace
    eager: bool = False            # count eager PyTorch ops (True) or fused operators (False)
    # measured (flops per matmul, achieved GFLOP/s) points; when present the GEMM rate is interpolated
    # from them instead of peak x matmul_eff (small GEMMs on a CPU run far below the large-GEMM rate)
    matmul_curve: tuple[tuple[float, float], ...] = field(default=())
    # measured (flops per attention call, achieved GFLOP/s) of scaled-dot-product attention, likewise
    attn_curve: tuple[tuple[float, float], ...] = field(default=())
    # measured (expert-matmul flops per call, achieved GFLOP/s) of the whole routed-experts operator
    experts_curve: tuple[tuple[float, float], ...] = field(default=())
    # eager profiles: per-op cost on the decode path, when fitted apart (None: op_overhead_us)
    decode_op_overhead_us: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.mem_tech not in MEMORY_EFFICIENCY:
            raise HardwareError(f"unknown memory technology {self.mem_tech!r}; choose one of {sorted(MEMORY_EFFICIENCY)}")
        if self.chips_per_card < 1 or self.chips_per_host < self.chips_per_card or self.chips_per_host % self.chips_per_card:
            raise HardwareError(f"chips_per_host ({self.chips_per_host}) must be a multiple of chips_per_card "
                                f"({self.chips_per_card}) and both >= 1")

    # (fields, lower bound, strictly above it?, upper bound): what a physical chip can have
    _POSITIVE = ("bf16_tflops", "fp32_tflops", "memory_gb", "mem_bw_gbs")
    _OPTIONAL_POSITIVE = ("int8_tops", "card_link_gbs")
    _NON_NEGATIVE = ("card_link_us", "host_link_gbs", "host_link_us", "cross_link_gbs", "cross_link_us",
                     "op_overhead_us")
    _FRACTIONS = ("matmul_eff", "gmm_eff", "attn_eff", "mem_eff", "attn_mem_eff", "usable_memory_frac")

    def _check_numbers(self) -> None:
        """:class:`HardwareError` naming the field for a non-number, NaN/inf, or a value no chip has
        (a zero bandwidth would divide by zero, a negative one give negative times)."""
        import math

        def number(name: str, v) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise HardwareError(f"hardware profile field {name} must be a finite number, got {v!r}")
            return float(v)

        for name in self._POSITIVE + self._OPTIONAL_POSITIVE:
            v = getattr(self, name)
            if v is None and name in self._OPTIONAL_POSITIVE:
                continue
            if number(name, v) <= 0:
                raise HardwareError(f"hardware profile field {name} must be > 0, got {v!r}")
        for name in self._NON_NEGATIVE:
            if number(name, getattr(self, name)) < 0:
                raise HardwareError(f"hardware profile field {name} must be >= 0, got {getattr(self, name)!r}")
        for name in self._FRACTIONS:
            v = getattr(self, name)
            if v is not None and not 0 < number(name, v) <= 1:
                raise HardwareError(f"hardware profile field {name} must be in (0, 1], got {v!r}")
        if self.decode_op_overhead_us is not None and number("decode_op_overhead_us", self.decode_op_overhead_us) < 0:
            raise HardwareError(f"hardware profile field decode_op_overhead_us must be >= 0, "
                                f"got {self.decode_op_overhead_us!r}")
        for name in ("chips_per_card", "chips_per_host"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise HardwareError(f"hardware profile field {name} must be an integer, got {v!r}")

    def compute_tflops(self, weights: str, kind: str = "gemm") -> float:
        """Achievable dense rate (TFLOP/s per chip) for the weight precision and kernel kind
        (``gemm``, ``gmm``: grouped matmul of the routed experts, ``attention``)."""
        if weights == "int8" and self.int8_tops and kind in ("gemm", "gmm"):
            peak = self.int8_tops
        elif weights == "fp32":
            peak = self.fp32_tflops
        else:
            peak = self.bf16_tflops
        eff = {"attention": self.attn_eff, "gmm": self.gmm_eff}.get(kind)
        return peak * (self.matmul_eff if eff is None else eff)

    def memory_eff(self, kind: str) -> float:
        """Achievable fraction of peak memory bandwidth for a kernel kind (``gemm``/``attention``/``vector``)."""
        if self.mem_eff is not None:
            return self.mem_eff
        if kind == "attention" and self.attn_mem_eff is not None:
            return self.attn_mem_eff
        return MEMORY_EFFICIENCY[self.mem_tech][0][kind]

    def memory_gbs(self, kind: str) -> float:
        """Achievable memory bandwidth per chip (GB/s) for a kernel kind."""
        return self.mem_bw_gbs * self.memory_eff(kind)

    @property
    def card_memory_gb(self) -> float:
        return self.memory_gb * self.chips_per_card

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("matmul_curve", "attn_curve", "experts_curve"):
            d[key] = [list(p) for p in getattr(self, key)]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("matmul_curve", "attn_curve", "experts_curve"):
            kw[key] = tuple(tuple(map(float, p)) for p in kw.get(key, ()))
        try:
            return cls(**kw)
        except TypeError as e:
            raise HardwareError(f"bad hardware profile: {e}") from None


def _system_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 8.0


# ---- Ascend: what is known, what is assumed, what is fitted ------------------------------------------
# FITTED by `moge simulate fit` (fit.py) to the five 800I A2 calibration points of paper.py ONLY (decode
# MoE batch 456, decode 72B dense batch 228, prefill of MoE / 72B dense / 32B dense); the held-out points
# (800I A2 batch-1 decodes, 32B dense batch 336, MTP, every 300I Duo point) played no part. A test
# re-runs the fit and checks these constants:
#   attn_mem_eff: decode attention reaches this fraction of the (assumed) 1.6 TB/s HBM peak, i.e. it
#     absorbs what the model leaves out of large-batch decode (paged int8-KV attention, scheduling);
#   matmul_eff: GEMMs reach this fraction of the (assumed) 512 TOPS INT8 peak;
#   gmm_eff: the routed experts' grouped matmul reaches this fraction (set by the MoE prefill).
A2_FITTED = dict(attn_mem_eff=0.227, matmul_eff=0.491, gmm_eff=0.267)
# Per-event costs, set a priori (not fitted: no calibration point is sensitive to them):
# ASSUMPTION 15 us per message step on HCCS / NVLink and 25 us on PCIe through a host (small-message
# collective latencies typical of NCCL/HCCL on such links), 60 us across hosts / CPU domains,
# 5 us per fused-operator launch (graph-mode kernel launch).
_ASCEND_EVENTS = dict(op_overhead_us=5.0)

PROFILES: dict[str, HardwareProfile] = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOPS dense BF16, 1979 TOPS dense INT8, 67 TFLOPS FP32,
    # 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s total (450 GB/s per direction), 8 GPUs per HGX host;
    # across hosts 400 Gb/s InfiniBand per GPU (50 GB/s). Efficiencies and latencies: ASSUMPTIONS
    # (typical cuBLAS/NCCL figures), not calibrated: no GPU was lent to check them.
    "h100": HardwareProfile("h100", "NVIDIA H100 SXM5 80GB", 989.0, 1979.0, 67.0, 80.0, 3350.0, "hbm-gpu",
                            chips_per_host=8, host_link_gbs=0.7 * 450.0, host_link_us=10.0, host_full_mesh=True,
                            cross_link_gbs=0.8 * 50.0, cross_link_us=20.0, matmul_eff=0.6, op_overhead_us=5.0,
                            source="NVIDIA H100 datasheet; efficiencies and latencies assumed"),
    # NVIDIA H200 SXM datasheet: same compute as H100, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "h200": HardwareProfile("h200", "NVIDIA H200 SXM 141GB", 989.0, 1979.0, 67.0, 141.0, 4800.0, "hbm-gpu",
                            chips_per_host=8, host_link_gbs=0.7 * 450.0, host_link_us=10.0, host_full_mesh=True,
                            cross_link_gbs=0.8 * 50.0, cross_link_us=20.0, matmul_eff=0.6, op_overhead_us=5.0,
                            source="NVIDIA H200 datasheet; efficiencies and latencies assumed"),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS BF16, 624 TOPS INT8, 19.5 TFLOPS FP32,
    # 2,039 GB/s HBM2e, NVLink 3 600 GB/s total (300 GB/s per direction).
    "a100": HardwareProfile("a100", "NVIDIA A100 SXM4 80GB", 312.0, 624.0, 19.5, 80.0, 2039.0, "hbm-gpu",
                            chips_per_host=8, host_link_gbs=0.7 * 300.0, host_link_us=10.0, host_full_mesh=True,
                            cross_link_gbs=0.8 * 25.0, cross_link_us=20.0, matmul_eff=0.6, op_overhead_us=5.0,
                            source="NVIDIA A100 datasheet; efficiencies and latencies assumed"),
    # Huawei Atlas 800I A2: one NPU per card, 8 per server, 64 GB HBM each (docs/design.md s.7.2). No
    # public compute or bandwidth figures: peak 256 TFLOPS FP16 / 512 TOPS INT8 is the figure the paper
    # quotes (it belongs to the 800T A2 training card) and is ASSUMED, as is 1.6 TB/s HBM (the figure
    # commonly reported for the 910B; the calibration points cannot tell it apart from the attention
    # efficiency, see docs/simulator.md); the GEMM, grouped-matmul and attention-memory efficiencies are
    # FITTED (A2_FITTED above). HCCS full mesh
    # inside the server: ASSUMPTION 196 GB/s per direction per NPU (the commonly reported 910B figure)
    # at 0.7 achievable; across servers 200 GbE RoCE per NPU (25 GB/s) at 0.8 achievable (ASSUMPTION).
    "ascend-800i-a2": HardwareProfile("ascend-800i-a2", "Huawei Atlas 800I A2 (one NPU per card, 64GB HBM)",
                                      256.0, 512.0, 64.0, 64.0, 1600.0, "hbm",
                                      chips_per_card=1, chips_per_host=8, host_link_gbs=0.7 * 196.0,
                                      host_link_us=15.0, host_full_mesh=True, cross_link_gbs=0.8 * 25.0,
                                      cross_link_us=60.0, **A2_FITTED, **_ASCEND_EVENTS,
                                      source="docs/design.md s.7.2 (peak as quoted by the paper, assumed); HBM 1.6 TB/s "
                                             "assumed; GEMM, grouped-matmul and attention-memory efficiencies fitted"),
    # Huawei Atlas 300I Duo (docs/design.md s.7.2, public reports): two chips per card, 48 GB LPDDR4X and
    # ~204 GB/s per chip (96 GB, ~408 GB/s per card), 280 TOPS INT8 per card (140 per chip; FP16 half of it),
    # one PCIe 4.0 x16 port per card shared by both chips, no chip-to-chip fabric; one host CPU drives
    # four chips (the paper's reason for attention DP2). PCIe 4.0 x16: 31.5 GB/s per direction nominal,
    # ASSUMED 0.8 achievable (25 GB/s); between CPU domains the same PCIe port plus the CPU-to-CPU link,
    # ASSUMED no slower but with a higher latency. Memory efficiencies: the paper's own (lpddr4x entry);
    # GEMM and grouped-matmul efficiencies: the 800I A2's fitted values (same cube-unit kernels), not
    # re-fitted here: nothing is fitted to the 300I Duo.
    "ascend-300i-duo": HardwareProfile("ascend-300i-duo", "Huawei Atlas 300I Duo (2 chips per card, 2x48GB LPDDR4X)",
                                       70.0, 140.0, 35.0, 48.0, 204.0, "lpddr4x", chips_per_card=2,
                                       chips_per_host=4, card_link_gbs=None, host_link_gbs=25.0, host_link_us=25.0,
                                       host_full_mesh=False, cross_link_gbs=25.0, cross_link_us=60.0,
                                       matmul_eff=A2_FITTED["matmul_eff"], gmm_eff=A2_FITTED["gmm_eff"],
                                       **_ASCEND_EVENTS,
                                       source="docs/design.md s.7.2 (public reports); memory efficiencies from the paper; "
                                              "GEMM efficiencies carried over from the 800I A2 fit"),
    # Fallback for this machine when no calibration file exists: deliberately conservative guesses
    # (ASSUMPTIONS) for a small shared 2-core VM. Run `moge simulate calibrate` to measure real numbers.
    "local-cpu": HardwareProfile("local-cpu", "this machine's CPU (built-in conservative fallback)",
                                 0.05, None, 0.05, _system_memory_gb(), 5.0, "ddr",
                                 matmul_eff=1.0, op_overhead_us=10.0, usable_memory_frac=0.5, eager=True,
                                 source="built-in guesses; replace with `moge simulate calibrate`"),
}


def default_calibration_path() -> Path:
    """``$XDG_CACHE_HOME/moge/local-cpu.json`` (``~/.cache/moge/local-cpu.json`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moge" / "local-cpu.json"


def load_profile_file(path: str | Path) -> HardwareProfile:
    """A profile saved as JSON (e.g. by ``moge simulate calibrate``)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HardwareError(f"cannot read hardware profile {path}: {e}") from None
    if not isinstance(d, dict):
        raise HardwareError(f"hardware profile {path} is not a JSON object")
    return HardwareProfile.from_dict(d)


def get_profile(name: str, calibration: str | Path | None = None, **overrides) -> HardwareProfile:
    """The named profile, or a JSON profile file path; ``local-cpu`` prefers the calibrated file.

    ``calibration`` overrides where the calibrated ``local-cpu`` profile is looked for. ``overrides``
    replace fields (e.g. ``mem_bw_gbs=...`` for what-if studies).
    """
    if calibration is not None and not Path(calibration).is_file():
        raise HardwareError(f"--calibration {calibration}: no such file (write one with moge simulate calibrate)")
    if name.endswith(".json") or os.path.sep in name:
        prof = load_profile_file(name)
    elif name == "local-cpu":
        path = Path(calibration) if calibration else default_calibration_path()
        prof = load_profile_file(path) if path.is_file() else PROFILES["local-cpu"]
    elif name in PROFILES:
        prof = PROFILES[name]
    else:
        raise HardwareError(f"unknown hardware {name!r}; choose one of {sorted(PROFILES)} or a profile .json")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(HardwareProfile)}
    if unknown:
        raise HardwareError(f"unknown hardware profile field(s) {sorted(unknown)}")
    return dataclasses.replace(prof, **overrides) if overrides else prof
