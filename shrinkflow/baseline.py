"""The small-direct baseline: a small model of the teacher's family, trained
directly. Its own module so that the small_direct stage (minutes of
training) does not depend on the frontier report's code."""

from __future__ import annotations

import copy

from shrinkflow.config import SmallDirectParams


def small_direct_model(teacher, spec: SmallDirectParams):
    """A BERT classifier shaped like the teacher but with ``num_layers`` layers.

    Random weights everywhere, except (init=teacher_embeddings) the embedding
    block, copied from the teacher.
    """
    from transformers import BertForSequenceClassification

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = spec.num_layers
    model = BertForSequenceClassification(config)
    if spec.init == "teacher_embeddings":
        model.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
    return model
