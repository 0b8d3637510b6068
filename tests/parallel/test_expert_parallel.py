"""Expert parallelism on CPU/gloo with 2 and 4 real processes (see ``_worker.py`` for the checks)."""

from __future__ import annotations

import time

import pytest
import torch

from moge.errors import MoGEError
from moge.model.moe import MoGELayer
from moge.parallel import ExpertParallelError, apply_expert_parallel, init_distributed

from .launch import launch

WORKER = "tests/parallel/_worker.py"


def _ok(results, scenario):
    for r in results:
        assert r.returncode == 0 and f"OK {scenario}" in r.stdout, f"rank {r.rank} failed:\n{r.stderr[-4000:]}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_device_and_moge_dispatch_is_sync_free(world):
    """Outputs, stats and gradients (input, router, router_scale, shared, experts) for MoGE, top-K and
    group-limited equal the single-device layer; the MoGE dispatch passes only equal splits and never
    syncs with the host; mismatched configs are caught."""
    _ok(launch([WORKER, "equivalence"], world), "equivalence")


@pytest.mark.timeout(120)
def test_rank_that_raises_stops_the_others_naming_it():
    t0 = time.monotonic()
    res = launch([WORKER, "raise"], 2, timeout_s=60, env={"MOGE_TEST_TIMEOUT": "30"})
    assert time.monotonic() - t0 < 60
    assert res[1].returncode not in (0, None) and "injected failure on rank 1" in res[1].stderr
    assert res[0].returncode not in (0, None), res[0].stdout
    assert "RankFailedError" in res[0].stderr and "rank 1 failed: ValueError: injected failure on rank 1" \
        in res[0].stderr, res[0].stderr[-3000:]


@pytest.mark.timeout(120)
def test_stuck_rank_makes_the_others_fail_at_the_timeout():
    """With the heartbeat off, the collective timeout still bounds a hang."""
    res = launch([WORKER, "hang"], 2, timeout_s=60, env={"MOGE_TEST_TIMEOUT": "4", "MOGE_TEST_HANG": "0"},
                 kill_ranks_after={1})
    assert res[0].returncode not in (0, None), "rank 0 should give up after the collective timeout"
    assert "RankFailedError" in res[0].stderr and "no rank reported an error" in res[0].stderr, res[0].stderr[-3000:]


@pytest.mark.timeout(120)
def test_hung_rank_is_named_by_the_heartbeat_long_before_the_timeout():
    """Rank 1 sleeps (alive, no progress): it is named, with where it is stuck, after the 2 s hang
    timeout instead of after the 30 s collective timeout; rank 0 raises RankFailedError naming it."""
    t0 = time.monotonic()
    res = launch([WORKER, "hang"], 2, timeout_s=60, env={"MOGE_TEST_TIMEOUT": "30", "MOGE_TEST_HANG": "2"})
    elapsed = time.monotonic() - t0
    sleep_line = next(i for i, line in enumerate(open(WORKER), 1) if "time.sleep(600)" in line)
    assert res[1].returncode == 3 and "rank 1 is hung" in res[1].stderr, res[1].stderr[-3000:]
    assert f"_worker.py:{sleep_line}" in res[1].stderr, "the message names where the rank is stuck"
    assert res[0].returncode not in (0, None)
    assert "RankFailedError" in res[0].stderr and "rank 1 failed: RankHungError: rank 1 is hung" in res[0].stderr, \
        res[0].stderr[-3000:]
    assert elapsed < 20, f"took {elapsed:.1f} s; the collective timeout is 30 s"


@pytest.mark.timeout(120)
def test_frozen_rank_is_named_by_its_silent_heartbeat():
    """Rank 1 is stopped whole (SIGSTOP: its own watchdog cannot run): rank 0 sees its heartbeat stop
    and ends itself naming rank 1, long before the 30 s collective timeout."""
    t0 = time.monotonic()
    res = launch([WORKER, "stop"], 2, timeout_s=60, env={"MOGE_TEST_TIMEOUT": "30", "MOGE_TEST_HANG": "2"},
                 kill_ranks_after={1})
    elapsed = time.monotonic() - t0
    assert res[0].returncode == 3, res[0].stderr[-3000:]
    assert "rank 1 stopped responding" in res[0].stderr, res[0].stderr[-3000:]
    assert elapsed < 25, f"took {elapsed:.1f} s; the collective timeout is 30 s"


def test_more_local_ranks_than_gpus_names_both_numbers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(MoGEError, match=r"local rank 1 needs a GPU of its own but only 1 CUDA device"):
        init_distributed()


def test_groups_must_divide_ranks_and_single_process_is_identity(monkeypatch):
    for v in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.group) == (0, 1, None)
    layer = MoGELayer(8, 6, 3, 4, 0, num_groups=3)
    assert apply_expert_parallel(layer, None) is layer  # one rank: nothing to shard
    with pytest.raises(ExpertParallelError, match=r"M=3 .*E=2"):
        _fake_world(layer, 2)


def _fake_world(layer, world):
    import moge.parallel.expert_parallel as ep
    real = ep.rank_and_world
    ep.rank_and_world = lambda group: (0, world)
    try:
        return ep.make_dispatcher(layer, None)
    finally:
        ep.rank_and_world = real
