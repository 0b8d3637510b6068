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


def _register_with_transformers() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type`` ``"PanguProMoE"`` (and the draft
    ``"PanGuMoE"``) without importing transformers now (it would add seconds to ``import moge``).

    The config class is registered when ``transformers.models.auto.configuration_auto`` has loaded, the
    model class when ``...modeling_auto`` has (only then is importing transformers' modeling stack safe:
    it imports ``configuration_auto`` itself, but never ``modeling_auto``). Modules loaded before
    ``import moge`` are handled at once. See :mod:`moge.hf`.
    """
    import importlib.abc
    import importlib.util
    import sys
    import warnings

    def register_config() -> None:
        from transformers.models.auto.configuration_auto import AutoConfig

        from .hf_config import PanGuMoEConfig, PanguProMoEConfig
        for cls in (PanguProMoEConfig, PanGuMoEConfig):
            AutoConfig.register(cls.model_type, cls, exist_ok=True)

    def register_model() -> None:
        from .hf import register
        register()

    actions = {"transformers.models.auto.configuration_auto": register_config,
               "transformers.models.auto.modeling_auto": register_model}

    def run(name: str) -> None:
        try:
            actions[name]()
        except Exception as e:  # never break the user's transformers import
            warnings.warn(f"moge: could not register PanguProMoE with transformers: {e!r}", stacklevel=2)

    pending = {}
    for name in actions:
        if name in sys.modules:
            run(name)
        else:
            pending[name] = True
    if not pending or importlib.util.find_spec("transformers") is None:
        return

    class _RunAfter(importlib.abc.Loader):
        def __init__(self, loader, name):
            self.loader, self.name = loader, name

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            self.loader.exec_module(module)
            run(self.name)

        def __getattr__(self, attr):  # get_data, get_filename, ... of the real loader
            return getattr(self.loader, attr)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in pending:
                return None
            # Stays on sys.meta_path afterwards (a dict miss per import): removing it here would
            # mutate the list the import system is iterating.
            pending.pop(fullname)
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _RunAfter(spec.loader, fullname)
                    return spec
            return None

    sys.meta_path.insert(0, _Finder())


_register_with_transformers()
