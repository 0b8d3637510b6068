"""The trainer: learning, exact resume, atomic checkpoints, clear failures and the metrics it logs."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from helpers import single_thread  # noqa: F401 (fixture)

from moge.cli import main as cli_main
from moge.metrics import imbalance_score
from moge.checkpoint import CheckpointCorruptError
from moge.checkpoint.training_state import COMMIT_DIR, STATE_FILE, recover_checkpoint_dir, verify_checkpoint
from moge.train import TrainConfig, Trainer, TrainingConfigError, TrainingDivergedError

# One intra-op thread: on a busy 2-core machine two threads mostly wait on each other for toy ops.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A small two-domain corpus: Python-ish code and English sentences, deterministic."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "code").mkdir()
    (root / "prose").mkdir()
    for i in range(12):
        (root / "code" / f"m{i}.py").write_text("".join(
            f"def f{i}_{j}(x, y):\n    return x * {j} + y - {i}\n\n" for j in range(40)))
        (root / "prose" / f"p{i}.txt").write_text("".join(
            f"The {w} number {j} walks over the bridge and sees {i + j} birds.\n"
            for j, w in enumerate(["red", "blue", "green", "tall", "small"] * 8)))
    return root


def cfg_for(out, text_dir, **kw):
    base = dict(out=str(out), preset="debug", steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup=2,
                data=[str(text_dir / "code"), str(text_dir / "prose")], vocab_size=320, eval_every=0,
                eval_batches=1, log_every=2, save_every=3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(out):
    return load_file(str(out / "model.safetensors"))


def test_a_few_steps_lower_the_loss(tmp_path, text_dir):
    t = Trainer(cfg_for(tmp_path / "run", text_dir, steps=15, lr=1e-2))
    before = t.evaluate()["val_loss_mean"]
    after = t.train()["val_loss_mean"]
    assert after < before - 0.3, (before, after)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, text_dir):
    full = Trainer(cfg_for(tmp_path / "full", text_dir, grad_accum=2))
    full.train()
    part = Trainer(cfg_for(tmp_path / "part", text_dir, grad_accum=2))
    for _ in range(3):  # stop between checkpoints: step 3's work is lost, as if killed
        part.train_step()
    part.save_checkpoint()
    part.train_step()
    del part
    resumed = Trainer(cfg_for(tmp_path / "part", text_dir, grad_accum=2), resume=True)
    assert resumed.step == 3
    resumed.train()
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = load_file(str(tmp_path / "full" / "optimizer.safetensors")), load_file(str(tmp_path / "part" / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert any(k.endswith(".exp_avg_sq") and "experts" in k for k in oa)
    lines = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["type"], r["step"]) for r in lines]
    assert len(keys) == len(set(keys)) and ("train", 6) in keys  # nothing duplicated after resume


def test_existing_checkpoint_needs_resume(tmp_path, text_dir):
    Trainer(cfg_for(tmp_path / "r", text_dir, steps=2)).train()
    with pytest.raises(TrainingConfigError, match="--resume"):
        Trainer(cfg_for(tmp_path / "r", text_dir, steps=2))


def test_corrupt_checkpoint_names_the_file(tmp_path, text_dir):
    out = tmp_path / "c"
    Trainer(cfg_for(out, text_dir, steps=2)).train()
    good = (out / "optimizer.safetensors").read_bytes()
    (out / "optimizer.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointCorruptError, match="optimizer.safetensors"):
        Trainer(cfg_for(out, text_dir), resume=True)
    (out / "optimizer.safetensors").write_bytes(good[:-8] + b"\x00" * 8)  # same size, altered bytes
    with pytest.raises(CheckpointCorruptError, match="optimizer.safetensors"):
        Trainer(cfg_for(out, text_dir), resume=True)
    (out / "optimizer.safetensors").write_bytes(good)
    state = (out / STATE_FILE).read_text()
    (out / STATE_FILE).write_text(state[: len(state) // 2])
    with pytest.raises(CheckpointCorruptError, match=STATE_FILE):
        Trainer(cfg_for(out, text_dir), resume=True)
    assert cli_main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, text_dir):
    out = tmp_path / "n"
    t = Trainer(cfg_for(out, text_dir, steps=6, save_every=2))
    for _ in range(2):
        t.train_step()
    t.save_checkpoint()
    saved = weights(out)
    with torch.no_grad():
        t.model.model.embed_tokens.weight[5:40] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"at step 3\b.*step 2"):
        t.train()
    state = verify_checkpoint(out)
    assert state["step"] == 2
    assert all(torch.equal(saved[k], v) for k, v in weights(out).items())


def test_interrupted_commit_rolls_forward(tmp_path, text_dir):
    out = tmp_path / "k"
    t = Trainer(cfg_for(out, text_dir, steps=4))
    t.train_step()
    t.save_checkpoint()
    t.train_step()
    # Simulate a kill after the commit point, with only some files moved into place.
    real_replace = os.replace
    moved = []  # files moved out of the commit directory

    def dying_replace(src, dst):
        if COMMIT_DIR in str(src):
            if len(moved) == 2:
                raise KeyboardInterrupt
            moved.append(src)
        return real_replace(src, dst)

    os.replace = dying_replace
    try:
        with pytest.raises(KeyboardInterrupt):
            t.save_checkpoint()
    finally:
        os.replace = real_replace
    assert (out / COMMIT_DIR).is_dir()
    recover_checkpoint_dir(out)
    assert verify_checkpoint(out)["step"] == 2
    assert not (out / COMMIT_DIR).exists()


def test_metrics_lines_hold_per_layer_balance(tmp_path, text_dir):
    for router in ("moge", "topk"):
        out = tmp_path / router
        Trainer(cfg_for(out, text_dir, steps=4, router=router, eval_every=2)).train()
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["type"] == "train"]
        evals = [r for r in recs if r["type"] == "eval"]
        assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
        for r in train:
            assert {"loss", "aux_loss", "lr", "tokens_per_s"} <= r.keys() and r["aux_loss"] > 0
            assert len(r["layers"]) == 2
            for layer in r["layers"]:
                assert len(layer["group_loads"]) == 4 and len(layer["expert_counts"]) == 8
                assert sum(layer["expert_counts"]) == 4 * 32 * 4  # tokens x K
                if router == "moge":
                    assert layer["imbalance_score_max"] == 0.0 and layer["max_mean_load"] == 1.0
                    assert len(set(layer["group_loads"])) == 1
        assert set(evals[-1]["val_loss"]) == {"code", "prose"}
    assert any(layer["imbalance_score_max"] > 0 for r in train for layer in r["layers"])  # top-K


def test_cli_train_with_user_data(tmp_path, text_dir):
    (tmp_path / "recs.jsonl").write_text("".join(json.dumps({"text": f"line {i} of some text " * 8}) + "\n"
                                                 for i in range(60)))
    out = tmp_path / "cli"
    rc = cli_main(["train", "--preset", "debug", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                   "--vocab-size", "300", "--data", str(text_dir / "code"), str(tmp_path / "recs.jsonl"),
                   "--out", str(out), "--no-progress", "--log-every", "1"])
    assert rc == 0
    state = verify_checkpoint(out)
    assert state["step"] == 3 and set(state["data"]["val_rows"]) == {"code", "recs"}
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    # --resume with more steps continues the same run
    assert cli_main(["train", "--out", str(out), "--resume", "--steps", "5", "--no-progress"]) == 0
    assert verify_checkpoint(out)["step"] == 5
    assert cli_main(["train", "--out", str(tmp_path / "bad"), "--data", str(tmp_path / "missing")]) == 2
    # the output directory is a published-layout checkpoint that `moge generate` reads with its tokenizer
    from moge.checkpoint import load_pretrained

    model = load_pretrained(out)
    assert model.config.vocab_size == state["model_config"]["vocab_size"]
    assert cli_main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "4"]) == 0


def test_a_run_written_by_moge_0_1_resumes(tmp_path, text_dir):
    """moge 0.1 named its state trainer_state.json (transformers' Trainer's name): still resumed, then
    replaced by the new name, and a directory with only Trainer's file of that name is not ours."""
    from moge.checkpoint.training_state import LEGACY_STATE_FILE, has_checkpoint

    out = tmp_path / "old"
    Trainer(cfg_for(out, text_dir, steps=2)).train()
    (out / STATE_FILE).rename(out / LEGACY_STATE_FILE)
    t = Trainer(cfg_for(out, text_dir, steps=3), resume=True)
    assert t.step == 2
    t.train()
    assert (out / STATE_FILE).is_file() and not (out / LEGACY_STATE_FILE).exists()
    assert verify_checkpoint(out)["step"] == 3
    hf = tmp_path / "hf_trainer"
    hf.mkdir()
    (hf / LEGACY_STATE_FILE).write_text(json.dumps({"global_step": 10, "log_history": []}))
    assert not has_checkpoint(hf)
