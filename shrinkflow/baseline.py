"""The small-direct baseline: a small model of the teacher's family, trained
directly. Its own module so that the small_direct stage (minutes of
training) does not depend on the frontier report's code."""

from __future__ import annotations

import copy

from shrinkflow.config import SmallDirectParams


def small_direct_model(teacher, spec: SmallDirectParams):
    """A classifier of the teacher's family (BERT, MPNet, RoBERTa) shaped like
    the teacher but with ``num_layers`` layers.

    Random weights everywhere, except (init=teacher_embeddings) the embedding
    block, copied from the teacher.
    """
    from transformers import AutoModelForSequenceClassification

    from shrinkflow.arch import embeddings, family

    family(teacher)  # refuses an unsupported architecture by name
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = spec.num_layers
    model = AutoModelForSequenceClassification.from_config(config)
    if spec.init == "teacher_embeddings":
        embeddings(model).load_state_dict(embeddings(teacher).state_dict())
    return model
