"""Collective model: tiers a group spans, shared card ports, algorithm choice by message size."""

import dataclasses
import math

import pytest

from moge.sim.collectives import all_to_all_s, collective_s, span, tier
from moge.sim.hardware import PROFILES

A2, DUO, H100 = PROFILES["ascend-800i-a2"], PROFILES["ascend-300i-duo"], PROFILES["h100"]


def test_span_and_shared_ports():
    assert span(A2, 4) == [("host", 4)] and span(A2, 16) == [("host", 8), ("cross", 2)]
    # the 300I Duo: no chip-to-chip fabric, so a card's two chips talk like two cards; 4 chips per CPU
    assert span(DUO, 2) == [("host", 2)] and span(DUO, 8) == [("host", 4), ("cross", 2)]
    assert tier(DUO, "host").bw == pytest.approx(25e9 / 2)          # one x16 port for two chips
    assert tier(A2, "host").bw == pytest.approx(0.7 * 196e9) and tier(A2, "host").full_mesh
    fabric = dataclasses.replace(DUO, card_link_gbs=50.0, card_link_us=2.0)
    assert span(fabric, 8) == [("card", 2), ("host", 2), ("cross", 2)] and tier(fabric, "card").bw == 50e9


def test_alpha_beta_by_algorithm():
    n, t = 1e6, tier(DUO, "host")
    sec, algo = collective_s(DUO, "all_gather", n, 4)
    assert algo == "recursive" and sec == pytest.approx(2 * t.latency + n * 3 / 4 / t.bw)   # log2(4) steps
    sec, algo = collective_s(A2, "all_gather", n, 4)
    t = tier(A2, "host")
    assert algo == "direct" and sec == pytest.approx(t.latency + n * 3 / 4 / t.bw)           # full mesh: 1 step
    odd = dataclasses.replace(DUO, chips_per_host=6)
    sec, algo = collective_s(odd, "reduce_scatter", n, 6)                                     # not a power of 2
    t = tier(odd, "host")
    assert algo == "ring" and sec == pytest.approx(5 * t.latency + n * 5 / 6 / t.bw)
    assert collective_s(A2, "all_gather", n, 1) == (0.0, "none")


def test_all_reduce_small_messages_go_one_shot_on_a_full_mesh():
    t = tier(A2, "host")
    sec, algo = collective_s(A2, "all_reduce", 1e3, 4)
    assert algo == "one-shot" and sec == pytest.approx(t.latency + 1e3 * 3 / t.bw)
    big, algo_big = collective_s(A2, "all_reduce", 1e9, 4)
    assert algo_big == "rs+ag(direct)" and big == pytest.approx(2 * (t.latency + 1e9 * 3 / 4 / t.bw))


def test_hierarchical_wins_for_large_messages_across_tiers():
    slow = dataclasses.replace(DUO, cross_link_gbs=2.0)
    small = collective_s(slow, "all_gather", 1e3, 8)
    large = collective_s(slow, "all_gather", 1e9, 8)
    assert large[1].startswith("hierarchical")
    flat = 3 * tier(slow, "cross").latency + 1e9 * 7 / 8 / tier(slow, "cross").bw
    assert large[0] < flat
    assert small[0] < large[0]
    # the two stages: 4 chips on the fast tier, 2 on the slow one with a quarter of the data
    h, c = tier(slow, "host"), tier(slow, "cross")
    want = (2 * h.latency + 1e9 * 3 / 4 / h.bw) + (c.latency + 1e9 / 4 / 2 / c.bw)
    assert large[0] == pytest.approx(want)


def test_all_to_all_levels():
    b = 1e5
    sec, algo = all_to_all_s(A2, b, 4)
    t = tier(A2, "host")
    assert algo == "direct" and sec == pytest.approx(3 * b / t.bw + t.latency)
    sec, algo = all_to_all_s(DUO, b, 8)
    h, c = tier(DUO, "host"), tier(DUO, "cross")
    assert algo == "pairwise" and sec == pytest.approx(3 * b / h.bw + 3 * h.latency + 4 * b / c.bw + 4 * c.latency)
    assert math.isclose(all_to_all_s(DUO, 0.0, 8)[0], 0.0)
