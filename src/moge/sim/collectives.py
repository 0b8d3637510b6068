"""Collective communication cost: latency by algorithm and link tier, bandwidth by message size.

A group of ranks (chips) spans link tiers (see :mod:`moge.sim.hardware`): ``card`` (chips of one card),
``host`` (cards of one host) and ``cross`` (several hosts). Every chip of an SPMD step runs its group's
collective at the same time, so the chips of a card share that card's port: the bandwidth per chip is
the port's bandwidth divided by the card's chips (unless the card has its own chip-to-chip fabric).

Each collective is costed with the alpha-beta model ``steps x latency + bytes / bandwidth`` for every
algorithm that applies, and the fastest is taken:

* ``direct`` (one step; full-mesh tiers only): every rank exchanges with every peer at once;
* ``ring`` (``p - 1`` steps), ``recursive`` doubling/halving (``log2 p`` steps, p a power of two);
* ``hierarchical`` (groups spanning two tiers): the slow tier moves only ``1/p_inner`` of the data,
  then the fast tier finishes; each stage picks its own best algorithm.

Small messages are latency bound (few steps win), large ones bandwidth bound (the hierarchical form
wins by keeping traffic off the slow tier). All-to-all runs pairwise (``p - 1`` steps, or one on a full
mesh); bytes to peers in another tier cross that tier's link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .hardware import HardwareProfile

TIERS = ("card", "host", "cross")


@dataclass(frozen=True)
class Tier:
    """One link tier as a collective sees it: per-chip bandwidth (bytes/s), latency (s), full mesh."""
    name: str
    bw: float
    latency: float
    full_mesh: bool


def tier(hw: HardwareProfile, name: str) -> Tier:
    """The per-chip view of link tier ``name`` of ``hw`` (port bandwidth shared by the card's chips)."""
    share = hw.chips_per_card
    if name == "card" and hw.card_link_gbs is not None:
        return Tier(name, hw.card_link_gbs * 1e9, hw.card_link_us * 1e-6, True)
    if name in ("card", "host"):
        # no on-card fabric: chips of one card talk through the host port like chips of two cards
        return Tier(name, hw.host_link_gbs * 1e9 / share, hw.host_link_us * 1e-6, hw.host_full_mesh)
    return Tier(name, hw.cross_link_gbs * 1e9 / share, hw.cross_link_us * 1e-6, False)


def span(hw: HardwareProfile, ranks: int) -> list[tuple[str, int]]:
    """Tiers a group of ``ranks`` consecutive chips crosses, innermost first, with the members each
    level joins: e.g. ``[("host", 4), ("cross", 2)]`` for 8 chips on two 4-chip hosts. A card level
    without its own fabric is folded into the host level (its chips talk through the same port)."""
    in_card = min(ranks, hw.chips_per_card)
    in_host = min(ranks, hw.chips_per_host)
    levels = [("card", in_card), ("host", in_host // in_card), ("cross", ranks // in_host)]
    if hw.card_link_gbs is None:
        levels = [("host", in_host)] + levels[2:]
    return [(name, m) for name, m in levels if m > 1]


def _flat(kind: str, nbytes: float, p: int, t: Tier) -> tuple[float, str]:
    """Seconds and algorithm of a gather/scatter-type collective over ``p`` ranks of one tier."""
    if p <= 1:
        return 0.0, "none"
    sent = nbytes * (p - 1) / p
    options = [((p - 1) * t.latency + sent / t.bw, "ring")]
    if p & (p - 1) == 0:
        options.append((math.log2(p) * t.latency + sent / t.bw, "recursive"))
    if t.full_mesh:
        options.append((t.latency + sent / t.bw, "direct"))
    best = min(options)
    if kind == "all_reduce":  # reduce-scatter + all-gather; one-shot direct exchange on a full mesh
        twice = (2 * best[0], f"rs+ag({best[1]})")
        if t.full_mesh:
            return min(twice, (t.latency + nbytes * (p - 1) / t.bw, "one-shot"))
        return twice
    return best


def collective_s(hw: HardwareProfile, kind: str, nbytes: float, ranks: int) -> tuple[float, str]:
    """Seconds and algorithm of one collective of a ``nbytes`` tensor (the gathered / reduced size)
    over a group of ``ranks`` chips. ``kind``: ``all_gather``, ``reduce_scatter``, ``all_reduce``."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0, "none"
    levels = span(hw, ranks)
    slow = tier(hw, levels[-1][0])
    options = [_flat(kind, nbytes, ranks, Tier(slow.name, min(tier(hw, n).bw for n, _ in levels),
                                                max(tier(hw, n).latency for n, _ in levels),
                                                all(tier(hw, n).full_mesh for n, _ in levels)))]
    if len(levels) >= 2:
        # two stages: inner levels (fast) and the outermost level (slow) on 1/p_inner of the data
        p_outer = levels[-1][1]
        p_inner = ranks // p_outer
        inner = Tier("inner", min(tier(hw, n).bw for n, _ in levels[:-1]),
                     max(tier(hw, n).latency for n, _ in levels[:-1]), all(tier(hw, n).full_mesh for n, _ in levels[:-1]))
        a = _flat(kind, nbytes, p_inner, inner)
        b = _flat(kind, nbytes / p_inner, p_outer, slow)
        options.append((a[0] + b[0], f"hierarchical({a[1]}+{b[1]})"))
    return min(options)


def all_to_all_s(hw: HardwareProfile, bytes_per_peer: float, ranks: int) -> tuple[float, str]:
    """Seconds of an all-to-all in which every chip sends ``bytes_per_peer`` to each of ``ranks - 1``
    peers: pairwise, level by level (one step per level on a full mesh, one per peer otherwise)."""
    if ranks <= 1 or bytes_per_peer <= 0:
        return 0.0, "none"
    total, reached, steps = 0.0, 1, 0
    levels = span(hw, ranks)
    for name, members in levels:
        t = tier(hw, name)
        peers = reached * members - reached        # peers first reached at this level
        n_steps = 1 if t.full_mesh else peers
        total += peers * bytes_per_peer / t.bw + n_steps * t.latency
        steps += n_steps
        reached *= members
    return total, "direct" if steps == len(levels) else "pairwise"
