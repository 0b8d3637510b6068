"""transformers integration: the Auto classes for Pangu Pro MoE checkpoints.

``import moge.hf`` registers the classes with transformers (:func:`register`); afterwards
``AutoModelForCausalLM.from_pretrained(path)`` loads a released-layout directory (``model_type``
``"PanguProMoE"``, or the draft ``"PanGuMoE"``; no ``trust_remote_code``) into
:class:`PanguProMoEForCausalLM`; ``AutoModel`` gives the base model :class:`PanguProMoEModel` and
the sequence-classification, token-classification and question-answering Auto classes give
transformers' generic heads on it. ``import moge`` alone does not import transformers (it costs
seconds), so it does not register.

Modules, each importing only those listed before it:

* :mod:`.config` -- the transformers config classes (a view of :class:`moge.config.MoGEConfig`);
* :mod:`.static_cache` -- transformers' static caches at fixed shapes (full-graph compile);
* :mod:`.forward` -- transformers-style inputs and outputs around the backbone (:class:`moge.model.Backbone`);
* :mod:`.loading` -- ``from_pretrained`` through :mod:`moge.checkpoint`;
* :mod:`.modeling` -- the base class, the base model (a ``PreTrainedModel`` that is the backbone) and the
  causal LM;
* :mod:`.heads` -- transformers' generic task heads on the base model;
* :mod:`.auto` -- :func:`register`.
"""

from .auto import register
from .config import PanGuMoEConfig, PanguProMoEConfig
from .forward import UnsupportedArgumentError
from .heads import (PanguProMoEForQuestionAnswering, PanguProMoEForSequenceClassification,
                    PanguProMoEForTokenClassification)
from .modeling import (PanGuMoEForCausalLM, PanGuMoEModel, PanguProMoEForCausalLM, PanguProMoEModel,
                       PanguProMoEModelOutput, PanguProMoEPreTrainedModel)

__all__ = ["PanGuMoEConfig", "PanGuMoEForCausalLM", "PanGuMoEModel", "PanguProMoEConfig", "PanguProMoEForCausalLM",
           "PanguProMoEForQuestionAnswering", "PanguProMoEForSequenceClassification",
           "PanguProMoEForTokenClassification", "PanguProMoEModel", "PanguProMoEModelOutput",
           "PanguProMoEPreTrainedModel", "UnsupportedArgumentError", "register"]

register()
