"""Expert parallelism for MoGE models on torch.distributed (torchtitan-style: wraps the single-device layer).

``apply_expert_parallel(model, group)`` shards the routed experts of every :class:`moge.MoGELayer` by
whole groups and installs an expert-parallel dispatcher in it; with the MoGE router the dispatch is a fixed-size all-to-all with no count exchange and
no host sync. The rest is what a data-parallel + expert-parallel trainer needs: ``init_distributed``,
``sync_gradients``, unsharded state dicts, per-tensor (re)sharding, a start-up config check and
``fault_guard`` for bounded-time failures. See ``docs/parallel.md``.
"""

from .comm import all_to_all, rank_and_world
from .distributed import (ConfigMismatchError, DistInfo, RankFailedError, check_config_consistent, failed_ranks,
                          fault_guard, init_distributed)
from .expert_parallel import (ExactSplitDispatcher, ExpertParallelError, VariableSplitDispatcher,
                              apply_expert_parallel, fixed_split_moe, is_expert_parallel, make_dispatcher, moe_layers,
                              variable_split_moe)
from .state import (all_reduce_mean, clip_grad_norm_, full_state_dict, gather_named_tensor, is_expert_sharded,
                    load_full_state_dict, shard_named_tensor, sync_gradients)

__all__ = [
    "ConfigMismatchError", "DistInfo", "ExactSplitDispatcher", "ExpertParallelError", "RankFailedError",
    "VariableSplitDispatcher", "is_expert_parallel", "make_dispatcher", "moe_layers",
    "all_reduce_mean", "all_to_all", "apply_expert_parallel", "check_config_consistent", "clip_grad_norm_",
    "failed_ranks", "fault_guard", "fixed_split_moe", "full_state_dict", "gather_named_tensor", "init_distributed",
    "is_expert_sharded", "load_full_state_dict", "rank_and_world", "shard_named_tensor", "sync_gradients",
    "variable_split_moe",
]
