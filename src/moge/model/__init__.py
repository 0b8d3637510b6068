"""The Pangu Pro MoE model on one device: attention, decoder blocks, the MoE layer, the decoder and its
causal-LM head, MTP predictors and the KV caches. No engine, scheduler or parallelism imports: those
layers build on this one (see docs/design.md)."""

from .attention import Attention, RotaryEmbedding, apply_rope
from .blocks import DecoderLayer, RMSNorm, build_attention_mask, causal_lm_loss, positions_from_padding
from .cache import CacheError, DynamicKVCache, StaticKVCache
from .decoder import (Backbone, KVCache, ModelOutput, MoGEForCausalLM, MoGEModel, count_parameters, head_forward,
                      init_module, make_lm_head)
from .moe import MoGELayer, RouterStats, Routing
from .mtp import MTPOutput, MTPPredictor, make_predictors, mtp_losses


__all__ = ["Attention", "Backbone", "CacheError", "DecoderLayer", "DynamicKVCache", "KVCache", "MTPOutput",
           "MTPPredictor", "ModelOutput", "MoGEForCausalLM", "MoGELayer", "MoGEModel", "RMSNorm", "RotaryEmbedding",
           "RouterStats", "Routing", "StaticKVCache", "apply_rope", "build_attention_mask", "causal_lm_loss",
           "count_parameters", "head_forward", "init_module", "make_lm_head", "make_predictors", "mtp_losses",
           "positions_from_padding"]
