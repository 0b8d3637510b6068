"""moge: Mixture-of-Grouped-Experts (MoGE) language models in PyTorch.

The Pangu Pro MoE architecture at any size: the exact MoGE router and its baselines, stacked-expert
layers with pluggable backends, the decoder model and published checkpoint layout, training,
expert parallelism, and load-balance / performance simulation.
"""

from .config import PRESETS, ConfigError, MoGEConfig, get_config
from .errors import MoGEError
from .metrics import device_loads, expert_load_cv, imbalance_score, max_over_mean_load
from .model.moe import MoGELayer, RouterStats, Routing
from .routing import aux_loss, group_limited_route, moge_route, topk_route, z_loss


__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ConfigError", "MoGEConfig", "MoGEError", "MoGELayer", "RouterStats", "Routing", "aux_loss",
    "device_loads", "expert_load_cv", "get_config", "group_limited_route", "imbalance_score",
    "max_over_mean_load", "moge_route", "topk_route", "z_loss",
]

