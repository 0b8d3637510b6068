"""FSDP2 + MoGE expert parallelism on a named :class:`~torch.distributed.device_mesh.DeviceMesh`.

Shape legend
    N  routed experts (global)    L  experts per expert-parallel rank (N/E)
    D  data-parallel shard ranks  E  expert-parallel ranks    W  world size (D x E)

The mesh is ``(dp_shard, ep)`` (:data:`MESH_DIMS`; a tensor-parallel dimension would be a third
name). Dense parameters (embeddings, attention, norms, router, shared experts, head) are sharded with
FSDP2's ``fully_shard`` over all W ranks: every rank holds 1/W of each and all-gathers a decoder
layer's worth just before using it. Routed experts are first split by whole groups over ``ep`` (a
DTensor ``Shard(0)`` on the ``ep`` sub-mesh: rank (d, e) owns experts ``e*L ... (e+1)*L - 1``) and
then sharded with FSDP over ``dp_shard``, and the layer gets MoGE's exact-size dispatcher over the
``ep`` process group. Names and global shapes stay the single-device ones, so a DCP checkpoint
written at one mesh loads at another.

Gradients: each rank's loss is the mean over its own tokens; FSDP2 averages dense gradients over W.
An expert shard already receives the gradient of every ``ep`` peer's loss through the reverse
all-to-all, so its reduce-scatter over ``dp_shard`` is divided by W, not D (``set_gradient_divide_factor``).
Training at (D, E) is then the same computation as one process on the concatenated batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..errors import MoGEError
from .expert_parallel import make_dispatcher, moe_layers

MESH_DIMS = ("dp_shard", "ep")
MIXED_PRECISION = ("none", "bf16")


class MeshError(MoGEError, ValueError):
    """A mesh that does not fit the launch or the model (sizes, world, divisibility)."""


@dataclass(frozen=True)
class MeshShape:
    """The requested parallel layout: ``dp_shard`` x ``ep`` ranks."""
    dp_shard: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.dp_shard * self.ep

    def check(self, world: int, num_groups: int | None = None) -> None:
        """Raise :class:`MeshError` if the sizes cannot work for ``world`` processes (and M groups)."""
        for name, v in (("--dp-shard", self.dp_shard), ("--ep", self.ep)):
            if not isinstance(v, int) or v < 1:
                raise MeshError(f"{name} must be an integer >= 1, got {v!r}")
        if self.world != world:
            raise MeshError(f"--dp-shard {self.dp_shard} x --ep {self.ep} = {self.world} ranks but {world} "
                            f"process(es) were launched; use torchrun --nproc-per-node {self.world}")
        if num_groups is not None and num_groups % self.ep:
            raise MeshError(f"--ep {self.ep} must divide the model's {num_groups} expert groups (expert "
                            f"parallelism shards whole groups)")


def build_mesh(shape: MeshShape, device_type: str) -> DeviceMesh:
    """The ``(dp_shard, ep)`` mesh over the default process group (a collective: every rank calls it)."""
    return init_device_mesh(device_type, (shape.dp_shard, shape.ep), mesh_dim_names=MESH_DIMS)


def mixed_precision_policy(name: str) -> MixedPrecisionPolicy:
    """``none``: float32 everywhere; ``bf16``: bfloat16 compute with float32 gradient reduction."""
    if name not in MIXED_PRECISION:
        raise MeshError(f"mixed precision must be one of {MIXED_PRECISION}, got {name!r}")
    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _shard_experts_over_ep(model: nn.Module, mesh: DeviceMesh, dispatch: str) -> list[str]:
    """Keep this rank's block of whole groups as a ``Shard(0)`` DTensor on ``ep``; install dispatchers."""
    ep_mesh = mesh["ep"]
    names = []
    for name, layer in moe_layers(model):
        d = make_dispatcher(layer, ep_mesh.get_group(), dispatch)
        block = slice(d.local_experts.start, d.local_experts.stop)
        for pname in ("gate_up_proj", "down_proj"):
            full = getattr(layer.experts, pname)
            # from_local, not distribute_tensor: every rank already holds identical full weights.
            local = DTensor.from_local(full.detach()[block].clone(), ep_mesh, [Shard(0)], run_check=False)
            setattr(layer.experts, pname, nn.Parameter(local, requires_grad=full.requires_grad))
        layer.dispatcher = d
        names.append(name)
    return names


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 gathers one at a time: every decoder layer, MTP predictors included."""
    blocks = list(model.model.layers)
    blocks += list(getattr(model, "mtp", []))
    return blocks


def shard_model(model: nn.Module, mesh: DeviceMesh, mixed_precision: str = "none", dispatch: str = "auto",
                activation_checkpointing: bool = False) -> list[str]:
    """Apply expert parallelism and FSDP2 to a :class:`moge.model.MoGEForCausalLM` in place.

    Every rank must pass identically initialised weights. Returns the names of the MoE layers whose
    experts are sharded over ``ep`` (empty when ``ep`` is 1). ``activation_checkpointing`` recomputes
    each decoder layer in backward instead of storing its activations.
    """
    _refuse_single_rank_overflow_dtypes(model, mesh)
    world_mesh = mesh._flatten("dp") if mesh.ndim > 1 else mesh  # all W ranks, for the dense parameters
    policy = mixed_precision_policy(mixed_precision)
    sharded = _shard_experts_over_ep(model, mesh, dispatch) if mesh["ep"].size() > 1 else []
    for _, layer in moe_layers(model):
        fully_shard(layer.experts, mesh=mesh["dp_shard"], mp_policy=policy)
        layer.experts.set_gradient_divide_factor(float(mesh.size()))  # see the module docstring
    for block in decoder_blocks(model):
        head = getattr(block, "shared_head", None)
        if head is not None:  # an MTP predictor's logits() calls its norm outside the block's forward
            fully_shard(head.norm, mesh=world_mesh, mp_policy=policy)
        fully_shard(block, mesh=world_mesh, mp_policy=policy)
    if not model.config.tie_word_embeddings:
        # Their own units: else the root gathers both [V,H] matrices at once and keeps them all step.
        fully_shard(model.model.embed_tokens, mesh=world_mesh, mp_policy=policy)
        fully_shard(model.lm_head, mesh=world_mesh, mp_policy=policy)
    fully_shard(model, mesh=world_mesh, mp_policy=policy)
    if torch.distributed.get_backend(world_mesh.get_group()) == "gloo":
        _sum_then_divide(model, mesh)
    model.model.gradient_checkpointing = activation_checkpointing
    return sharded


def _sum_then_divide(model: nn.Module, mesh: DeviceMesh) -> None:
    # gloo has neither ReduceOp.AVG nor PREMUL_SUM, which FSDP2 picks for float32/bfloat16: reduce
    # with SUM and divide afterwards instead. Not for a one-rank shard mesh, whose copy path already
    # divides (torch 2.13 would divide twice).
    one_rank = mesh["dp_shard"].size() == 1
    experts = {id(layer.experts) for _, layer in moe_layers(model)}
    for m in model.modules():
        if isinstance(m, FSDPModule) and not (one_rank and id(m) in experts):
            m.set_force_sum_reduction_for_comms(True)


def _refuse_single_rank_overflow_dtypes(model: nn.Module, mesh: DeviceMesh) -> None:
    # torch 2.13's FSDP2 splits the divide factor into a pre- and post-division for float16/float64
    # gradients and its one-rank path divides by the whole factor again: experts over a one-rank
    # dp_shard would get gradients W times too small. float32 and bfloat16 take the correct path.
    if mesh["dp_shard"].size() == 1 and mesh.size() > 1:
        bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.float64)})
        if bad:
            raise MeshError(f"--dp-shard 1 with {bad} weights: FSDP2 scales their expert gradients wrongly on a "
                            f"one-rank shard mesh; train float32 master weights (or use --dp-shard >= 2)")


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Global gradient-norm clipping for plain and DTensor gradients (FSDP2 shards, expert shards).

    Gradients are grouped by the mesh they live on; torch's own ``get_total_norm`` runs per group and
    each DTensor norm is made whole (``full_tensor``: a scalar all-reduce over its mesh), so the
    result is the norm the unsharded model would have. Then every gradient is scaled by
    ``min(1, max_norm / (norm + 1e-6))`` with ``clip_grads_with_norm_``. Returns the norm before
    clipping; no host sync.
    """
    groups: dict[object, list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if not groups:
        return torch.zeros(())
    parts = []
    for params in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        parts.append(n.full_tensor() if isinstance(n, DTensor) else n)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in parts), torch.float32)
    stacked = torch.stack([t.to(dtype) for t in parts])
    total = stacked.max() if math.isinf(norm_type) else stacked.pow(norm_type).sum().pow(1.0 / norm_type)
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def local_numel(t: Tensor) -> int:
    """Elements this rank stores of ``t`` (its local shard for a DTensor)."""
    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()
