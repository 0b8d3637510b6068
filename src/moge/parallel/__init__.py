"""Scale-out training for MoGE models on PyTorch's distributed stack (DeviceMesh, FSDP2, DCP).

``build_mesh`` + ``shard_model`` lay a model out on a named ``(dp_shard, ep)`` mesh: dense parameters
sharded with FSDP2 over every rank, routed experts split by whole groups over ``ep`` and sharded with
FSDP2 over ``dp_shard``, and MoGE's exact-size dispatcher (a fixed-size all-to-all with no count
exchange and no host sync) installed in every MoE layer. ``apply_expert_parallel`` installs the same
dispatchers without FSDP. The rest is what a trainer needs: ``init_distributed``, the DTensor-aware
``clip_grad_norm_``, a start-up config check and ``fault_guard`` for bounded-time failures. See
``docs/parallel.md``.
"""

from .comm import all_to_all, rank_and_world
from .distributed import (ConfigMismatchError, DistInfo, RankFailedError, check_config_consistent, failed_ranks,
                          fault_guard, init_distributed)
from .expert_parallel import (ExactSplitDispatcher, ExpertParallelError, VariableSplitDispatcher,
                              apply_expert_parallel, fixed_split_moe, is_expert_parallel, make_dispatcher, moe_layers,
                              variable_split_moe)
from .fsdp import (MESH_DIMS, MIXED_PRECISION, MeshError, MeshShape, build_mesh, clip_grad_norm_, decoder_blocks,
                   local_numel, mixed_precision_policy, shard_model)
from .state import all_reduce_mean

__all__ = [
    "ConfigMismatchError", "DistInfo", "ExactSplitDispatcher", "ExpertParallelError", "MESH_DIMS",
    "MIXED_PRECISION", "MeshError", "MeshShape", "RankFailedError", "VariableSplitDispatcher",
    "all_reduce_mean", "all_to_all", "apply_expert_parallel", "build_mesh", "check_config_consistent",
    "clip_grad_norm_", "decoder_blocks", "failed_ranks", "fault_guard", "fixed_split_moe", "init_distributed",
    "is_expert_parallel", "local_numel", "make_dispatcher", "mixed_precision_policy", "moe_layers",
    "rank_and_world", "shard_model", "variable_split_moe",
]
