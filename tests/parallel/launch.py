"""Start N local ranks of a script the way torchrun does (env:// rendezvous on a free port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: killed by the launcher after the deadline
    stdout: str
    stderr: str


def launch(args: list[str], world: int, timeout_s: float = 90.0, env: dict[str, str] | None = None,
           kill_ranks_after: set[int] = frozenset()) -> list[RankResult]:
    """Run ``python *args`` as ranks 0..world-1; wait up to ``timeout_s`` for the ranks not in
    ``kill_ranks_after`` (those are killed once the others are done)."""
    port = free_port()
    procs = []
    for rank in range(world):
        e = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                 LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                 PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results: dict[int, RankResult] = {}
    try:
        for rank, p in enumerate(procs):
            if rank in kill_ranks_after:
                continue
            try:
                out, err = p.communicate(timeout=timeout_s)
                results[rank] = RankResult(rank, p.returncode, out, err)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                results[rank] = RankResult(rank, None, out, err)
    finally:
        for rank, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
            if rank not in results:
                out, err = p.communicate()
                results[rank] = RankResult(rank, p.returncode, out, err)
    return [results[r] for r in range(world)]
