"""Task heads on the Pangu Pro MoE base model: transformers' own generic heads, not copies.

``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification`` /
``AutoModelForQuestionAnswering`` build transformers' ``GenericFor*`` classes with
:class:`~moge.hf.modeling.PanguProMoEModel` as ``model`` (the checkpoint's ``model.*`` tensor names, as in
the causal LM). A causal-LM checkpoint loads into them with the head newly initialised and reported, as
transformers does.
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


HEADS = (PanguProMoEForSequenceClassification, PanguProMoEForTokenClassification, PanguProMoEForQuestionAnswering)
DRAFT_HEADS = tuple(draft_class(cls) for cls in HEADS)

