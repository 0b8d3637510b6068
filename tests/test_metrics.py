"""Load-balance metrics on small batches whose values are computed by hand in the comments."""

from __future__ import annotations

import pytest
import torch

from moge.metrics import (balance_from_counts, device_loads, device_loads_from_counts, expert_load_cv, imbalance_score,
                          max_over_mean_load)
from moge.routing import moge_route, topk_route

# N=4 experts on D=2 devices: device 0 owns experts {0,1}, device 1 owns {2,3}.
# Pairs: 0,1 | 0,2 | 3,1 -> device 0 gets 0,1,0,1 = 4 pairs, device 1 gets 2,3 = 2 pairs.
IDS = torch.tensor([[0, 1], [0, 2], [3, 1]])


def test_device_loads_by_hand():
    assert device_loads(IDS, 4, 2).tolist() == [4, 2]
    assert device_loads(IDS, 4, 4).tolist() == [2, 2, 1, 1]
    assert device_loads(IDS, 4, 1).tolist() == [6]
    assert device_loads_from_counts(torch.tensor([2, 2, 1, 1]), 2).tolist() == [4, 2]


def test_imbalance_score_by_hand():
    assert imbalance_score(IDS, 4, 2) == pytest.approx((4 - 2) / 3)
    assert imbalance_score(IDS, 4, 4) == pytest.approx((2 - 1) / 3)
    assert imbalance_score(IDS, 4, 1) == 0.0
    # all 8 pairs of 4 tokens on device 1 of 2: IS = (8 - 0) / 4 = 2
    assert imbalance_score(torch.tensor([[2, 3]] * 4), 4, 2) == pytest.approx(2.0)


def test_imbalance_score_moge_zero_topk_positive():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 64, generator=gen)
    assert imbalance_score(moge_route(logits, 8, 1)[1], 64, 8) == 0.0
    assert imbalance_score(topk_route(logits, 8)[1], 64, 8) > 0.0


def test_max_over_mean_load_by_hand():
    assert max_over_mean_load(torch.tensor([4, 2])) == pytest.approx(4 / 3)
    assert max_over_mean_load(torch.tensor([3, 3, 3])) == pytest.approx(1.0)
    assert max_over_mean_load(torch.tensor([0, 0])) == 1.0  # empty batch: no straggler


def test_expert_load_cv_by_hand():
    # counts [2, 2, 1, 1]: mean 1.5, population std 0.5 -> CV 1/3
    assert expert_load_cv(IDS, 4) == pytest.approx(1 / 3)
    assert expert_load_cv(torch.tensor([[0, 1], [2, 3]]), 4) == 0.0
    # counts [4, 0, 0, 0]: mean 1, std sqrt((9 + 1 + 1 + 1) / 4) = sqrt(3)
    assert expert_load_cv(torch.tensor([[0], [0], [0], [0]]), 4) == pytest.approx(3 ** 0.5)


def test_metric_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"num_experts=6 must be divisible by num_devices=4"):
        device_loads(IDS, 6, 4)
    with pytest.raises(ValueError, match=r"empty batch \(0 tokens\)"):
        imbalance_score(torch.zeros(0, 2, dtype=torch.long), 4, 2)


def test_balance_from_counts_hand_case():
    # 8 experts on 2 devices: loads 2+1+0+3 = 6 and 1+1+1+1 = 4 over 5 tokens (K = 2)
    counts = torch.tensor([2, 1, 0, 3, 1, 1, 1, 1])
    is_, mm = balance_from_counts(counts, 2, 5).tolist()
    assert is_ == pytest.approx((6 - 4) / 5)
    assert mm == pytest.approx(6 / 5)
    with pytest.raises(ValueError, match="empty batch"):
        balance_from_counts(counts, 2, 0)
