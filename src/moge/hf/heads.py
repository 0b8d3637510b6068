"""Task heads on the Pangu Pro MoE base model: transformers' own generic heads, not copies.

``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification`` /
``AutoModelForQuestionAnswering`` build transformers' ``GenericFor*`` classes with
:class:`~moge.hf.modeling.PanguProMoEModel` as ``model`` (so the backbone sits at ``model.model``; loading and
saving map it to the checkpoint's ``model.``, see :mod:`moge.hf.loading`). A causal-LM checkpoint
loads into them with the head newly initialised and reported, as transformers does.
"""

from __future__ import annotations

from transformers.modeling_layers import (GenericForQuestionAnswering, GenericForSequenceClassification,
                                          GenericForTokenClassification)

from .modeling import PanguProMoEPreTrainedModel, draft_class


class PanguProMoEForSequenceClassification(GenericForSequenceClassification, PanguProMoEPreTrainedModel):
    """Sequence classification: logits of the last non-pad token (``score`` ``[num_labels, H]``)."""


class PanguProMoEForTokenClassification(GenericForTokenClassification, PanguProMoEPreTrainedModel):
    """Token classification: per-token logits (``score`` ``[num_labels, H]``)."""


class PanguProMoEForQuestionAnswering(GenericForQuestionAnswering, PanguProMoEPreTrainedModel):
    """Extractive question answering: start/end logits (``qa_outputs`` ``[2, H]``)."""

    # transformers' QA head reaches `<base model>.embed_tokens`; ours sits one level down, in the backbone.
    get_input_embeddings = PanguProMoEPreTrainedModel.get_input_embeddings
    set_input_embeddings = PanguProMoEPreTrainedModel.set_input_embeddings


HEADS = (PanguProMoEForSequenceClassification, PanguProMoEForTokenClassification, PanguProMoEForQuestionAnswering)
DRAFT_HEADS = tuple(draft_class(cls) for cls in HEADS)

