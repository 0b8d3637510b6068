"""Performance model: parameter counts, monotonic sanity, memory check, chips and cards, MTP, dispatch."""

import dataclasses

import pytest

from moge.config import get_config
from moge.sim.hardware import PROFILES, HardwareError, get_profile
from moge.sim.perf import (MTP, Layout, MemoryFitError, PerfError, default_kv_cache, default_layout, param_counts,
                           resolve_model, simulate)

A2 = PROFILES["ascend-800i-a2"]
DUO = PROFILES["ascend-300i-duo"]
PANGU = get_config("pangu-pro-moe-72b")


def test_72b_parameter_counts():
    pc = param_counts(PANGU)
    assert pc["total"] / 1e9 == pytest.approx(71.99, abs=0.01)
    assert pc["activated"] / 1e9 == pytest.approx(16.50, abs=0.01)


@pytest.mark.parametrize("name", ["debug", "tiny", "pangu-pro-moe-72b"])
def test_param_counts_match_the_model(name):
    from moge.model import count_parameters
    cfg = get_config(name)
    pc, ref = param_counts(cfg), count_parameters(cfg)
    assert (pc["total"], pc["activated"]) == (ref["total"], ref["activated"])


def test_dense_model_counts():
    pc = param_counts(resolve_model("dense-72b"))
    assert pc["total"] == pc["activated"]
    assert 72.0e9 < pc["total"] < 73.5e9  # Qwen2.5-72B-like shape: ~72.7B


@pytest.mark.parametrize("phase,batch", [("decode", 1), ("decode", 64), ("decode", 512), ("prefill", 2)])
def test_more_bandwidth_never_slower(phase, batch):
    times = [simulate(PANGU, dataclasses.replace(hw, mem_bw_gbs=bw, host_link_gbs=bw / 8, cross_link_gbs=bw / 16),
                      4, phase, batch, 2048, "int8", kv_cache="int8", check_memory=False).step_ms
             for hw in (A2, DUO) for bw in (100, 400, 800, 1600, 3200, 6400)]
    times = [times[:6], times[6:]]
    for t in times:
        assert all(a >= b for a, b in zip(t, t[1:])) and t[0] > t[-1]


@pytest.mark.parametrize("phase,batch", [("decode", 1), ("decode", 256), ("prefill", 2)])
def test_more_experts_per_token_never_faster(phase, batch):
    times = []
    for k in (8, 16, 24, 32):  # 8 groups, K' = 1..4
        cfg = PANGU.replace(num_experts_per_tok=k, num_groups=8)
        times.append(simulate(cfg, A2, 4, phase, batch, 2048, "int8", kv_cache="int8", check_memory=False).step_ms)
    assert all(a <= b for a, b in zip(times, times[1:]))
    assert times[0] < times[-1]


def test_more_cards_not_slower_for_same_total_batch():
    for phase, batch in (("prefill", 8), ("decode", 512)):
        t4 = simulate(PANGU, A2, 4, phase, batch, 2048, "int8", kv_cache="int8", check_memory=False).step_ms
        t8 = simulate(PANGU, A2, 8, phase, batch, 2048, "int8", kv_cache="int8", check_memory=False).step_ms
        assert t8 <= t4


def test_topk_busiest_device_is_slower_than_moge():
    moge = simulate(PANGU, A2, 4, "decode", 64, 2048, "int8", "moge", kv_cache="int8")
    topk = simulate(PANGU, A2, 4, "decode", 64, 2048, "int8", "topk", kv_cache="int8")
    assert moge.busiest_factor == 1.0 and topk.busiest_factor > 1.05
    assert topk.step_ms > moge.step_ms


def test_memory_check_refuses_impossible_fit():
    with pytest.raises(MemoryFitError, match=r"does not fit: needs [0-9.]+ GB per chip \(weights"):
        simulate(PANGU, A2, 1, "decode", 1, 2048, "bf16")
    # the same model fits on 4 cards in int8
    res = simulate(PANGU, A2, 4, "decode", 1, 2048, "int8")
    assert res.memory_gb["total"] < res.memory_gb["usable"]
    assert 17 < res.memory_gb["weights"] < 20   # 72B int8 over 4 cards (+16-bit embedding/head)


def test_layout_errors_are_clear():
    with pytest.raises(PerfError, match="attention TP 3"):
        simulate(PANGU, A2, 4, layout=Layout(1, 3, 1, 4, 4))
    with pytest.raises(PerfError, match="experts cannot be split"):
        default_layout(PANGU, 6, attn_tp=2, expert_ep=3)
    assert default_layout(PANGU, 8) == Layout(2, 4, 2, 4, 8)   # the paper's H2P layout at 8 cards
    with pytest.raises(HardwareError, match="unknown hardware"):
        get_profile("tpu-v9")


def test_local_cpu_profile_file_is_used(tmp_path):
    prof = dataclasses.replace(PROFILES["local-cpu"], mem_bw_gbs=123.0, op_overhead_us=4.0,
                               matmul_curve=((1e6, 10.0), (1e9, 50.0)))
    path = tmp_path / "local-cpu.json"
    import json
    path.write_text(json.dumps(prof.to_dict()))
    hw = get_profile("local-cpu", calibration=path)
    assert hw.mem_bw_gbs == 123.0 and hw.matmul_curve == ((1e6, 10.0), (1e9, 50.0))
    assert get_profile("local-cpu", calibration=tmp_path / "missing.json") == PROFILES["local-cpu"]
    r = simulate(get_config("debug"), hw, 1, "prefill", 1, 64, "fp32")
    assert r.step_ms > 0 and r.ttft_ms == r.step_ms


def test_cards_are_made_of_chips():
    # the 300I Duo: 4 cards = 8 ranks, the paper's H2P layout over chips
    res = simulate(PANGU, DUO, 4, "decode", 80, 2048, "int8")
    assert res.ranks == 8 and res.layout == Layout(2, 4, 2, 4, 8)
    assert res.tokens_per_s_per_card == pytest.approx(80 / (res.step_ms / 1e3) / 4)
    # per-chip memory: 72B int8 weights over 8 chips of 48 GB
    assert 9 < res.memory_gb["weights"] < 11 and res.memory_gb["usable"] == pytest.approx(48 * 0.9)
    assert DUO.card_memory_gb == 96
    # two chips of one card share its PCIe port: halving the chips per card (same port) is faster
    solo = dataclasses.replace(DUO, chips_per_card=1, chips_per_host=4)
    assert simulate(PANGU, solo, 8, "decode", 80, 2048, "int8").step_ms < res.step_ms


def test_kv_cache_default_is_one_rule():
    assert default_kv_cache("int8") == "int8" and default_kv_cache("bf16") == "bf16"
    assert default_kv_cache("fp32") == "fp32"
    a = simulate(PANGU, A2, 4, "decode", 64, 2048, "int8")
    b = simulate(PANGU, A2, 4, "decode", 64, 2048, "int8", kv_cache="int8")
    assert a.step_ms == b.step_ms and a.memory_gb == b.memory_gb


def test_mtp_tokens_per_step_and_time_per_token():
    base = simulate(PANGU, A2, 4, "decode", 256, 2048, "int8")
    mtp = simulate(PANGU, A2, 4, "decode", 256, 2048, "int8", mtp=MTP(1, 0.8))
    assert MTP(1, 0.8).tokens_per_step == pytest.approx(1.8) and MTP(2, 0.5).tokens_per_step == pytest.approx(1.75)
    assert mtp.step_ms > base.step_ms                        # verify 2 tokens + draft one
    assert mtp.tpot_ms == pytest.approx(mtp.step_ms / 1.8)
    assert mtp.tokens_per_s_per_card == pytest.approx(256 * 1.8 / (mtp.step_ms / 1e3) / 4)
    assert any(o.name.startswith("mtp_") for o in mtp.ops) and not any(o.name.startswith("mtp_") for o in base.ops)
    # with nothing accepted, MTP only costs time
    assert simulate(PANGU, A2, 4, "decode", 256, 2048, "int8", mtp=MTP(1, 0.0)).tpot_ms > base.tpot_ms
    with pytest.raises(PerfError, match="decode only"):
        simulate(PANGU, A2, 4, "prefill", 2, 2048, "int8", mtp=MTP())
    with pytest.raises(PerfError, match="acceptance"):
        MTP(1, 1.5)


def test_moge_dispatch_is_allgather_topk_is_alltoall():
    moge = {o.name for o in simulate(PANGU, A2, 4, "decode", 64, 2048, "int8", "moge").ops}
    topk = {o.name for o in simulate(PANGU, A2, 4, "decode", 64, 2048, "int8", "topk").ops}
    assert {"dispatch_allgather", "combine_reducescatter"} <= moge and not any("all2all" in n for n in moge)
    assert "shared_allgather" not in moge                    # shared expert TP over the same ranks: fused
    assert {"dispatch_all2all", "combine_all2all", "shared_allgather"} <= topk


def test_efficiency_per_memory_technology_and_kernel_kind():
    assert DUO.memory_eff("gemm") == 0.95 and DUO.memory_eff("attention") == 0.89   # the paper's kernels
    assert A2.memory_eff("attention") == A2.attn_mem_eff != A2.memory_eff("gemm")
    assert dataclasses.replace(A2, mem_eff=0.5).memory_eff("attention") == 0.5
    with pytest.raises(HardwareError, match="memory technology"):
        dataclasses.replace(A2, mem_tech="sram")
