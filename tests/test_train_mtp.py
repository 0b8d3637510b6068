"""``moge train --mtp N --mtp-coef C``: the MTP loss term, per-predictor metrics, checkpoints in the
published naming, exact resume, options on resume and bad values."""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from helpers import single_thread  # noqa: F401 (fixture)
from test_train import cfg_for, text_dir, weights  # noqa: F401 (fixture)

from moge.checkpoint import CheckpointCorruptError, load_pretrained
from moge.checkpoint.training_state import STATE_FILE
from moge.cli import main as cli_main
from moge.errors import MoGEWarning
from moge.model.mtp import MTPOutput
from moge.train import TrainConfig, Trainer, TrainingConfigError
from moge.train.mtp import MAX_MTP, mtp_loss_term

pytestmark = pytest.mark.usefixtures("single_thread")


def records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_mtp_run_logs_each_predictor_and_its_loss_falls(tmp_path, text_dir):
    out = tmp_path / "m"
    t = Trainer(cfg_for(out, text_dir, mtp=2, steps=16, lr=1e-2, log_every=2, eval_every=8, eval_batches=2))
    before = t.evaluate()
    assert [p["predictor"] for p in before["mtp"]] == [1, 2]
    after = t.train()
    train = records(out, "train")
    for r in train:
        assert len(r["layers"]) == 2  # the main layers only: consumers of "layers" see num_hidden_layers entries
        assert [p["predictor"] for p in r["mtp"]] == [1, 2] and [p["layer"] for p in r["mtp"]] == [2, 3]
        assert all(0.0 <= p["accuracy"] <= 1.0 and math.isfinite(p["loss"]) for p in r["mtp"])
        assert r["mtp_loss"] == pytest.approx(sum(p["loss"] for p in r["mtp"]) / 2)
        assert [l["layer"] for l in r["mtp_layers"]] == [2, 3] and [l["predictor"] for l in r["mtp_layers"]] == [1, 2]
        for layer in r["mtp_layers"]:  # each predictor's MoGE layer: balanced by construction
            assert layer["imbalance_score_max"] == 0.0 and sum(layer["expert_counts"]) == 4 * (32 - layer["predictor"]) * 4
    for k in range(2):
        assert train[-1]["mtp"][k]["loss"] < train[0]["mtp"][k]["loss"] - 0.3, train
        assert after["mtp"][k]["val_loss_mean"] < before["mtp"][k]["val_loss_mean"] - 0.3
    ev = records(out, "eval")
    assert [r["step"] for r in ev] == [8, 16]
    assert set(ev[-1]["mtp"][0]["val_loss"]) == set(ev[-1]["mtp"][0]["val_accuracy"]) == {"code", "prose"}
    assert ev[-1]["mtp"][0]["val_accuracy_mean"] > 0


def test_the_loss_term_is_coef_times_the_mean_and_coef_zero_trains_no_shared_head(tmp_path, text_dir):
    outs = [MTPOutput(torch.tensor(2.0), torch.tensor(0.5), None), MTPOutput(torch.tensor(4.0), torch.tensor(0.1), None)]
    assert float(mtp_loss_term(outs, 0.3, torch.tensor(1.0))) == pytest.approx(0.9)
    assert float(mtp_loss_term([], 0.3, torch.tensor(1.0))) == 0.0
    # shared_head.norm is reached only by the MTP cross-entropy: frozen at C = 0, trained at C > 0
    moved = {}
    for coef in (0.0, 0.3):
        t = Trainer(cfg_for(tmp_path / f"c{coef}", text_dir, mtp=1, mtp_coef=coef, steps=2, save_every=0))
        w0 = t.model.mtp[0].shared_head.norm.weight.detach().clone()
        t.train_step()
        moved[coef] = not torch.equal(w0, t.model.mtp[0].shared_head.norm.weight.detach())
        t.close()
    assert moved == {0.0: False, 0.3: True}


def test_checkpoint_holds_the_predictor_in_published_naming(tmp_path, text_dir):
    out = tmp_path / "ck"
    t = Trainer(cfg_for(out, text_dir, mtp=1, steps=2))
    t.train()
    w = weights(out)
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "input_layernorm.weight", "self_attn.q_proj.weight"):
        assert f"model.layers.2.{name}" in w, name
    assert any(k.startswith("model.layers.2.mlp.") and "experts" in k for k in w)
    assert not any(k.startswith("mtp.") or k.startswith("model.layers.3.") for k in w)
    assert json.loads((out / "config.json").read_text())["num_mtp_layers"] == 1
    opt = load_file(str(out / "optimizer.safetensors"))
    assert "mtp.0.eh_proj.weight.exp_avg_sq" in opt
    model = load_pretrained(out, dtype=torch.float32)
    assert len(model.mtp) == 1
    for k, v in t.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_interrupted_and_resumed_with_mtp_equals_uninterrupted(tmp_path, text_dir):
    kw = dict(mtp=2, grad_accum=2)
    Trainer(cfg_for(tmp_path / "full", text_dir, **kw)).train()
    part = Trainer(cfg_for(tmp_path / "part", text_dir, **kw))
    for _ in range(3):
        part.train_step()
    part.save_checkpoint()
    part.train_step()  # lost, as if killed
    part.close()
    resumed = Trainer(cfg_for(tmp_path / "part", text_dir, **kw), resume=True)
    assert resumed.step == 3 and len(resumed.model.mtp) == 2
    resumed.train()
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and any(k.startswith("model.layers.3.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = load_file(str(tmp_path / "full" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "part" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    ra, rb = records(tmp_path / "full", "train"), records(tmp_path / "part", "train")
    assert ra[-1]["mtp"] == rb[-1]["mtp"]  # the interval 4..6 lies after the checkpoint in both
    last = lambda rs: [(p["last_loss"], p["last_accuracy"]) for r in rs for p in r["mtp"]]
    assert last(ra[-2:]) == last(rb[-2:])


def test_mtp_on_resume_is_the_checkpoints_and_a_different_flag_warns(tmp_path, text_dir):
    out = tmp_path / "r"
    Trainer(cfg_for(out, text_dir, mtp=1, steps=2)).train()
    with pytest.warns(MoGEWarning, match=r"ignored: --mtp 2 \(the run has 1\)"):
        t = Trainer(cfg_for(out, text_dir, mtp=2, steps=3), resume=True, explicit={"mtp": 2, "steps": 3})
    assert len(t.model.mtp) == 1 and t.cfg.mtp == 1
    t.train()
    assert records(out, "train")[-1]["mtp"][0]["predictor"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same --mtp again is not a mismatch
        Trainer(cfg_for(out, text_dir, mtp=1, steps=3), resume=True, explicit={"mtp": 1}).close()
    plain = tmp_path / "p"
    Trainer(cfg_for(plain, text_dir, steps=2)).train()
    with pytest.warns(MoGEWarning, match=r"--mtp 1 \(the run has 0\)"):
        assert cli_main(["train", "--out", str(plain), "--resume", "--mtp", "1", "--steps", "3", "--no-progress"]) == 0
    assert load_pretrained(plain).mtp is not None and len(load_pretrained(plain).mtp) == 0
    assert "mtp" not in records(plain, "train")[-1]


def test_state_and_weights_that_disagree_on_mtp_are_refused(tmp_path, text_dir):
    out = tmp_path / "d"
    Trainer(cfg_for(out, text_dir, mtp=1, steps=2)).train()
    state = json.loads((out / STATE_FILE).read_text())
    state["train_config"]["mtp"] = 0
    (out / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointCorruptError, match="num_mtp_layers=1"):
        Trainer(cfg_for(out, text_dir), resume=True)


@pytest.mark.parametrize("kw, match", [
    (dict(mtp=-1), "--mtp must be"), (dict(mtp=MAX_MTP + 1), "--mtp must be"), (dict(mtp=True), "--mtp must be"),
    (dict(mtp=1.5), "--mtp must be"), (dict(mtp_coef=float("nan")), "--mtp-coef"), (dict(mtp_coef=-0.1), "--mtp-coef"),
    (dict(mtp_coef=float("inf")), "--mtp-coef"), (dict(mtp_coef="0.3"), "--mtp-coef"),
    (dict(mtp=3, seq_len=4), r"--mtp 3 needs --seq-len >= 5")])
def test_bad_mtp_options_are_named_errors(kw, match):
    with pytest.raises(TrainingConfigError, match=match):
        TrainConfig(**kw).validate()


@pytest.mark.parametrize("args, match", [(["--mtp", "-1"], "--mtp must be"), (["--mtp-coef", "nan"], "--mtp-coef"),
                                         (["--mtp", "1", "--mtp-coef", "-1"], "--mtp-coef")])
def test_bad_mtp_flags_exit_2_naming_the_flag(tmp_path, capsys, args, match):
    assert cli_main(["train", "--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written
