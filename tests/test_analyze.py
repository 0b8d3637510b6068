"""`moge analyze`: invariants on a debug checkpoint (MoGE's structural zeros, shares summing to K), the
specialisation index, the transformers path, extra (MTP-like) layers, and the CLI end to end."""

import json

import pytest
import torch

from helpers import single_thread  # noqa: F401 (fixture)
from moge.analysis.stats import busiest_device_share, distance_from_uniform, specialisation_index
from moge.analysis.analyze import AnalysisError, collect_routing, summarize
from moge.config import get_config
from moge.model import DecoderLayer, MoGEForCausalLM

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(router="moge", seed=0, **kw):
    torch.manual_seed(seed)
    return MoGEForCausalLM(get_config("debug", router=router, **kw)).eval()


def _rows(seed, n=6, s=24, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, s), generator=g)


def test_specialisation_index_and_distance_from_uniform():
    skewed = torch.tensor([[0.9, 0.5, 0.3, 0.3]])  # sums to K=2, far from uniform
    same = skewed.repeat(3, 1)
    assert specialisation_index(same) == pytest.approx(0.0, abs=1e-15)
    assert specialisation_index(same, torch.tensor([5, 1, 9])) == pytest.approx(0.0, abs=1e-15)
    assert float(distance_from_uniform(same)[0]) == pytest.approx(0.2)  # p = [.45, .25, .15, .15]
    assert float(distance_from_uniform(torch.full((1, 4), 0.5))[0]) == 0.0
    # two domains on disjoint experts: each is 1/2 away from the pooled distribution
    disjoint = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert specialisation_index(disjoint) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no routed tokens"):
        specialisation_index(torch.zeros(2, 4))
    assert busiest_device_share(torch.tensor([3, 1, 0, 0, 2, 2, 4, 0]), 2) == 8 / 12


def test_moge_invariants_on_a_debug_model():
    model = _model()
    rows = {"a": _rows(1), "b": _rows(2)}
    res = summarize(collect_routing(model, rows, batch_size=4, progress=False))
    cfg = model.config
    assert [l["layer"] for l in res["layers"]] == list(range(cfg.num_hidden_layers))
    assert res["tokens"] == {"a": 6 * 24, "b": 6 * 24}
    for l in res["layers"]:
        for share in l["share_by_domain"]:                      # every token picks exactly K experts
            assert sum(share) == pytest.approx(cfg.num_experts_per_tok, abs=1e-12)
        assert l["max_coactivation_within_group"] == 0.0        # K' = 1: never two of one group
        for row in l["within_group_share"]:                      # each group gets every token once
            assert sum(row) == pytest.approx(1.0, abs=1e-12)
        assert l["busiest_device_share"] == 0.25 and l["batch_busiest_device_share_max"] == 0.25
        assert 0.0 < l["specialisation_index"] < 1.0
    assert res["checks"]["max_coactivation_within_group"] == 0.0 and res["checks"]["moge_groups_exclusive"]


def test_identical_domains_have_zero_specialisation_and_topk_breaks_moge_zeros():
    rows = _rows(3)
    res = summarize(collect_routing(_model(), {"x": rows, "y": rows.clone()}, progress=False))
    assert all(l["specialisation_index"] == 0.0 for l in res["layers"])
    topk = summarize(collect_routing(_model("topk"), {"x": rows}, progress=False))
    assert topk["checks"]["max_coactivation_within_group"] > 0.0
    assert max(l["busiest_device_share"] for l in topk["layers"]) > 0.25


def test_extra_layers_beyond_num_hidden_layers_are_ignored():
    model = _model()
    rows = {"a": _rows(4)}
    want = summarize(collect_routing(model, rows, progress=False))
    # an MTP-like module appended to the layer list: run by the forward, but not analysed
    model.model.layers.append(DecoderLayer(model.config, model.config.num_hidden_layers))
    got = summarize(collect_routing(model, rows, progress=False))
    assert [l["layer"] for l in got["layers"]] == [l["layer"] for l in want["layers"]]
    assert [l["share_all"] for l in got["layers"]] == [l["share_all"] for l in want["layers"]]


def test_transformers_path_gives_the_same_routing(tmp_path):
    import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
    from moge.checkpoint import save_model
    from transformers import AutoModelForCausalLM

    model = _model(seed=5)
    save_model(model, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    rows = {"a": _rows(6), "b": _rows(7)}
    a = summarize(collect_routing(model, rows, progress=False))
    b = summarize(collect_routing(hf, rows, progress=False))
    assert [l["share_by_domain"] for l in a["layers"]] == [l["share_by_domain"] for l in b["layers"]]
    assert [l["coactivation"] for l in a["layers"]] == [l["coactivation"] for l in b["layers"]]


def test_dense_only_model_is_refused():
    model = _model(mlp_only_layers=[0, 1])
    with pytest.raises(AnalysisError, match="no MoE layers"):
        collect_routing(model, {"a": _rows(1)}, progress=False)
    with pytest.raises(AnalysisError, match="carries no MoGEConfig"):
        collect_routing(torch.nn.Linear(2, 2), {"a": _rows(1)}, progress=False)


def test_cli_writes_json_and_figures(tmp_path, capsys):
    from moge.checkpoint import save_model
    from moge.cli import main
    from moge.data.tokenizer import save_tokenizer, train_tokenizer

    texts = {"alpha": "the quick brown fox jumps over the lazy dog. " * 60,
             "digits": " ".join(f"{i} + {i % 7} = {i + i % 7}" for i in range(400))}
    for name, t in texts.items():
        (tmp_path / f"{name}.txt").write_text(t)
    tok = train_tokenizer(texts.values(), 300)
    for router in ("moge", "topk"):
        save_model(_model(router), tmp_path / router)
        save_tokenizer(tok, tmp_path / router / "tokenizer.json")
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "moge"), "--compare", str(tmp_path / "topk"), "--out", str(out),
                 "--data", str(tmp_path / "alpha.txt"), str(tmp_path / "digits.txt"), "--split", "all",
                 "--seq-len", "32", "--tokens", "256", "--no-progress"]) == 0
    assert "max within-group co-activation 0.0000" in capsys.readouterr().out
    doc = json.loads((out / "analysis.json").read_text())
    main_r, cmp_r = doc["analyses"]["main"], doc["analyses"]["compare"]
    assert main_r["router"] == "moge" and cmp_r["router"] == "topk"
    assert main_r["domains"] == ["alpha", "digits"] and main_r["tokens"] == {"alpha": 256, "digits": 256}
    assert main_r["checks"]["max_abs_share_sum_minus_k"] < 1e-12
    for name in doc["figures"].values():
        assert (out / name).stat().st_size > 10_000
    # a checkpoint without a tokenizer is a clear error, not a traceback
    save_model(_model(), tmp_path / "bare")
    assert main(["analyze", str(tmp_path / "bare"), "--out", str(out), "--no-progress"]) == 2
    assert "no tokenizer file" in capsys.readouterr().err
