"""``moge train --ep``: a checkpoint written at EP 2 loads on one process and resumes at EP 1 and EP 4
with the same loss (torchrun, CPU/gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .launch import ROOT, free_port


ARGS = ["--preset", "debug", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--log-every", "1",
        "--no-progress", "--device", "cpu"]  # gloo on CPU: more ranks than a GPU machine may have GPUs


def _moge_train(nproc: int, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "moge", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "moge", "train", "--ep", str(nproc), *args]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}"


def _losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["last_loss"] for r in rows if r.get("type") == "train"}


@pytest.mark.timeout(180)
def test_ep2_checkpoint_loads_on_one_process_and_resumes_at_ep1_and_ep4(tmp_path):
    ep2 = tmp_path / "ep2"
    _moge_train(2, *ARGS, "--steps", "2", "--out", str(ep2))

    from moge.checkpoint import load_pretrained  # the single-directory layout, unsharded
    model = load_pretrained(ep2)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == model.config.num_experts

    losses = {}
    for n in (1, 4):
        d = tmp_path / f"resume{n}"
        shutil.copytree(ep2, d)
        _moge_train(n, "--resume", "--steps", "3", "--log-every", "1", "--no-progress", "--device", "cpu",
                    "--out", str(d))
        losses[n] = _losses(d)
    assert losses[1][2] == losses[4][2]  # the EP-2 steps, carried in both copies
    assert 3 in losses[1] and 3 in losses[4]
    assert losses[1][3] == pytest.approx(losses[4][3], rel=1e-5), losses


def _records(out, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("type") == kind]


@pytest.mark.timeout(180)
def test_ep2_with_mtp_shards_the_predictor_and_matches_one_process(tmp_path):
    """--mtp 1 at EP 2: the predictor's MoGE layer is sharded like the others (the checkpoint holds all its
    experts) and losses, MTP losses and accuracies equal one process's. --aux-coef 0: the balance loss
    counts experts per rank's rows (docs/parallel.md), so with it the runs would differ by design."""
    args = [*ARGS, "--mtp", "1", "--aux-coef", "0", "--steps", "3", "--eval-every", "3", "--eval-batches", "1"]
    _moge_train(2, *args, "--out", str(tmp_path / "ep2"))
    _moge_train(1, *args, "--out", str(tmp_path / "ep1"))

    from moge.checkpoint import load_pretrained
    model = load_pretrained(tmp_path / "ep2")
    assert len(model.mtp) == 1 and model.mtp[0].mlp.experts.gate_up_proj.shape[0] == model.config.num_experts
    one = load_pretrained(tmp_path / "ep1")
    for k, v in one.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, rtol=1e-4, atol=1e-6), k
    start = _records(tmp_path / "ep2", "start")[0]["expert_parallel"]
    assert start == {"ranks": 2, "sharded_layers": ["model.layers.0.mlp", "model.layers.1.mlp", "mtp.0.mlp"]}
    assert "expert_parallel" not in _records(tmp_path / "ep1", "start")[0]
    t1, t2 = _records(tmp_path / "ep1", "train"), _records(tmp_path / "ep2", "train")
    assert [r["step"] for r in t1] == [r["step"] for r in t2] == [1, 2, 3]
    for a, b in zip(t1, t2):
        assert a["last_loss"] == pytest.approx(b["last_loss"], rel=1e-5)
        assert a["mtp"][0]["last_loss"] == pytest.approx(b["mtp"][0]["last_loss"], rel=1e-5)
        assert a["mtp"][0]["last_accuracy"] == pytest.approx(b["mtp"][0]["last_accuracy"], abs=1e-6)
        assert b["mtp_layers"][0]["layer"] == 2 and b["mtp_layers"][0]["imbalance_score_max"] == 0.0
    e1, e2 = _records(tmp_path / "ep1", "eval")[-1], _records(tmp_path / "ep2", "eval")[-1]
    assert e1["mtp"][0]["val_loss_mean"] == pytest.approx(e2["mtp"][0]["val_loss_mean"], rel=1e-5)
