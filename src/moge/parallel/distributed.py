"""Process-group setup, start-up config check and bounded-time failure reporting.

``init_distributed`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and uses gloo on CPU, NCCL on CUDA, always with a timeout so that a
collective waiting for a dead peer fails instead of hanging. ``fault_guard`` wraps a rank's work: a
rank that raises writes ``rank r failed: <error>`` to the rendezvous store and closes its connections
at once, and a rank whose collective fails reads those records and raises :class:`RankFailedError`
naming the failed rank(s).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import MoGEError
from .comm import rank_and_world
from .heartbeat import Heartbeat


_FAIL_KEY = "moge/failed/{}"


class RankFailedError(MoGEError, RuntimeError):
    """Another rank failed (or a collective timed out); the message names the rank(s) when known."""


class ConfigMismatchError(MoGEError, ValueError):
    """Ranks started with different configurations; the message names the ranks and keys that differ."""


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` / ``world_size`` / ``local_rank``, its ``group`` and ``device``.

    ``group`` is ``None`` for a single process. ``store`` (the rendezvous key-value store) is kept so
    that failure records outlive a broken process group; ``timeout_s`` is the collective timeout.
    """
    rank: int
    world_size: int
    local_rank: int
    group: dist.ProcessGroup | None
    device: torch.device
    timeout_s: float = 120.0
    store: Any = field(default=None, repr=False)
    heartbeat: Any = field(default=None, repr=False)  # set by fault_guard while it runs

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes checkpoints and logs."""
        return self.rank == 0

    def busy(self, what: str):
        """Context manager marking a phase in which this rank works while the others wait in a
        collective, so the hang detector of :func:`fault_guard` does not call it hung."""
        return self.heartbeat.busy(what) if self.heartbeat is not None else nullcontext()


def init_distributed(timeout_s: float = 120.0, backend: str | None = None) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment variables and return a :class:`DistInfo`.

    Without those variables (or with ``WORLD_SIZE=1``) nothing is initialised and the result describes
    one process. ``backend`` defaults to ``nccl`` when CUDA is available (one GPU per local rank),
    else ``gloo``. ``timeout_s`` bounds every collective, so a dead or stuck rank makes the others
    fail after at most that long (NCCL needs its default async error handling for that).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    if cuda and local_rank >= torch.cuda.device_count():
        raise MoGEError(f"local rank {local_rank} needs a GPU of its own but only {torch.cuda.device_count()} "
                        f"CUDA device(s) are visible: start at most {torch.cuda.device_count()} processes per node "
                        f"(torchrun --nproc-per-node), or run on CPU with gloo (moge train --device cpu)")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return DistInfo(0, 1, 0, None, device, timeout_s)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK") if v not in os.environ]
    if missing:
        raise MoGEError(f"WORLD_SIZE={world} but {missing} not set; launch with torchrun")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    store = dist.distributed_c10d._get_default_store()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.group.WORLD, device, timeout_s, store)


def _config_digest(config: dict[str, Any]) -> int:
    text = json.dumps(config, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")  # fits in int64


def check_config_consistent(config: dict[str, Any], group: dist.ProcessGroup | None) -> None:
    """Raise :class:`ConfigMismatchError` on every rank if ranks were started with different configs.

    All-gathers a hash of the config's sorted JSON; only on a mismatch are the configs themselves
    gathered, to name the differing ranks and keys. A collective: every rank must call it.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    mine = torch.tensor([_config_digest(config)], dtype=torch.int64, device=device)
    digests = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(digests, mine, group=group)
    values = [int(d) for d in digests]
    if len(set(values)) == 1:
        return
    configs: list[Any] = [None] * world
    dist.all_gather_object(configs, config, group=group)
    bad = [r for r in range(world) if values[r] != values[0]]
    keys = sorted({k for r in bad for k in set(configs[0]) | set(configs[r])
                   if configs[0].get(k, "<missing>") != configs[r].get(k, "<missing>")})
    detail = "; ".join(f"rank {r}: " + ", ".join(f"{k}={configs[r].get(k, '<missing>')!r}" for k in keys)
                       for r in bad)
    raise ConfigMismatchError(f"ranks {bad} were started with a config different from rank 0's "
                              f"(differing keys {keys}; rank 0: "
                              + ", ".join(f"{k}={configs[0].get(k, '<missing>')!r}" for k in keys)
                              + f"; {detail})")


def _is_comm_error(e: BaseException) -> bool:
    if isinstance(e, (dist.DistError, RankFailedError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "broken pipe"))


def failed_ranks(info: DistInfo) -> dict[int, str]:
    """Failure records other ranks wrote to the store: ``{rank: "ExcType: message"}``."""
    out = {}
    if info.store is None:
        return out
    for r in range(info.world_size):
        key = _FAIL_KEY.format(r)
        try:
            if info.store.check([key]):
                out[r] = info.store.get(key).decode(errors="replace")
        except Exception:  # the store itself may be gone with its host; report what we have
            break
    return out


@contextmanager
def fault_guard(info: DistInfo, grace_s: float = 3.0, hang_s: float | None = None) -> Iterator[None]:
    """Run one rank's work so that any rank's failure ends every rank in bounded time, naming the rank.

    A local exception is recorded in the store, this rank's process group is aborted (its peers'
    pending collectives fail at once instead of at the timeout) and, after ``grace_s`` seconds during
    which the store stays readable, re-raised. A failed collective becomes :class:`RankFailedError`
    naming the ranks that recorded a failure; if none did (a killed process), the message says so and
    the launcher's log (torchrun names the exited rank) has the rest.

    A rank that is alive but hung is found by a :class:`~.heartbeat.Heartbeat` after ``hang_s``
    seconds (default a quarter of the collective timeout; 0 turns it off) and named the same way.
    """
    if info.world_size == 1:
        yield
        return

    hang_s = info.timeout_s / 4 if hang_s is None else hang_s
    watch = Heartbeat(info.store, info.rank, info.world_size, hang_s, _FAIL_KEY) \
        if hang_s > 0 and info.store is not None else None
    info.heartbeat = watch
    try:
        with watch if watch is not None else nullcontext():
            yield
    except BaseException as e:
        if _is_comm_error(e) and not isinstance(e, RankFailedError):
            deadline = time.monotonic() + grace_s
            failed = failed_ranks(info)
            while not failed and time.monotonic() < deadline:
                time.sleep(0.1)
                failed = failed_ranks(info)
            failed.pop(info.rank, None)
            if not failed and watch is not None and watch.suspects:  # the store died with the hung rank
                failed = dict(watch.suspects)
            if failed:
                who = "; ".join(f"rank {r} failed: {msg}" for r, msg in sorted(failed.items()))
                raise RankFailedError(f"rank {info.rank} stopped because {who}") from e
            raise RankFailedError(f"rank {info.rank}: a collective failed and no rank reported an error (a "
                                  f"process was killed or hung; collective timeout {info.timeout_s:g} s): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if info.store is not None:
            try:
                info.store.set(_FAIL_KEY.format(info.rank), f"{type(e).__name__}: {e}"[:500])
            except Exception:
                pass
        print(f"[rank {info.rank}] failed: {type(e).__name__}: {e}; aborting the process group", file=sys.stderr)
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        time.sleep(grace_s)  # rank 0 may host the store: keep it up while the peers read the record
        raise
    finally:
        info.heartbeat = None
