"""Task heads on the Pangu Pro MoE base model: transformers' own generic heads, not copies.

``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification`` /
``AutoModelForQuestionAnswering`` build transformers' ``GenericFor*`` classes with
:class:`~moge.hf.PanguProMoEModel` as ``model`` (so the backbone sits at ``model.model``; loading and
saving map it to the checkpoint's ``model.``, see :mod:`moge.hf_loading`). A causal-LM checkpoint
loads into them with the head newly initialised and reported, as transformers does.

Kept apart from :mod:`moge.hf` because ``transformers.modeling_layers`` imports transformers' auto
modules, whose first import is what triggers moge's lazy registration (``moge/__init__.py``).
"""

from __future__ import annotations

from transformers.modeling_layers import (GenericForQuestionAnswering, GenericForSequenceClassification,
                                          GenericForTokenClassification)

from .hf import PanguProMoEPreTrainedModel, _draft


class PanguProMoEForSequenceClassification(GenericForSequenceClassification, PanguProMoEPreTrainedModel):
    """Sequence classification: logits of the last non-pad token (``score`` ``[num_labels, H]``)."""


class PanguProMoEForTokenClassification(GenericForTokenClassification, PanguProMoEPreTrainedModel):
    """Token classification: per-token logits (``score`` ``[num_labels, H]``)."""


class PanguProMoEForQuestionAnswering(GenericForQuestionAnswering, PanguProMoEPreTrainedModel):
    """Extractive question answering: start/end logits (``qa_outputs`` ``[2, H]``)."""


HEADS = (PanguProMoEForSequenceClassification, PanguProMoEForTokenClassification, PanguProMoEForQuestionAnswering)
DRAFT_HEADS = tuple(_draft(cls) for cls in HEADS)


def register_heads() -> None:
    """Register the heads of both model types with their Auto classes (idempotent)."""
    from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    autos = (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoModelForQuestionAnswering)
    for classes in (HEADS, DRAFT_HEADS):
        for auto, cls in zip(autos, classes):
            auto.register(cls.config_class, cls, exist_ok=True)


register_heads()
