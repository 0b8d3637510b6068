"""MTP predictors (moge.model.mtp): the forward against a reference written from the spec, training signal,
checkpoint round trip in the published naming, and the transformers wrapper."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from moge.checkpoint import from_published_state_dict, load_pretrained, save_model, to_published_state_dict
from moge.config import ConfigError, get_config
from moge.model import MoGEForCausalLM, count_parameters


def _model(num_mtp=1, seed=0, **kw):
    torch.manual_seed(seed)
    return MoGEForCausalLM(get_config("debug", num_mtp_layers=num_mtp, **kw)).double().eval()


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps))


def test_predictor_matches_the_spec_formula():
    """Predictor 1 at position t = decoder layer over eh_proj(cat[enorm(emb(t+1)), hnorm(h_t)]), then the shared
    head through shared_head.norm; its loss at t is the cross-entropy of token t+2."""
    m = _model()
    p = m.mtp[0]
    ids = torch.randint(0, m.config.vocab_size, (2, 10))
    out = m(ids, labels=ids)
    h, _ = m.model(ids)
    eps = m.config.rms_norm_eps
    x = torch.cat([_rms(m.model.embed_tokens(ids[:, 1:]), p.enorm.weight, eps),
                   _rms(h[:, :-1], p.hnorm.weight, eps)], dim=-1) @ p.eh_proj.weight.T
    # the decoder layer itself is the model's (tested elsewhere): run it on the reference input
    cos_sin = m.model.rotary(torch.arange(9).expand(2, 9), x.dtype)
    y, _ = type(p).__mro__[1].forward(p, x, cos_sin, None, None)
    logits = _rms(y, p.shared_head.norm.weight, eps) @ m.lm_head.weight.T
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp[0].loss.double(), want, rtol=1e-5, atol=1e-6)  # the loss is float32
    acc = (logits[:, :-1].argmax(-1) == ids[:, 2:]).double().mean()
    torch.testing.assert_close(out.mtp[0].accuracy.double(), acc)


def test_chained_predictors_and_ignored_labels():
    m = _model(num_mtp=2)
    ids = torch.randint(0, m.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, -3:] = -100
    out = m(ids, labels=labels)
    assert len(out.mtp) == 2 and all(torch.isfinite(o.loss) for o in out.mtp)
    assert out.mtp[1].router_stats is not None
    with pytest.raises(ValueError, match="at least 4 positions"):
        m(ids[:, :3], labels=ids[:, :3])


def test_no_mtp_outputs_without_labels_or_predictors():
    ids = torch.randint(0, 512, (1, 8))
    assert _model(num_mtp=0)(ids, labels=ids).mtp == []
    assert _model()(ids).mtp == []


def test_mtp_loss_falls_in_a_few_steps():
    torch.manual_seed(0)
    m = MoGEForCausalLM(get_config("debug", num_mtp_layers=1))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 32))  # a small repeated batch: every loss must fall
    first = None
    for _ in range(12):
        out = m(ids, labels=ids)
        loss = out.loss + 0.3 * out.mtp[0].loss + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else out.mtp[0].loss.item()
    assert out.mtp[0].loss.item() < 0.8 * first


def test_config_field_is_checked():
    with pytest.raises(ConfigError, match="num_mtp_layers"):
        get_config("debug", num_mtp_layers=-1)
    counts = count_parameters(get_config("debug", num_mtp_layers=1))
    assert counts["mtp"] > 0 and counts["total"] == count_parameters(get_config("debug"))["total"]


def test_checkpoint_round_trip_in_the_published_naming(tmp_path):
    m = _model(num_mtp=2).float()
    save_model(m, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    L = m.config.num_hidden_layers
    for k in range(2):
        for leaf in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "shared_head.head.weight", "self_attn.q_proj.weight", "mlp.experts.0.gate_proj.weight"):
            assert f"model.layers.{L + k}.{leaf}" in names
    assert not any(n.startswith("mtp.") for n in names)
    assert json.loads((tmp_path / "config.json").read_text())["num_mtp_layers"] == 2
    back = load_pretrained(tmp_path)
    assert back.state_dict().keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    pub = to_published_state_dict(m.state_dict(), m.config)
    assert set(from_published_state_dict(pub, m.config)) == set(m.state_dict())


def test_checkpoint_without_mtp_is_unchanged(tmp_path):
    save_model(_model(num_mtp=0).float(), tmp_path)
    assert "num_mtp_layers" not in json.loads((tmp_path / "config.json").read_text())
    assert len(load_pretrained(tmp_path).mtp) == 0


def test_a_stored_head_copy_that_differs_warns(tmp_path):
    from safetensors.torch import load_file, save_file
    m = _model().float()
    save_model(m, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    name = f"model.layers.{m.config.num_hidden_layers}.shared_head.head.weight"
    sd[name] = sd[name] + 1
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="shared_head.head.weight differ"):
        back = load_pretrained(tmp_path, verify=False)
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)


def test_mtp_layers_need_the_config_key(tmp_path):
    from moge.checkpoint import CheckpointError
    save_model(_model().float(), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    del d["num_mtp_layers"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_pretrained(tmp_path, verify=False)


def test_transformers_wrapper_loads_ignores_and_saves_predictors(tmp_path):
    import moge.hf  # noqa: F401  (registers PanguProMoE with transformers)
    from transformers import AutoModelForCausalLM

    m = _model().float()
    save_model(m, tmp_path / "a")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert len(hf.mtp) == 1
    torch.testing.assert_close(hf.mtp[0].eh_proj.weight, m.mtp[0].eh_proj.weight)
    ids = torch.randint(3, 512, (2, 7))
    torch.testing.assert_close(hf(ids).logits, m(ids).logits)
    hf.save_pretrained(tmp_path / "b")
    back = load_pretrained(tmp_path / "b")
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_quantize_refuses_predictors():
    from moge.quant.convert import QuantError, quantize
    with pytest.raises(QuantError, match="MTP predictor"):
        quantize(_model().float(), torch.randint(0, 512, (2, 8)))
