"""transformers integration: ``AutoConfig`` / ``AutoModelForCausalLM`` for Pangu Pro MoE checkpoints.

After ``import moge``, ``AutoModelForCausalLM.from_pretrained(path)`` loads a released-layout
directory (``model_type`` ``"PanguProMoE"``, or the draft ``"PanGuMoE"``; no ``trust_remote_code``)
into :class:`PanguProMoEForCausalLM`. The wrapper holds our :class:`~moge.model.MoGEModel` as
``.model`` and an ``lm_head``, so parameter names equal the checkpoint's (experts stacked); the head,
tying and losses are :mod:`moge.model`'s own functions, not copies. Loading and saving go through
:mod:`moge.checkpoint` (memory-mapped, per-expert tensors stacked on load, split on save).

The forward follows transformers' MoE models (``MoeCausalLMOutputWithPast``: ``aux_loss`` and
``router_logits`` with ``output_router_logits``) and takes the cache under either name transformers
has used (``past_key_values`` up to 5.23, ``cache`` from 5.24). Keyword arguments it does not know
are refused with an error naming them, never silently dropped.

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
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .checkpoint import CONFIG_NAME, CheckpointError, load_into, read_config, resolve_dtype, save_model
from .config import read_config_dict
from .errors import MoGEError
from .hf_config import PanGuMoEConfig, PanguProMoEConfig
from .model import MoGEModel, head_forward, init_module, make_lm_head

__all__ = ["PanGuMoEConfig", "PanGuMoEForCausalLM", "PanguProMoEConfig", "PanguProMoEForCausalLM", "register"]

# transformers 5.24 renamed the output's cache field from past_key_values to cache.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# from_pretrained keyword arguments that only matter for hub downloads or transformers' own loader.
_IGNORED_LOAD_KWARGS = {"trust_remote_code", "low_cpu_mem_usage", "local_files_only", "use_safetensors",
                        "attn_implementation", "cache_dir", "force_download", "proxies", "revision", "token",
                        "_from_auto", "_from_pipeline", "adapter_kwargs", "output_loading_info"}
# forward keyword arguments of transformers' TransformersKwargs for packed sequences: meaningful only
# with a varlen attention kernel, which this model does not have.
_PACKED_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "is_causal"}


class UnsupportedArgumentError(MoGEError, TypeError):
    """A keyword argument the model does not implement; the message names it."""


class PanguProMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """Pangu Pro MoE causal LM for transformers: ``model`` (:class:`MoGEModel`) plus ``lm_head``.

    ``forward`` returns :class:`~transformers.modeling_outputs.MoeCausalLMOutputWithPast` and accepts
    any cache with ``DynamicCache``'s interface.
    """

    config_class = PanguProMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: PanguProMoEConfig):
        super().__init__(config)
        self.moge_config = config.to_moge_config()
        self.model = MoGEModel(self.moge_config)
        self.lm_head = make_lm_head(self.moge_config, self.model.embed_tokens)
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
                output_router_logits: bool | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int | Tensor = 0, cache: Any = None,
                num_items_in_batch: int | Tensor | None = None, **kwargs: Any) -> MoeCausalLMOutputWithPast | tuple:
        """Logits ``[B,S,V]`` (or the last ``logits_to_keep``), the cache, and with ``labels`` the LM loss.

        ``attention_mask`` is the 2-D ``[B, past+S]`` padding mask (1 = real token); left padding is
        handled by position ids counted from each row's first real token. With
        ``output_router_logits`` (argument or config) the output also holds every MoE layer's router
        logits ``[B*S, N]`` and ``aux_loss``: the paper's per-layer balance loss summed over layers,
        already multiplied by ``router_aux_loss_coef`` (plus the z-loss), which is added to ``loss``
        when ``labels`` are given. ``num_items_in_batch`` (transformers' ``Trainer`` under gradient
        accumulation) makes the LM loss a sum over tokens divided by that count.
        """
        _check_forward_kwargs(kwargs, output_hidden_states, output_attentions)
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise UnsupportedArgumentError("pass the cache once: as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and attention_mask.dim() != 2:
            raise UnsupportedArgumentError(
                f"{type(self).__name__} takes a 2-D [batch, past+seq] attention_mask (got "
                f"{attention_mask.dim()}-D); use the default DynamicCache, not a static cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        h_BSH, stats = self.model(input_ids, attention_mask, position_ids, cache if use_cache else None,
                                  inputs_embeds)
        logits, loss, aux = head_forward(self.lm_head, h_BSH, stats, labels, logits_to_keep, num_items_in_batch)
        router_logits = None
        if output_router_logits:
            router_logits = tuple(st.router_logits for st in stats if st is not None)
            if loss is not None and aux is not None:
                loss = loss + aux
        out = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux if output_router_logits else None, logits=logits,
                                        router_logits=router_logits, **{_CACHE_FIELD: cache if use_cache else None})
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    # ---- loading and saving through moge.checkpoint ------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: PanguProMoEConfig | None = None, dtype: Any = None, torch_dtype: Any = None,
                        device_map: Any = None, subfolder: str = "", **kwargs: Any) -> "PanguProMoEForCausalLM":
        """Load a local released-layout directory (memory-mapped, built on the meta device).

        ``dtype`` (or the older ``torch_dtype``): ``"auto"``/None keeps the stored dtype, or
        ``torch.float32`` / ``torch.bfloat16`` / their names. ``device_map``: None, a device
        (``"cpu"``, ``"cuda:0"``) or ``{"": device}``. Hub downloads are not supported.
        """
        verify = kwargs.pop("verify", True)  # moge's own: manifest SHA-256 and NaN/inf refusal on load
        unknown = set(kwargs) - _IGNORED_LOAD_KWARGS
        if model_args or unknown:
            raise UnsupportedArgumentError(f"{cls.__name__}.from_pretrained got unsupported arguments: "
                                           f"{sorted(unknown) + [repr(a) for a in model_args]}")
        path = Path(pretrained_model_name_or_path) / subfolder
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a local checkpoint directory (Pangu Pro MoE checkpoints load "
                                  "from local released-layout directories only)")
        device = _resolve_device(device_map)
        tdtype = resolve_dtype(dtype if dtype is not None else torch_dtype)
        if config is None:
            moge_cfg = read_config(path)
            raw = read_config_dict(path / CONFIG_NAME)
            config = PanguProMoEConfig.from_moge_config(
                moge_cfg, **{k: raw[k] for k in ("use_cache", "output_router_logits") if k in raw})
        with torch.device("meta"):
            model = cls(config)
        load_into(model, path, config.to_moge_config(), tdtype, device, verify=verify)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        model.config.dtype = next(model.parameters()).dtype
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "2GB",
                        **kwargs: Any) -> None:
        """Write the released layout (see :func:`moge.checkpoint.save_pretrained`)."""
        save_model(self, save_directory, max_shard_size=max_shard_size)


class PanGuMoEForCausalLM(PanguProMoEForCausalLM):
    """The same model for configs of the draft ``model_type: "PanGuMoE"`` (transformers maps each
    config class to one model class); it saves under the released name."""

    config_class = PanGuMoEConfig


def _check_forward_kwargs(kwargs: dict[str, Any], output_hidden_states: bool | None,
                          output_attentions: bool | None) -> None:
    if output_hidden_states or output_attentions:
        which = "output_hidden_states" if output_hidden_states else "output_attentions"
        raise UnsupportedArgumentError(f"{which}=True is not supported by PanguProMoEForCausalLM yet")
    packed = sorted(k for k in _PACKED_KWARGS & set(kwargs)
                    if kwargs[k] is not None and not (k == "is_causal" and kwargs[k] is True))
    if packed:
        raise UnsupportedArgumentError(f"packed-sequence arguments {packed} are not supported (no varlen "
                                       f"attention); pass padded batches with an attention_mask")
    unknown = sorted(set(kwargs) - _PACKED_KWARGS)
    if unknown:
        raise UnsupportedArgumentError(f"PanguProMoEForCausalLM.forward got unexpected keyword arguments {unknown}")


def _resolve_device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise UnsupportedArgumentError("PanguProMoEForCausalLM supports device_map=None, a device, or {'': device}")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def register() -> None:
    """Register both model types with ``AutoConfig`` and ``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_cls, model_cls in ((PanguProMoEConfig, PanguProMoEForCausalLM), (PanGuMoEConfig, PanGuMoEForCausalLM)):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
