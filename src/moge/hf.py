"""transformers integration: ``AutoConfig`` / ``AutoModelForCausalLM`` for ``model_type: "PanGuMoE"``.

After ``import moge``, ``AutoModelForCausalLM.from_pretrained(path)`` loads a published-layout Pangu Pro
MoE directory (no ``trust_remote_code``) into :class:`PanGuMoEForCausalLM`, whose ``.generate()`` runs
with transformers' ``DynamicCache``. The wrapper holds our :class:`~moge.model.MoGEModel` as ``.model``
and an ``lm_head``, so parameter names equal the checkpoint's (experts stacked). Loading and saving go
through :mod:`moge.checkpoint` (memory-mapped, per-expert tensors stacked on load, split on save):
transformers' generic loader would need a conversion rule to stack per-expert tensors, and ours already
checks names and shapes.

Registration is lazy: ``moge/__init__.py`` registers the classes when transformers' auto modules are
first imported, so ``import moge`` does not import transformers. :func:`register` does it explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .checkpoint import CheckpointError, load_into, read_config, resolve_dtype, save_pretrained as _save
from .hf_config import PanGuMoEConfig
from .model import MoGEModel, causal_lm_loss, init_module

__all__ = ["PanGuMoEConfig", "PanGuMoEForCausalLM", "register"]

# from_pretrained keyword arguments that only matter for hub downloads or transformers' own loader.
_IGNORED_LOAD_KWARGS = {"trust_remote_code", "low_cpu_mem_usage", "local_files_only", "use_safetensors",
                        "attn_implementation", "cache_dir", "force_download", "proxies", "revision", "token",
                        "_from_auto", "_from_pipeline", "adapter_kwargs", "output_loading_info"}


class PanGuMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """Pangu Pro MoE causal LM for transformers: ``model`` (:class:`MoGEModel`) plus ``lm_head``.

    ``forward`` returns :class:`CausalLMOutputWithPast` (``loss``: the shifted LM cross-entropy when
    ``labels`` are given; train with :mod:`moge.train` for the routers' losses) and accepts any cache
    with ``DynamicCache``'s interface.
    """

    config_class = PanGuMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: PanGuMoEConfig):
        super().__init__(config)
        self.moge_config = config.to_moge_config()
        self.model = MoGEModel(self.moge_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.moge_config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        init_module(module, self.config.initializer_range)  # the native model's initialisation

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Any = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | Tensor = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits ``[B,S,V]`` (or the last ``logits_to_keep``), the cache, and with ``labels`` the LM loss.

        ``attention_mask`` is the 2-D ``[B, past+S]`` padding mask (1 = real token); left padding is
        handled by position ids counted from each row's first real token.
        """
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("PanGuMoEForCausalLM takes a 2-D [batch, past+seq] attention_mask "
                             f"(got {attention_mask.dim()}-D); use the default DynamicCache, not a static cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        h_BSH, stats = self.model(input_ids, attention_mask, position_ids,
                                  past_key_values if use_cache else None, inputs_embeds)
        if isinstance(logits_to_keep, int):
            h_BSH = h_BSH[:, -logits_to_keep:] if logits_to_keep else h_BSH
        else:
            h_BSH = h_BSH[:, logits_to_keep]
        logits = self.lm_head(h_BSH)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

    # ---- loading and saving through moge.checkpoint ------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: PanGuMoEConfig | None = None, dtype: Any = None, torch_dtype: Any = None,
                        device_map: Any = None, subfolder: str = "", **kwargs: Any) -> "PanGuMoEForCausalLM":
        """Load a local published-layout directory (memory-mapped, built on the meta device).

        ``dtype`` (or the older ``torch_dtype``): ``"auto"``/None keeps the stored dtype, or
        ``torch.float32`` / ``torch.bfloat16`` / their names. ``device_map``: None, a device
        (``"cpu"``, ``"cuda:0"``) or ``{"": device}``. Hub downloads are not supported.
        """
        unknown = set(kwargs) - _IGNORED_LOAD_KWARGS
        if model_args or unknown:
            raise TypeError(f"PanGuMoEForCausalLM.from_pretrained got unsupported arguments: "
                            f"{sorted(unknown) + [repr(a) for a in model_args]}")
        path = Path(pretrained_model_name_or_path) / subfolder
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a local checkpoint directory (PanGuMoE loads local "
                                  "published-layout directories only)")
        device = _resolve_device(device_map)
        tdtype = resolve_dtype(dtype if dtype is not None else torch_dtype)
        if config is None:
            config = PanGuMoEConfig.from_moge_config(read_config(path))
        moge_cfg = config.to_moge_config()
        with torch.device("meta"):
            model = cls(config)
        load_into(model, path, moge_cfg, tdtype, device)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        model.config.dtype = next(model.parameters()).dtype
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "2GB",
                        **kwargs: Any) -> None:
        """Write the published layout (see :func:`moge.checkpoint.save_pretrained`)."""
        _save(self, save_directory, max_shard_size=max_shard_size)


def _resolve_device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError("PanGuMoEForCausalLM supports device_map=None, a device, or {'': device}")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def register() -> None:
    """Register ``PanGuMoE`` with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(PanGuMoEConfig.model_type, PanGuMoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(PanGuMoEConfig, PanGuMoEForCausalLM, exist_ok=True)
