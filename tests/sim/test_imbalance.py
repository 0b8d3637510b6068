"""Imbalance study: Monte Carlo and exact modes against brute-force enumeration written here."""

import itertools
import json
import math

import numpy as np
import pytest

from moge.sim.imbalance import (ImbalanceInputError, draw_device_loads, exact_imbalance,
                                expected_max_over_mean, imbalance_study, load_frequencies, summarize)


def brute_force(n, k, d, tokens, p=None, router="topk"):
    """Enumerate every ordered draw of every token (successive sampling without replacement)."""
    p = np.full(n, 1 / n) if p is None else np.asarray(p, float)
    g = n // d

    def token_draws():
        groups = [list(range(n))] if router == "topk" else [list(range(i * g, i * g + g)) for i in range(d)]
        per_group = []
        for items in groups:
            kk = k if router == "topk" else k // d
            opts = []
            for seq in itertools.permutations(items, kk):
                prob, left = 1.0, sum(p[i] for i in items)
                for e in seq:
                    prob *= p[e] / left
                    left -= p[e]
                opts.append((seq, prob))
            per_group.append(opts)
        for combo in itertools.product(*per_group):
            yield [e for seq, _ in combo for e in seq], math.prod(pr for _, pr in combo)

    draws = list(token_draws())
    p_imb = e_is = e_mm = 0.0
    for batch in itertools.product(draws, repeat=tokens):
        prob = math.prod(pr for _, pr in batch)
        loads = [0] * d
        for experts, _ in batch:
            for e in experts:
                loads[e // g] += 1
        spread = max(loads) - min(loads)
        p_imb += prob * (spread > 0)
        e_is += prob * spread / tokens
        e_mm += prob * max(loads) / (tokens * k / d)
    return p_imb, e_is, e_mm


@pytest.mark.parametrize("n,k,d,t", [(4, 2, 2, 2), (6, 2, 2, 3), (8, 4, 4, 1), (6, 3, 3, 2)])
def test_exact_mode_matches_enumeration(n, k, d, t):
    p_imb, e_is, e_mm = brute_force(n, k, d, t)
    ex = exact_imbalance(n, k, d, t, "topk")
    assert ex["p_imbalanced"] == pytest.approx(p_imb, abs=1e-9)
    assert ex["mean_is"] == pytest.approx(e_is, abs=1e-9)
    assert ex["mean_max_over_mean_load"] == pytest.approx(e_mm, abs=1e-9)


def test_known_small_case_values():
    # 4 experts, 2 devices, K=2: a token is split 1+1 with prob 4/6, else 2+0 or 0+2 (1/6 each).
    # Two tokens: balanced iff both split, or one 2+0 and the other 0+2 -> 16/36 + 2/36 = 1/2.
    ex = exact_imbalance(4, 2, 2, 2)
    assert ex["p_imbalanced"] == pytest.approx(0.5)
    assert brute_force(4, 2, 2, 2)[0] == pytest.approx(0.5)


@pytest.mark.parametrize("p", [None, [0.4, 0.3, 0.2, 0.1]])
def test_monte_carlo_within_statistical_tolerance(p):
    n, k, d, t, trials = 4, 2, 2, 2, 40_000
    p_imb, e_is, _ = brute_force(n, k, d, t, p)
    freqs = None if p is None else np.array(p)
    s = imbalance_study(n, k, d, [t], trials, seed=1, freqs_N=freqs)["topk"][str(t)]
    se_p = math.sqrt(p_imb * (1 - p_imb) / trials)
    assert abs(s["p_imbalanced"] - p_imb) < 5 * se_p
    se_is = s["std_is"] / math.sqrt(trials)
    assert abs(s["mean_is"] - e_is) < 5 * se_is
    if p is not None:  # the weighted exact mode agrees with the enumeration too
        ex = exact_imbalance(n, k, d, t, "topk", freqs)
        assert ex["p_imbalanced"] == pytest.approx(p_imb, abs=1e-9)
        assert ex["mean_is"] == pytest.approx(e_is, abs=1e-9)


def test_weighted_draw_frequencies():
    # the Gumbel top-K draw picks experts with the successive-sampling marginals, and every token
    # gets K distinct experts (total load = T * K every batch)
    p = np.array([0.5, 0.2, 0.2, 0.1])
    rng = np.random.default_rng(0)
    loads = draw_device_loads("topk", 4, 2, 2, 3, 20_000, rng, p)
    assert (loads.sum(1) == 3 * 2).all()
    # P(device 0 = experts {0,1} gets both picks) by enumeration
    exact_both = sum(p[a] * p[b] / (1 - p[a]) for a in (0, 1) for b in (0, 1) if a != b)
    loads1 = draw_device_loads("topk", 4, 2, 2, 1, 40_000, rng, p)
    assert abs((loads1[:, 0] == 2).mean() - exact_both) < 5 * math.sqrt(exact_both * (1 - exact_both) / 40_000)


@pytest.mark.parametrize("freqs", [None, "skewed"])
def test_moge_always_exactly_balanced(freqs):
    n, k, d = 16, 4, 4
    f = None if freqs is None else np.random.default_rng(3).dirichlet(np.ones(n) * 0.3)
    study = imbalance_study(n, k, d, [1, 3, 17], 2000, seed=0, freqs_N=f)
    for s in study["moge"].values():
        assert s["p_imbalanced"] == 0.0 and s["max_is"] == 0.0 and s["mean_max_over_mean_load"] == 1.0
    assert exact_imbalance(8, 4, 4, 3, "moge")["p_imbalanced"] == 0.0


def test_paper_figure_2b_topk_almost_always_imbalanced():
    s = imbalance_study(64, 8, 8, [16], 5000, seed=0)
    assert s["topk"]["16"]["p_imbalanced"] > 0.99
    assert 0.4 < s["topk"]["16"]["mean_is"] < 1.0          # spread over roughly 0 to 1.5 (docs/design.md s.3)
    assert s["topk"]["16"]["max_is"] <= 2.0
    assert s["moge"]["16"]["p_imbalanced"] == 0.0


def test_normal_approximation_matches_monte_carlo():
    approx = expected_max_over_mean(64, 8, 8, 256, mc_max_tokens=64)
    mc = expected_max_over_mean(64, 8, 8, 256, trials=4000, mc_max_tokens=10_000)
    assert approx == pytest.approx(mc, rel=0.01)
    assert expected_max_over_mean(64, 8, 1, 16) == 1.0


def test_summarize_definitions():
    loads = np.array([[3, 1], [2, 2]])
    s = summarize(loads, tokens=2, k=2)
    assert s["p_imbalanced"] == 0.5 and s["mean_is"] == pytest.approx(0.5)
    assert s["mean_max_over_mean_load"] == pytest.approx((1.5 + 1.0) / 2)


def test_load_frequencies_formats(tmp_path):
    lines = [{"step": 1, "loss": 2.0, "expert_counts": [[1, 2, 3, 4], [4, 3, 2, 1]]},
             {"step": 2, "router": {"expert_counts": {"0": [1, 1, 1, 1], "1": [0, 0, 0, 4]}}},
             {"step": 3, "loss": 1.0}]
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    freqs = load_frequencies(f)
    assert freqs.sum() == pytest.approx(1.0)
    assert freqs == pytest.approx(np.array([6, 6, 6, 10]) / 28)
    assert load_frequencies(f, layer=1) == pytest.approx(np.array([4, 3, 2, 5]) / 14)
    # the trainer's records: per-layer dicts with a "layer" field (dense layers have no counts), and
    # eval lines with per-domain lists of per-layer counts (None for dense layers)
    t = tmp_path / "train.jsonl"
    t.write_text("\n".join(json.dumps(x) for x in [
        {"type": "train", "step": 10, "layers": [{"layer": 0, "dense": True},
                                                 {"layer": 1, "imbalance_score": 0.0, "expert_counts": [2, 0, 1, 1]},
                                                 {"layer": 2, "expert_counts": [1, 1, 1, 1]}]},
        {"type": "eval", "expert_counts": {"code": [None, [0, 0, 4, 0], [1, 1, 1, 1]], "web": [None, [4, 0, 0, 0], None]}},
    ]))
    assert load_frequencies(t, layer=1) == pytest.approx(np.array([6, 0, 5, 1]) / 12)
    assert load_frequencies(t) == pytest.approx(np.array([8, 2, 7, 3]) / 20)
    with pytest.raises(ImbalanceInputError, match="layer 0"):
        load_frequencies(t, layer=0)
    g = tmp_path / "f.json"
    g.write_text("[0.5, 0.25, 0.25]")
    assert load_frequencies(g) == pytest.approx([0.5, 0.25, 0.25])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"loss": 1}\n')
    with pytest.raises(ImbalanceInputError, match="no per-expert frequencies"):
        load_frequencies(bad)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ImbalanceInputError, match="divisible"):
        imbalance_study(64, 6, 8, [4], 10)
    with pytest.raises(ImbalanceInputError, match="non-zero frequency"):
        draw_device_loads("moge", 4, 2, 2, 1, 10, np.random.default_rng(0), np.array([1.0, 1.0, 0.0, 0.0]))
