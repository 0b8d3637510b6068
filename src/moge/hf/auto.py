"""Registration of the Pangu Pro MoE classes with transformers' Auto classes.

Both model types, the released ``"PanguProMoE"`` and the draft ``"PanGuMoE"``, map to the same
classes (the draft ones are subclasses that only change ``config_class``). Registration is explicit:
importing :mod:`moge.hf` calls :func:`register` once, and calling it again is harmless.
"""

from __future__ import annotations

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification, AutoModelForTokenClassification)

from .config import PanGuMoEConfig, PanguProMoEConfig
from .heads import DRAFT_HEADS, HEADS
from .modeling import PanGuMoEForCausalLM, PanGuMoEModel, PanguProMoEForCausalLM, PanguProMoEModel

_HEAD_AUTOS = (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoModelForQuestionAnswering)


def register() -> None:
    """Register both model types with ``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM`` and the
    sequence-classification, token-classification and question-answering Auto classes (idempotent)."""
    for config_cls, base, causal, heads in ((PanguProMoEConfig, PanguProMoEModel, PanguProMoEForCausalLM, HEADS),
                                            (PanGuMoEConfig, PanGuMoEModel, PanGuMoEForCausalLM, DRAFT_HEADS)):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, causal, exist_ok=True)
        for auto, head in zip(_HEAD_AUTOS, heads):
            auto.register(config_cls, head, exist_ok=True)
