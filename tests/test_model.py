"""The model against an independent float64 reference on a published-layout checkpoint, and the 72B counts."""

import json

import pytest
import torch

from helpers import TINY_CONFIG, published_tensors, reference_logits, write_published_checkpoint, single_thread  # noqa: F401 (fixture)
from moge.checkpoint import load_pretrained, read_config, released_config_dict
from moge.config import get_config
from moge.model import count_parameters

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_published_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_published_config_without_num_groups_reads_groups_from_k(ckpt):
    assert "num_groups" not in json.loads((ckpt / "config.json").read_text())
    cfg = read_config(ckpt)
    assert cfg.groups == TINY_CONFIG["num_experts_per_tok"] == 4
    assert cfg.k_per_group == 1 and cfg.experts_per_group == 2


def test_logits_match_float64_reference(ckpt):
    model = load_pretrained(ckpt)
    ids = torch.tensor([[1, 5, 9, 33, 70, 12, 4, 96], [1, 44, 3, 3, 18, 61, 90, 7]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = reference_logits(published_tensors(TINY_CONFIG), TINY_CONFIG, ids)
    assert got.dtype == torch.float32
    assert want.abs().max() > 1.0  # logits of a meaningful size, so the tolerance is tight
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_matches_unpadded_rows(ckpt):
    model = load_pretrained(ckpt)
    a, b = [1, 5, 9, 33, 70], [1, 44, 3]
    ids = torch.tensor([a, [0, 0] + b])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=torch.tensor([b])).logits
    torch.testing.assert_close(padded[1, 2:], alone[0], rtol=1e-5, atol=1e-5)


def test_pangu_72b_parameter_counts():
    counts = count_parameters(get_config("pangu-pro-moe-72b"))
    assert round(counts["total"] / 1e9, 2) == 71.99
    assert round(counts["activated"] / 1e9, 2) == 16.50


def test_pangu_72b_counts_from_published_config_without_groups(tmp_path):
    d = released_config_dict(get_config("pangu-pro-moe-72b"))
    assert "num_groups" not in d  # the released config has no group count
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = read_config(tmp_path)
    assert cfg.groups == 8
    counts = count_parameters(cfg)
    assert round(counts["total"] / 1e9, 2) == 71.99 and round(counts["activated"] / 1e9, 2) == 16.50
