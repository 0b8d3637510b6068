"""Progress in a log: whole lines naming their job, with step, rate and ETA; bars only on a terminal."""

import io

from moge.progress import LogProgress, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_name_the_job_and_never_share_a_line():
    out = io.StringIO()
    bars = [progress(10, f"train {r}", "step", file=out, interval=0.0) for r in ("moge", "topk")]
    assert all(isinstance(b, LogProgress) for b in bars)
    for _ in range(10):
        for b in bars:
            b.update(1)
            b.set_postfix(loss="4.210")
    bars[0].write("moge step 10: val loss 4.2")
    for b in bars:
        b.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert all(line.startswith(("[train moge] ", "[train topk] ")) for line in lines)
    moge = [line for line in lines if line.startswith("[train moge] step")]
    assert len(moge) == 11 and moge[4].startswith("[train moge] step 5/10 (50%)")  # 10 updates + the last line
    assert "step/s" in moge[4] and "ETA" in moge[4] and "loss=4.210" in moge[4]
    assert moge[-1].endswith("done") and "ETA" not in moge[-1]
    assert "[train moge] moge step 10: val loss 4.2" in lines


def test_interval_limits_lines_and_disable_prints_nothing():
    out = io.StringIO()
    p = progress(1000, "job", file=out, interval=3600.0)
    for _ in range(1000):
        p.update(1)
    p.close()
    assert out.getvalue().count("\n") == 1  # only the closing line within the hour
    quiet = io.StringIO()
    q = progress(5, "job", file=quiet, disable=True)
    q.update(5)
    q.close()
    assert quiet.getvalue() == ""


def test_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    bar = progress(3, "job", file=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
