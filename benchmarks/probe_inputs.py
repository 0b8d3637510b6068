"""Probe moge with hostile and faulty input and count how each bad input is answered.

    PYTHONPATH=src python benchmarks/probe_inputs.py [--json OUT.json] [--only FAMILY] [--list]

Every probe (see ``probe_cases.py``) runs in a forked child (so an abort, a hang or a huge allocation
cannot take the runner down) under a 6 GiB address-space limit and a time limit. Outcomes:

* ``named``     -- a :class:`moge.MoGEError` (library) / exit status 2 with one ``error:`` line and no
  traceback (command line), or, for behaviour probes, the correct behaviour (a warning, a refusal);
* ``plain``     -- a clear ``ValueError`` / ``TypeError`` that is not a ``MoGEError`` (library only);
* ``traceback`` -- any other exception, a traceback, a signal, a time-out;
* ``silent``    -- the bad input was accepted (or a file outside the checkpoint was touched, or a
  corrupt checkpoint loaded).

Control probes (valid input) must succeed; they are reported apart. The summary line gives the
fraction of bad inputs answered ``named``, per family and in total, with and without the
``simulate`` family (``moge simulate`` is being rewritten separately).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_cases  # noqa: E402

LIMIT_AS = 6 << 30


def _child(probe, workdir: Path, conn_w: int) -> None:
    """Run one probe; write ``{"outcome", "detail"}`` as JSON to the pipe and exit."""
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))
    os.chdir(workdir)
    out, err = workdir / "stdout.txt", workdir / "stderr.txt"
    fo, fe = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644), os.open(err, os.O_WRONLY | os.O_CREAT, 0o644)
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    try:
        res = probe.run(workdir)
    except BaseException as e:  # noqa: BLE001 - the probe classifies what escaped
        res = probe_cases.classify_exception(e)
        traceback.print_exc()
    with os.fdopen(conn_w, "w") as f:
        f.write(json.dumps(res))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_probe(probe, root: Path, timeout_s: float) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"{probe.family}-", dir=root))
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(probe, workdir, w)
        finally:
            os._exit(3)
    os.close(w)
    status = None
    while time.monotonic() - t0 < timeout_s:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        text = f.read()
    dt = time.monotonic() - t0
    if status is None:
        return {"outcome": "traceback", "detail": f"timed out after {timeout_s:.0f} s", "s": dt}
    if not text:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        tail = (workdir / "stderr.txt").read_text(errors="replace")[-300:]
        return {"outcome": "traceback", "detail": f"process died (signal {sig}, status {status}): {tail}", "s": dt}
    res = json.loads(text)
    res["s"] = dt
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every probe's outcome to this file")
    ap.add_argument("--only", help="run one family")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=90.0)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)

    probes = probe_cases.all_probes()
    if args.only:
        probes = [p for p in probes if p.family == args.only]
    if args.list:
        for p in probes:
            print(f"{p.family:<12} {'control' if p.control else 'bad':<8} {p.name}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="moge-probes-"))
    probe_cases.prepare_fixtures(root / "fixtures")
    results = []
    for i, p in enumerate(probes):
        res = run_probe(p, root, args.timeout)
        res.update(family=p.family, name=p.name, control=p.control)
        results.append(res)
        mark = ("ok" if res["outcome"] == "ok" else "CONTROL FAILED") if p.control else res["outcome"]
        print(f"[{i + 1}/{len(probes)}] {p.family:<11} {mark:<10} {p.name}: {res.get('detail', '')[:160]}",
              flush=True)
    bad = [r for r in results if not r["control"]]
    fams = sorted({r["family"] for r in bad})
    print()
    print(f"{'family':<12}{'probes':>7}{'named':>7}{'plain':>7}{'trace':>7}{'silent':>7}{'named %':>9}")
    for fam in fams + ["ALL", "ALL-but-sim"]:
        rs = bad if fam == "ALL" else [r for r in bad if r["family"] != "simulate"] if fam == "ALL-but-sim" \
            else [r for r in bad if r["family"] == fam]
        c = {k: sum(r["outcome"] == k for r in rs) for k in ("named", "plain", "traceback", "silent")}
        print(f"{fam:<12}{len(rs):>7}{c['named']:>7}{c['plain']:>7}{c['traceback']:>7}{c['silent']:>7}"
              f"{100 * c['named'] / max(len(rs), 1):>8.1f}%")
    controls = [r for r in results if r["control"]]
    failed = [r["name"] for r in controls if r["outcome"] != "ok"]
    print(f"controls: {len(controls) - len(failed)}/{len(controls)} succeeded" + (f"; FAILED: {failed}" if failed else ""))
    touched = [r["name"] for r in results if r.get("touched_outside")]
    loaded = [r["name"] for r in results if r.get("corruption_loaded")]
    print(f"files touched outside a checkpoint: {len(touched)} {touched}")
    print(f"corrupt checkpoints loaded silently: {len(loaded)} {loaded}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
