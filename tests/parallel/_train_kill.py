"""``moge train`` under torchrun, killed in the middle of its N-th DCP checkpoint save (a test fixture).

Usage: ``torchrun ... tests/parallel/_train_kill.py N train ARGS...``. On the N-th save every rank writes
its DCP shards into the staging directory; then rank 0 cuts one shard file in half (a write the kill
interrupted) and is SIGKILLed before anything is committed, and torchrun stops the other ranks.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from moge.cli import main
from moge.train import checkpointing

_real_save = checkpointing.save_sharded
_calls = [0]


def _save_then_die(path, state) -> None:
    _calls[0] += 1
    _real_save(path, state)
    if _calls[0] == int(sys.argv[1]) and os.environ.get("RANK") == "0":
        shard = sorted(Path(path).glob("*.distcp"))[0]
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


checkpointing.save_sharded = _save_then_die
raise SystemExit(main(sys.argv[2:]))
