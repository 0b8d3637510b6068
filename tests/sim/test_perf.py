"""Performance model: parameter counts, monotonic sanity, memory check, paper comparison, search."""

import dataclasses

import pytest

from moge.config import get_config
from moge.sim.hardware import PROFILES, HardwareError, get_profile
from moge.sim.paper import paper_comparison
from moge.sim.perf import (Layout, MemoryFitError, PerfError, default_layout, param_counts, resolve_model,
                           simulate)

A2 = PROFILES["ascend-800i-a2"]
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
    times = [simulate(PANGU, dataclasses.replace(A2, mem_bw_gbs=bw, link_bw_gbs=bw / 8), 4, phase, batch,
                      2048, "int8", kv_cache="int8", check_memory=False).step_ms
             for bw in (400, 800, 1600, 3200, 6400)]
    assert all(a >= b for a, b in zip(times, times[1:]))
    assert times[0] > times[-1]


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
    with pytest.raises(MemoryFitError, match=r"does not fit: needs [0-9.]+ GB per card \(weights"):
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


def test_paper_points_within_20_percent():
    # a regression guard on the once-calibrated 800I A2 profile (docs/simulator.md)
    rows = paper_comparison(A2)
    assert len(rows) == 6
    for r in rows:
        assert abs(r["error"]) < 0.20, r


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
