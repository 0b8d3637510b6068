"""FSDP2 + MoGE expert parallelism on a (dp_shard, ep) mesh, CPU/gloo with 2 and 4 real processes
(see ``_worker_fsdp.py`` for the checks)."""

from __future__ import annotations

import pytest

from .launch import launch

WORKER = "tests/parallel/_worker_fsdp.py"


def _ok(results, scenario):
    for r in results:
        assert r.returncode == 0 and f"OK {scenario}" in r.stdout, f"rank {r.rank} failed:\n{r.stderr[-4000:]}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp_shard,ep", [(1, 2), (2, 2)])
def test_fsdp_ep_model_matches_one_process_on_the_whole_batch(dp_shard, ep):
    """Every gradient (made whole from its FSDP/EP shards), the clipped global norm (DTensor-aware
    clip_grad_norm_) and the weights after 3 AdamW steps equal one process on the concatenated batch,
    with and without activation checkpointing; the dry-run plan's per-rank elements equal every measured
    local shard; the MoGE dispatch stays free of host syncs under FSDP2; bf16 mixed precision computes
    in bfloat16 with float32 weights and gradients."""
    _ok(launch([WORKER, "equivalence", str(dp_shard), str(ep)], dp_shard * ep, timeout_s=110), "equivalence")
