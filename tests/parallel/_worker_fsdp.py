"""One rank of a multi-process FSDP2 + expert-parallel test, launched by ``launch.py`` like torchrun would.

Usage: ``python tests/parallel/_worker_fsdp.py SCENARIO DP_SHARD EP`` with RANK / WORLD_SIZE / MASTER_*
set. Prints ``OK <scenario>`` on success; any failed check raises (non-zero exit, message on stderr).
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moge.config import get_config
from moge.model import MoGEForCausalLM
from moge.parallel import (MeshShape, build_mesh, clip_grad_norm_, init_distributed, is_expert_parallel, local_numel,
                           shard_model)
from moge.parallel.plan import local_numels, param_shapes

from _worker import HostSync, check_equal_split_calls, forbid_host_sync  # the script's own directory


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol):
        err = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        raise AssertionError(f"rank {dist.get_rank()}: {what} differs (max abs err {err})")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def check_model_equivalence(mesh, rank: int, world: int, checkpointing: bool, dtype: torch.dtype) -> None:
    """FSDP2 + EP gradients, clipped global norm and 3 AdamW steps equal one process on the whole batch."""
    # float64 isolates the layout from rounding (the router still runs in float32 by spec).
    tol = 1e-6 if dtype == torch.float64 else 2e-5
    # vocab 510: the embedding and head split unevenly over 4 ranks (128, 128, 128, 126 rows).
    cfg = get_config("debug", router_aux_loss_coef=0.0, experts_backend="eager", vocab_size=510)
    torch.manual_seed(0)
    model = MoGEForCausalLM(cfg).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (world * 2, 8), generator=torch.Generator().manual_seed(3))
    mine = slice(rank * 2, (rank + 1) * 2)
    ref = copy.deepcopy(model)
    sharded = copy.deepcopy(model)
    names = shard_model(sharded, mesh, activation_checkpointing=checkpointing)
    want_layers = cfg.num_hidden_layers if mesh["ep"].size() > 1 else 0
    assert len(names) == want_layers and sum(map(is_expert_parallel, sharded.modules())) == want_layers, names
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2, foreach=False)
    for step in range(3):
        loss_ref = ref(ids, labels=ids).loss
        loss_ref.backward()
        loss = sharded(ids[mine], labels=ids[mine]).loss
        loss.backward()
        if step == 0:
            grad_numels = {name: local_numel(p.grad) for name, p in sharded.named_parameters()}
            ref_params = dict(ref.named_parameters())
            for name, p in sharded.named_parameters():
                assert isinstance(p, DTensor), f"{name} is not sharded"
                close(full(p.grad), ref_params[name].grad, f"grad of {name}", tol)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        norm = clip_grad_norm_(sharded.parameters(), 0.05)
        close(norm.double(), norm_ref.double(), f"step {step} global grad norm", tol)
        assert norm_ref > 0.05, "the test must actually clip"
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    check_plan_matches_shards(sharded, opt, grad_numels, cfg, mesh, rank)
    ref_sd = ref.state_dict()
    # AdamW normalises each gradient element, so float32 rounding in a near-zero one moves a weight by
    # up to a step (lr): weights are compared looser than gradients in float32.
    tol = tol if dtype == torch.float64 else 5e-4
    for name, p in sharded.named_parameters():
        close(full(p.detach()), ref_sd[name], f"weight {name} after 3 steps", tol)


def check_plan_matches_shards(model, opt, grad_numels: dict, cfg, mesh, rank: int) -> None:
    """The dry-run memory plan's per-rank elements equal this rank's measured local shards of every
    parameter, its gradient and both AdamW moments (after a step, so all of them exist)."""
    plan = local_numels(param_shapes(cfg), mesh["dp_shard"].size(), mesh["ep"].size(), rank)
    for name, p in model.named_parameters():
        measured = {"param": local_numel(p), "grad": grad_numels[name], "exp_avg": local_numel(opt.state[p]["exp_avg"]),
                    "exp_avg_sq": local_numel(opt.state[p]["exp_avg_sq"])}
        for what, n in measured.items():
            assert n == plan[name], f"rank {rank}: {name} {what} holds {n} elements, the plan says {plan[name]}"


def check_mixed_precision(mesh, rank: int, world: int) -> None:
    """--mixed-precision bf16: layers compute in bfloat16, master weights and gradients stay float32,
    and the loss stays near the float32 one."""
    cfg = get_config("debug", router_aux_loss_coef=0.0, experts_backend="eager")
    torch.manual_seed(0)
    model = MoGEForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (world * 2, 8), generator=torch.Generator().manual_seed(3))
    mine = slice(rank * 2, (rank + 1) * 2)
    want = copy.deepcopy(model)(ids, labels=ids).loss
    shard_model(model, mesh, mixed_precision="bf16")
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    loss = model(ids[mine], labels=ids[mine]).loss
    loss.backward()
    assert seen == [torch.bfloat16], seen
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, (name, p.dtype, p.grad.dtype)
    total = loss.detach().float().clone()
    dist.all_reduce(total)
    assert abs(float(total) / world - float(want)) < 0.05, (float(total) / world, float(want))


def check_no_host_sync_under_fsdp(mesh, rank: int) -> None:
    """A whole FSDP2 + EP model step with the sync-free experts backend: the MoGE dispatch passes only
    equal-split float all-to-alls and nothing reads a tensor on the host (FSDP2's own gathers and
    reduce-scatters included), forward and backward."""
    cfg = get_config("debug", router_aux_loss_coef=0.01, experts_backend="grouped_mm")
    torch.manual_seed(0)
    model = MoGEForCausalLM(cfg)
    shard_model(model, mesh)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))
    calls: list = []
    with forbid_host_sync(calls):
        # labels=None: the LM loss's ignore-index bookkeeping is not the dispatch; a plain loss instead.
        out = model(ids, check_ids=False)  # the id range check reads the host by design
        (out.logits.float().square().mean() + out.aux_loss).backward()
    moe = sum(map(is_expert_parallel, model.modules()))
    check_equal_split_calls(calls, mesh["ep"].size(), 6 * moe)
    # Positive control: the detector does fire under FSDP2 (a host read inside the block).
    try:
        with forbid_host_sync([]):
            model(ids, check_ids=False).logits.sum().item()
    except HostSync:
        pass
    else:
        raise AssertionError("the host-sync detector did not fire")


def main() -> None:
    scenario, dp, ep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    info = init_distributed(timeout_s=float(os.environ.get("MOGE_TEST_TIMEOUT", "60")), backend="gloo")
    mesh = build_mesh(MeshShape(dp, ep), "cpu")
    if scenario == "equivalence":
        # FSDP2 divides twice on a one-rank mesh for float64 (shard_model refuses it): float32 there.
        dtype = torch.float64 if dp > 1 else torch.float32
        check_model_equivalence(mesh, info.rank, info.world_size, checkpointing=False, dtype=dtype)
        check_model_equivalence(mesh, info.rank, info.world_size, checkpointing=True, dtype=dtype)
        if ep > 1:
            check_no_host_sync_under_fsdp(mesh, info.rank)
        if dp > 1:
            check_mixed_precision(mesh, info.rank, info.world_size)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    dist.barrier()
    dist.destroy_process_group()
    print(f"OK {scenario} rank {info.rank}", flush=True)


if __name__ == "__main__":
    main()
