"""Hardware profiles for the performance model: peak rates, memory, interconnect and efficiency factors.

A profile's *achievable* rates are peak x efficiency: ``matmul_eff`` for GEMMs and attention,
``mem_eff`` for HBM/DRAM traffic, ``comm_eff`` for link bandwidth. ``op_overhead_us`` is a fixed cost
per operator launch (kernel launch / framework dispatch); ``eager`` profiles count every PyTorch op of
an eager forward pass, fused ones count one launch per operator of the simulator.

Sources are noted per profile. Figures marked ASSUMPTION are not from a vendor datasheet.
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


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator card (or a CPU) as the performance model sees it."""

    name: str
    description: str
    bf16_tflops: float             # dense peak, 16-bit floating point
    int8_tops: float | None        # dense peak, int8 (None: no int8 rate; int8 weights run at bf16 rate)
    fp32_tflops: float             # peak used for fp32 weights (CPU runs)
    memory_gb: float               # device memory capacity (GB = 1e9 bytes)
    mem_bw_gbs: float              # peak memory bandwidth, GB/s
    link_bw_gbs: float             # per-card, per-direction bandwidth available to collectives, GB/s
    link_latency_us: float         # fixed latency per collective step
    matmul_eff: float = 0.6        # achievable fraction of peak compute
    mem_eff: float = 0.7           # achievable fraction of peak memory bandwidth
    comm_eff: float = 0.7          # achievable fraction of link bandwidth
    op_overhead_us: float = 0.0    # fixed cost per operator launch
    usable_memory_frac: float = 0.9  # the rest: runtime, allocator fragmentation, workspace
    eager: bool = False            # count eager PyTorch ops (True) or fused operators (False)
    full_mesh: bool = True         # direct links to every peer: a collective is one latency step
    # measured (flops per matmul, achieved GFLOP/s) points; when present the GEMM rate is interpolated
    # from them instead of peak x matmul_eff (small GEMMs on a CPU run far below the large-GEMM rate)
    matmul_curve: tuple[tuple[float, float], ...] = field(default=())
    # measured (flops per attention call, achieved GFLOP/s) of scaled-dot-product attention, likewise
    attn_curve: tuple[tuple[float, float], ...] = field(default=())
    # measured (expert-matmul flops per call, achieved GFLOP/s) of the whole routed-experts operator
    experts_curve: tuple[tuple[float, float], ...] = field(default=())
    source: str = ""

    def compute_tflops(self, weights: str) -> float:
        """Achievable dense GEMM rate (TFLOP/s) for the given weight precision."""
        if weights == "int8" and self.int8_tops:
            peak = self.int8_tops
        elif weights == "fp32":
            peak = self.fp32_tflops
        else:
            peak = self.bf16_tflops
        return peak * self.matmul_eff

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["matmul_curve"] = [list(p) for p in self.matmul_curve]
        d["attn_curve"] = [list(p) for p in self.attn_curve]
        d["experts_curve"] = [list(p) for p in self.experts_curve]
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


# Efficiency factors of the Ascend profiles: ONE set, used for every paper comparison (docs/simulator.md).
# matmul_eff 0.5: GEMMs at ~half of the INT8 peak, typical of well-tuned large GEMMs (45-60% MFU); chosen
#   a priori, and it also reproduces the paper's prefill figure.
# mem_eff 0.4: the one CALIBRATED factor. A priori 0.7 predicts Pangu Pro MoE decode at batch 456 35% too
#   fast; 0.4 (swept in steps of 0.05 against the three Pangu Pro MoE numbers only) absorbs what the model
#   does not represent in decode: paged int8-KV attention kernels with dequantisation, sampling and
#   scheduling. The dense-72B numbers were NOT used to set it (held out).
# comm_eff 0.7 of the (assumed) HCCS bandwidth; 30 us per collective and 10 us per fused operator are
#   typical small-message collective / kernel-launch costs. All ASSUMPTIONS, not measured on an Ascend.
_ASCEND_EFF = dict(matmul_eff=0.5, mem_eff=0.4, comm_eff=0.7, link_latency_us=30.0, op_overhead_us=10.0)

PROFILES: dict[str, HardwareProfile] = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOPS dense BF16, 1979 TOPS dense INT8, 67 TFLOPS FP32,
    # 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s total (450 GB/s per direction).
    # Efficiencies and latencies: ASSUMPTIONS (typical cuBLAS/NCCL figures, not calibrated).
    "h100": HardwareProfile("h100", "NVIDIA H100 SXM5 80GB", 989.0, 1979.0, 67.0, 80.0, 3350.0, 450.0, 15.0,
                            matmul_eff=0.6, mem_eff=0.8, comm_eff=0.7, op_overhead_us=5.0,
                            source="NVIDIA H100 datasheet; efficiencies assumed"),
    # NVIDIA H200 SXM datasheet: same compute as H100, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "h200": HardwareProfile("h200", "NVIDIA H200 SXM 141GB", 989.0, 1979.0, 67.0, 141.0, 4800.0, 450.0, 15.0,
                            matmul_eff=0.6, mem_eff=0.8, comm_eff=0.7, op_overhead_us=5.0,
                            source="NVIDIA H200 datasheet; efficiencies assumed"),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS BF16, 624 TOPS INT8, 19.5 TFLOPS FP32,
    # 2,039 GB/s HBM2e, NVLink 3 600 GB/s total (300 GB/s per direction).
    "a100": HardwareProfile("a100", "NVIDIA A100 SXM4 80GB", 312.0, 624.0, 19.5, 80.0, 2039.0, 300.0, 15.0,
                            matmul_eff=0.6, mem_eff=0.8, comm_eff=0.7, op_overhead_us=5.0,
                            source="NVIDIA A100 datasheet; efficiencies assumed"),
    # Huawei Atlas 800I A2 (one Ascend 910B-class NPU per card): ~256 TFLOPS FP16 / 512 TOPS INT8 and
    # 64 GB HBM per card (vendor figures, quoted in the spec). HBM bandwidth 1.6 TB/s: ASSUMPTION
    # (the figure commonly reported for the 910B; not in the spec). HCCS full mesh 392 GB/s per card
    # bidirectional -> 196 GB/s per direction: ASSUMPTION (commonly reported 910B HCCS figure).
    "ascend-800i-a2": HardwareProfile("ascend-800i-a2", "Huawei Atlas 800I A2 (Ascend 910B NPU, 64GB)",
                                      256.0, 512.0, 64.0, 64.0, 1600.0, 196.0, **_ASCEND_EFF,
                                      source="vendor figures (spec s.7); HBM and HCCS bandwidth assumed"),
    # Huawei Atlas 300I Duo inference card (two Ascend 310P3 chips, counted as one card): 280 TOPS INT8,
    # 140 TFLOPS FP16, 96 GB LPDDR4X at 408 GB/s total (vendor datasheet); cards talk over PCIe 4.0 x16,
    # ~32 GB/s per direction nominal, ring collectives over the PCIe switch. Efficiencies as for the 800I A2 (ASSUMPTION).
    "ascend-300i-duo": HardwareProfile("ascend-300i-duo", "Huawei Atlas 300I Duo (2x Ascend 310P3, 96GB)",
                                       140.0, 280.0, 35.0, 96.0, 408.0, 32.0, **_ASCEND_EFF, full_mesh=False,
                                       source="Atlas 300I Duo datasheet; efficiencies assumed"),
    # Fallback for this machine when no calibration file exists: deliberately conservative guesses
    # (ASSUMPTIONS) for a small shared 2-core VM. Run `moge simulate calibrate` to measure real numbers.
    "local-cpu": HardwareProfile("local-cpu", "this machine's CPU (built-in conservative fallback)",
                                 0.05, None, 0.05, _system_memory_gb(), 5.0, 5.0, 1.0,
                                 matmul_eff=1.0, mem_eff=1.0, comm_eff=1.0, op_overhead_us=10.0,
                                 usable_memory_frac=0.5, eager=True,
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
    except (OSError, json.JSONDecodeError) as e:
        raise HardwareError(f"cannot read hardware profile {path}: {e}") from None
    return HardwareProfile.from_dict(d)


def get_profile(name: str, calibration: str | Path | None = None, **overrides) -> HardwareProfile:
    """The named profile, or a JSON profile file path; ``local-cpu`` prefers the calibrated file.

    ``calibration`` overrides where the calibrated ``local-cpu`` profile is looked for. ``overrides``
    replace fields (e.g. ``mem_bw_gbs=...`` for what-if studies).
    """
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
