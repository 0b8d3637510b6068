"""Expert-behaviour analyses: hand-computed cases and MoGE's structural zeros."""

import torch

from moge.analysis.stats import (busiest_expert_share, coactivation, expert_token_share, share_by_domain,
    within_group_share)
from moge.routing import moge_route, topk_route


def test_token_share_hand_case():
    ids = torch.tensor([[0, 1], [0, 3], [2, 3]])
    share = expert_token_share(ids, 4)
    assert share.tolist() == [2 / 3, 1 / 3, 1 / 3, 2 / 3]
    assert abs(float(share.sum()) - 2.0) < 1e-12  # sums to K


def test_coactivation_hand_case():
    ids = torch.tensor([[0, 1], [0, 3], [2, 3]])
    c = coactivation(ids, 4)
    assert torch.allclose(c.diagonal(), expert_token_share(ids, 4))
    assert c[0, 1] == c[1, 0] == 1 / 3
    assert c[0, 2] == 0 and c[2, 3] == 1 / 3


def test_moge_never_coactivates_inside_a_group():
    torch.manual_seed(0)
    n, m = 16, 4
    _, ids = moge_route(torch.randn(500, n), m, 1)
    c = coactivation(ids, n)
    g = n // m
    for grp in range(m):
        block = c[grp * g:(grp + 1) * g, grp * g:(grp + 1) * g]
        assert torch.count_nonzero(block - torch.diag(block.diagonal())) == 0
    # top-K has no such structure: some same-group pair is co-activated
    _, ids_topk = topk_route(torch.randn(500, n), m)
    c2 = coactivation(ids_topk, n)
    assert float(c2[:g, :g].sum() - c2[:g, :g].diagonal().sum()) > 0


def test_within_group_share_and_busiest():
    counts = torch.tensor([3, 1, 0, 0, 2, 2, 4, 0])
    s = within_group_share(counts, 2)
    assert s.tolist() == [[0.75, 0.25, 0.0, 0.0], [0.25, 0.25, 0.5, 0.0]]
    assert busiest_expert_share(counts) == 4 / 12
    assert busiest_expert_share(torch.zeros(4)) == 0.0


def test_share_by_domain_orders_rows():
    names, mat = share_by_domain({"prose": torch.tensor([[1]]), "code": torch.tensor([[0]])}, 2)
    assert names == ["code", "prose"]
    assert mat.tolist() == [[1.0, 0.0], [0.0, 1.0]]
