"""moge train on faulty directories and options: the lock on --out, ignored options on --resume, data
edited under a checkpoint, stale metrics, hand-edited state, options fuzzed (hypothesis: only a valid
config or a MoGEError)."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import single_thread  # noqa: F401 (fixture)

from moge.checkpoint import CheckpointCorruptError
from moge.checkpoint.lock import LOCK_FILE, DirectoryInUseError
from moge.checkpoint.training_state import STATE_FILE
from moge.cli import build_parser, main as cli_main
from moge.data.corpus import DataError
from moge.errors import MoGEError, MoGEWarning
from moge.train import TrainConfig, Trainer, config_from_args

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    text = "".join(f"The blue number {i} walks over the bridge and sees {3 * i} birds.\n" for i in range(400))
    (root / "a.txt").write_text(text)
    return root / "a.txt"


def cfg(out, data, **kw):
    base = dict(out=str(out), preset="debug", steps=2, batch_size=2, seq_len=16, data=[str(data)], vocab_size=300,
                eval_every=0, eval_batches=1, log_every=1, save_every=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_second_run_on_a_directory_in_use_names_the_holder(tmp_path, corpus):
    first = Trainer(cfg(tmp_path / "o", corpus))
    with pytest.raises(DirectoryInUseError, match=rf"in use by another moge train run \(pid {os.getpid()}"):
        Trainer(cfg(tmp_path / "o", corpus))
    first.train()  # releases the lock when it returns
    Trainer(cfg(tmp_path / "o", corpus, steps=3), resume=True).train()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, corpus, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{dead.stdout.strip()} somehost\n")
    Trainer(cfg(out, corpus)).train()
    assert f"took over the stale lock of pid {dead.stdout.strip()}" in capsys.readouterr().err


def test_resume_warns_about_ignored_options_and_checks_the_data(tmp_path, corpus):
    data = tmp_path / "data.txt"
    data.write_text(corpus.read_text())
    out = tmp_path / "r"
    Trainer(cfg(out, data)).train()
    with pytest.warns(MoGEWarning, match=r"ignored: --batch-size 4 \(the run has 2\), --lr 0.05"):
        t = Trainer(cfg(out, data, steps=3), resume=True, resume_overrides={"steps"},
                    explicit={"steps": 3, "lr": 0.05, "batch_size": 4})
    t.close()
    data.write_text(corpus.read_text().replace("walks over", "walks under"))  # same length in tokens? rows: same
    with pytest.raises(DataError, match="train and val data changed|train data changed|val data changed"):
        Trainer(cfg(out, data, steps=3), resume=True)


def test_a_fresh_run_discards_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path, corpus):
    out = tmp_path / "m"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 9, "marker": "OLD"}) + "\n")
    Trainer(cfg(out, corpus)).train()
    assert "OLD" not in (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.__setitem__("step", "x"), "'step' must be int"),
    (lambda s: s.pop("sampler"), "'sampler' must be dict"),
    (lambda s: s["sampler"].__setitem__("position", -5), "position"),
    (lambda s: s["rng"]["numpy"].__setitem__("pos", "x"), "rng numpy 'pos'"),
    (lambda s: s["train_config"].__setitem__("lr", "abc"), "train_config is invalid: --lr must be"),
    (lambda s: s["files"].pop("tokenizer.json"), "does not list"),
])
def test_hand_edited_training_state_is_refused_naming_the_field(tmp_path, corpus, edit, match):
    out = tmp_path / "s"
    Trainer(cfg(out, corpus)).train()
    s = json.loads((out / STATE_FILE).read_text())
    edit(s)
    (out / STATE_FILE).write_text(json.dumps(s))
    with pytest.raises(CheckpointCorruptError, match=match):
        Trainer(cfg(out, corpus, steps=3), resume=True)


def test_out_that_is_a_file_and_absurd_sizes_fail_before_any_work(tmp_path, corpus, capsys):
    (tmp_path / "f").write_text("x")
    base = ["train", "--data", str(corpus), "--no-progress", "--vocab-size", "300", "--seq-len", "16"]
    assert cli_main([*base, "--out", str(tmp_path / "f")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert cli_main([*base, "--out", str(tmp_path / "big"), "--batch-size", str(10 ** 9)]) == 2
    assert "needs about" in capsys.readouterr().err
    assert cli_main([*base, "--out", str(tmp_path / "v"), "--vocab-size", str(10 ** 9)]) == 2
    assert "--vocab-size must be an integer in [259, 1048576]" in capsys.readouterr().err


FLAGS = {"--steps": ["-1", "0", "3", "x"], "--batch-size": ["0", "2", "3", "1000000000000"],
         "--seq-len": ["1", "16", "-4"], "--lr": ["0", "nan", "inf", "-1", "1e-3"], "--warmup": ["-1", "0", "5"],
         "--weight-decay": ["-5", "nan", "0.1"], "--grad-clip": ["-1", "inf", "1"], "--aux-coef": ["-1", "nan", "0.01"],
         "--vocab-size": ["0", "1", "258", "300", "1000000000"], "--seed": ["-1", "0", "4294967296"],
         "--eval-every": ["-1", "0"], "--log-every": ["0", "1"], "--save-every": ["-1", "0"], "--ep": ["0", "2", "3"],
         "--dp-shard": ["0", "2", "3"], "--mixed-precision": ["none", "bf16", "fp8"],
         "--router": ["moge", "bogus"], "--preset": ["debug", "nope"], "--grad-accum": ["0", "1"]}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(FLAGS)), st.integers(0, 10), max_size=5))
def test_fuzz_train_options(picks):
    """Any mix of train options is a valid TrainConfig or a MoGEError (or argparse's exit 2)."""
    argv = ["train", "--out", "/nonexistent/x"]
    for flag, i in picks.items():
        argv += [flag, FLAGS[flag][i % len(FLAGS[flag])]]
    try:
        args = build_parser("train").parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        return
    try:
        c = config_from_args(args)
        c.validate()
        from moge.config import get_config
        get_config(c.preset, router=c.router)
    except MoGEError:
        return
    assert c.steps >= 1 and c.lr > 0 and (c.vocab_size is None or c.vocab_size >= 259) and c.batch_size % (c.ep * c.dp_shard) == 0
