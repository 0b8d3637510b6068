"""`moge demo` end to end at toy size: both runs, the report, the plots and the MoGE balance check."""

import json

import pytest
from helpers import single_thread  # noqa: F401 (fixture)

from moge.cli import main as cli_main
from moge.analysis.report import read_metrics, summarize

# One intra-op thread: on a busy 2-core machine two threads mostly wait on each other for toy ops.
pytestmark = pytest.mark.usefixtures("single_thread")


def test_demo_writes_report_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as the README types it (it once broke every reload)
    out = tmp_path / "runs" / "demo"
    rc = cli_main(["demo", "--out", "runs/demo", "--preset", "debug", "--steps", "4", "--batch-size", "2",
                   "--seq-len", "32", "--eval-every", "2", "--log-every", "2", "--warmup", "1",
                   "--vocab-size", "300", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| moge |" in printed and "| topk |" in printed and "report.md" in printed
    assert "| moge fp32 |" in printed and "| moge W8A8 (expert-aware, static) |" in printed
    for name in ("report.md", "overview.png", "loss.png", "balance.png", "group_loads.png", "expert_share.png",
                 "tokenizer.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "exactly 0 in every layer at every training step: yes" in report
    assert "![overview](overview.png)" in report and "## Samples" in report
    assert "| moge W8A8 (expert-aware, static) |" in report
    moge, topk = summarize(read_metrics(out / "moge", "moge")), summarize(read_metrics(out / "topk", "topk"))
    assert moge["max_is"] == 0.0 and moge["max_max_mean_load"] == 1.0
    assert topk["max_is"] > 0.0
    assert moge["parameters"] == topk["parameters"]  # same total and activated parameters
    assert set(moge["val_loss"]) == {"code", "prose", "math"}
    # both runs are loadable checkpoints with the shared tokenizer
    for r in ("moge", "topk"):
        assert json.loads((out / r / "config.json").read_text()).get("router", "moge") == r
        assert (out / r / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
