"""One rank of a multi-process expert-parallel test, launched by ``launch.py`` like torchrun would.

Usage: ``python tests/parallel/_worker.py SCENARIO`` with RANK / WORLD_SIZE / MASTER_* set. Prints
``OK <scenario>`` on success; any failed check raises (non-zero exit, message on stderr).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from moge.model.moe import MoGELayer
from moge.parallel import (ConfigMismatchError, apply_expert_parallel, check_config_consistent, fault_guard,
                           init_distributed)

H, F, SHARED, T = 16, 12, 10, 6  # hidden, expert width, shared width, tokens per rank


class HostSync(AssertionError):
    pass


def make_layer(router: str, dtype: torch.dtype, backend: str) -> MoGELayer:
    """Same weights on every rank (fixed seed); non-trivial router_scale so its gradient is tested."""
    torch.manual_seed(0)
    # N=16 experts in M=4 groups, K'=2 per group (K=8): at E=2 each rank owns 2 groups, C=4 choices.
    layer = MoGELayer(H, 16, 8, F, SHARED, num_groups=4, router=router, topk_groups=2, aux_loss_coef=0.01,
                      experts_backend=backend)
    with torch.no_grad():
        layer.router_scale.uniform_(0.5, 1.5)
        layer.gate.weight.mul_(4.0)
    return layer.to(dtype)


def average_replicated_grads(layer: MoGELayer, group, world: int) -> None:
    """Data-parallel averaging of everything but the expert shards (FSDP2 does this in training). An
    expert shard already holds the gradient of every rank's loss (reverse all-to-all): only / world."""
    experts = {id(p) for p in layer.experts.parameters()}
    for p in layer.parameters():
        if id(p) not in experts:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)


def is_expert_sharded(name: str) -> bool:
    return ".experts." in f".{name}"


def close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol):
        err = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        raise AssertionError(f"rank {dist.get_rank()}: {what} differs (max abs err {err})")


def check_equivalence(group, rank: int, world: int, router: str, dtype: torch.dtype, backend: str,
                      dispatch: str = "auto") -> None:
    """EP outputs, stats and all gradients equal the single-device layer on the global batch."""
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    # The router runs in float32 by spec, so router-side gradients carry float32 rounding.
    gtol = 1e-6 if dtype == torch.float64 else 2e-5
    layer = make_layer(router, dtype, backend)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(world * T, H, generator=gen).to(dtype)
    g_all = torch.randn(world * T, H, generator=gen).to(dtype)
    mine = slice(rank * T, (rank + 1) * T)

    ref = copy.deepcopy(layer)
    x_ref = x_all.clone().requires_grad_(True)
    y_ref, _ = ref(x_ref)
    ((y_ref * g_all).sum(-1).mean()).backward()  # loss = mean over the global batch
    _, st_ref_local = copy.deepcopy(layer)(x_all[mine])

    ep = apply_expert_parallel(copy.deepcopy(layer), group, dispatch=dispatch)
    if dispatch == "auto":
        assert type(ep) is MoGELayer, "expert parallelism installs a dispatcher, the layer keeps its class"
        assert ep.dispatcher.name == ("fixed" if router == "moge" else "variable"), ep.dispatcher
    x = x_all[mine].clone().requires_grad_(True)
    y, st = ep(x.view(2, T // 2, H))  # leading dims are flattened like the single-device layer
    ((y.view(T, H) * g_all[mine]).sum(-1).mean()).backward()  # loss = mean over local tokens
    average_replicated_grads(ep, group, world)

    close(y.view(T, H), y_ref[mine].detach(), f"{router} output", tol)
    close(x.grad / world, x_ref.grad[mine], f"{router} input grad", gtol)
    ref_params = dict(ref.named_parameters())
    n_local = 16 // world
    for name, p in ep.named_parameters():
        want = ref_params[name].grad
        if is_expert_sharded(name):
            want = want[rank * n_local:(rank + 1) * n_local]
        assert p.grad is not None, f"{name} has no grad"
        close(p.grad, want, f"{router} grad of {name}", gtol)
    assert {n for n, _ in ep.named_parameters()} == set(ref_params), "parameter names changed"
    assert torch.equal(st.expert_counts, st_ref_local.expert_counts), "stats must describe the local tokens"
    assert torch.equal(st.group_loads, st_ref_local.group_loads)
    close(st.aux_loss, st_ref_local.aux_loss, "aux loss", gtol)
    assert st.num_tokens == T



@contextlib.contextmanager
def forbid_host_sync(calls: list):
    """Record every ``all_to_all_single`` into ``calls`` and make host reads of tensors (and count
    collectives) raise :class:`HostSync` while the block runs."""
    real_a2a = dist.all_to_all_single

    def recording_a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        calls.append((input.dtype, tuple(input.shape), tuple(output.shape), output_split_sizes, input_split_sizes))
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    def forbid(name):
        def raiser(*args, **kwargs):
            raise HostSync(f"{name} called on the dispatch path")
        return raiser

    patches = [(torch.Tensor, n) for n in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__",
                                           "__float__")] + [(torch, "nonzero"), (dist, "all_gather"),
                                                             (dist, "all_reduce"), (dist, "broadcast")]
    saved = [(obj, n, getattr(obj, n)) for obj, n in patches]
    dist.all_to_all_single = recording_a2a
    try:
        for obj, n in patches:
            setattr(obj, n, forbid(f"{getattr(obj, '__name__', obj)}.{n}"))
        yield
    finally:
        for obj, n, f in saved:
            setattr(obj, n, f)
        dist.all_to_all_single = real_a2a


def check_equal_split_calls(calls: list, world: int, n_calls: int) -> None:
    """The MoGE dispatch's all-to-alls: ``n_calls`` of them, equal splits, float payloads only."""
    assert len(calls) == n_calls, f"MoGE: expected {n_calls} all-to-alls, got {calls}"
    for dtype, in_shape, out_shape, out_splits, in_splits in calls:
        assert out_splits is None and in_splits is None, f"MoGE passed variable splits: {calls}"
        assert dtype.is_floating_point, f"MoGE exchanged a non-float tensor (counts?): {calls}"
        assert in_shape == out_shape and in_shape[0] % world == 0


def check_no_host_sync(group, rank: int, world: int) -> None:
    """The MoGE dispatch makes only equal-split float all-to-alls and never reads a tensor on the host."""
    calls = []

    def run(router: str) -> None:
        # grouped_mm: the sync-free experts backend (CUDA's ``auto``); CPU's ``auto`` (``sorted``) reads
        # per-expert counts on the host by design, which is free on a CPU and not part of the dispatch.
        layer = make_layer(router, torch.float32, "grouped_mm")
        ep = apply_expert_parallel(layer, group)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
        with forbid_host_sync(calls):
            y, st = ep(x)
            (y.square().mean() + st.aux_loss).backward()

    run("moge")
    check_equal_split_calls(calls, world, 6)  # 3 forward + 3 backward
    # Positive control: the same detectors catch the top-K dispatcher's count exchange and host sync.
    calls.clear()
    try:
        run("topk")
    except HostSync:
        pass
    else:
        raise AssertionError("top-K dispatch made no host sync: the detector is broken")
    assert calls and calls[0][0] == torch.int64, f"top-K should exchange int64 counts first: {calls}"


def check_config(group, rank: int, world: int) -> None:
    cfg = {"hidden_size": 16, "router": "moge", "seed": 0}
    check_config_consistent(cfg, group)  # equal: passes
    bad = dict(cfg, seed=7) if rank == world - 1 else cfg
    try:
        check_config_consistent(bad, group)
    except ConfigMismatchError as e:
        msg = str(e)
        assert f"ranks [{world - 1}]" in msg and "seed" in msg and "7" in msg, msg
    else:
        raise AssertionError("config mismatch not detected")


def main() -> None:
    scenario = sys.argv[1]
    torch.set_num_threads(1)
    # gloo on CPU explicitly: the tests start more ranks than a GPU machine may have GPUs.
    info = init_distributed(timeout_s=float(os.environ.get("MOGE_TEST_TIMEOUT", "30")), backend="gloo")
    rank, world, group = info.rank, info.world_size, info.group
    if scenario == "equivalence":
        check_config(group, rank, world)
        for router in ("moge", "topk", "group_limited"):
            check_equivalence(group, rank, world, router, torch.float64, "eager")
            check_equivalence(group, rank, world, router, torch.float32, "auto")
        check_equivalence(group, rank, world, "moge", torch.float64, "eager", dispatch="variable")
        check_no_host_sync(group, rank, world)
    elif scenario in ("raise", "hang", "stop"):
        ep = apply_expert_parallel(make_layer("moge", torch.float32, "auto"), group)
        with fault_guard(info, grace_s=2.0, hang_s=float(os.environ.get("MOGE_TEST_HANG", "0"))):
            if rank == world - 1:
                if scenario == "raise":
                    raise ValueError(f"injected failure on rank {rank}")
                if scenario == "stop":  # frozen whole: not even its heartbeat thread runs
                    os.kill(os.getpid(), signal.SIGSTOP)
                time.sleep(600)  # a stuck rank: named by the heartbeat, else the collective timeout
            for _ in range(3):
                y, _ = ep(torch.randn(T, H))
                y.sum().backward()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    dist.barrier()
    dist.destroy_process_group()
    print(f"OK {scenario} rank {rank}", flush=True)


if __name__ == "__main__":
    main()
