"""What a model reads and whether its answer depends on its batch: the
predictors of shrinkflow.predictors on a tiny real model (max_seq_len 32) and its
ONNX fp32 and dynamic-int8 exports."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkflow.config import Candidate, QuantizeStep
from shrinkflow.modeling import TOKENIZER
from shrinkflow.predictors import (HEAD_SHARE, TextEncoder, batch_dependent_ops, batch_invariance, load_predictor,
                                predict_served, softmax)

LONG = ("the plot follows a retired detective who returns to his home town after many years away and finds "
        "that nothing is as he left it, with old friends and older grudges in every street. ") * 2
VERDICT = "I loved every minute of it; a wonderful, moving film."


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_teacher_dir):
    from shrinkflow.compress import apply_recipe

    out = tmp_path_factory.mktemp("runtime-cands")
    return {"torch": tiny_teacher_dir,
            "fp32": apply_recipe(tiny_teacher_dir, Candidate(name="fp32"), out / "fp32", progress=False),
            "int8": apply_recipe(tiny_teacher_dir, Candidate(name="int8", recipe=(QuantizeStep(),)), out / "int8",
                                 progress=False)}


def test_head_truncation_is_reported(tiny_teacher_dir):
    enc = TextEncoder(tiny_teacher_dir / TOKENIZER, 32, "head")(["a fine film", LONG])
    assert enc.ids.shape == (2, 32)
    assert enc.truncated.tolist() == [False, True]
    # [CLS] a fine film [SEP]: 5 tokens read; the long text fills the budget
    assert enc.tokens_seen.tolist() == [5, 32]


def test_head_tail_keeps_the_first_quarter_and_the_end(tiny_teacher_dir):
    path = tiny_teacher_dir / TOKENIZER
    text = LONG + VERDICT
    head = TextEncoder(path, 32, "head")([text])
    both = TextEncoder(path, 32, "head_tail")([text, "a fine film"])
    from tokenizers import Tokenizer

    full = Tokenizer.from_file(str(path))
    full.no_truncation()
    full.no_padding()
    ids = full.encode(text).ids
    k = int(round(32 * HEAD_SHARE))
    assert k == 8 and len(ids) > 32
    assert both.ids[0].tolist() == ids[:k] + ids[-(32 - k):]       # [CLS] + 7 head tokens, then the tail and [SEP]
    assert both.ids[0, :k].tolist() == head.ids[0, :k].tolist()
    assert both.truncated.tolist() == [True, False] and both.tokens_seen.tolist() == [32, 5]
    # a short text reads exactly as with head truncation
    assert both.ids[1, :5].tolist() == TextEncoder(path, 32, "head")(["a fine film"]).ids[0].tolist()
    with pytest.raises(ValueError, match="unknown truncation"):
        TextEncoder(path, 32, "middle")


def test_head_tail_reads_a_short_text_exactly_as_head_does_after_vocabulary_pruning(tmp_path, tiny_teacher_dir,
                                                                                      small_splits):
    """A vocabulary-pruned tokenizer ("nearest": several tokens share an id)
    segments the same whatever the truncation strategy."""
    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import VocabPruneStep

    texts = small_splits["train"]["text"].tolist()
    out = apply_recipe(tiny_teacher_dir, Candidate(name="v", recipe=(VocabPruneStep(min_count=2),)), tmp_path / "v",
                       train_texts=texts, progress=False)
    short = small_splits["test"]["text"].tolist()[:30] + ["I loved every minute of it; a wonderful, moving film."]
    head = TextEncoder(out / TOKENIZER, 512, "head")(short)
    both = TextEncoder(out / TOKENIZER, 512, "head_tail")(short)
    assert not head.truncated.any() and np.array_equal(head.ids, both.ids) and np.array_equal(head.mask, both.mask)


def test_dynamic_int8_is_detected_as_batch_dependent(models):
    assert batch_dependent_ops(models["int8"] / "model.onnx") == ["DynamicQuantizeLinear"]
    assert batch_dependent_ops(models["fp32"] / "model.onnx") == []
    assert load_predictor(models["int8"], threads=1).batch_dependent is True
    assert load_predictor(models["fp32"], threads=1).batch_dependent is False
    assert load_predictor(models["torch"], threads=1).batch_dependent is False


def test_fp32_is_batch_invariant_and_dynamic_int8_is_not(models, small_splits):
    texts = small_splits["val"]["text"].tolist()[:48] + [LONG]
    fp32 = batch_invariance(load_predictor(models["fp32"], threads=1), texts)
    torch_ = batch_invariance(load_predictor(models["torch"], threads=1), texts)
    int8 = batch_invariance(load_predictor(models["int8"], threads=1), texts)
    assert fp32["rows"] == 49 and fp32["batch_size"] == 32 and len(fp32["labels_alone"]) == 49
    assert fp32["max_prob_diff"] < 1e-5 and fp32["label_flips"] == 0
    assert torch_["max_prob_diff"] < 1e-5 and torch_["label_flips"] == 0
    # one activation scale over the whole padded batch: outputs move, by more
    # than the default gate allows and far more than float rounding does
    assert int8["max_prob_diff"] > 1e-4 and int8["max_prob_diff"] > 20 * fp32["max_prob_diff"]


def test_per_row_serving_answers_exactly_what_a_text_gets_alone(models, small_splits):
    pred = load_predictor(models["int8"], threads=1)
    texts = small_splits["val"]["text"].tolist()[:20] + [LONG]
    alone = np.vstack([pred.predict_logits([t]) for t in texts])
    served = predict_served(pred, texts, per_row=True)
    assert np.array_equal(served.logits, alone)
    expected = TextEncoder(models["int8"] / TOKENIZER, 32)(texts)
    assert served.truncated.tolist() == expected.truncated.tolist() and served.truncated[-1]
    assert served.tokens_seen.tolist() == expected.tokens_seen.tolist() and served.tokens_seen[-1] == 32
    # batched by length: same order back, and for fp32 the same numbers within rounding
    fp32 = load_predictor(models["fp32"], threads=1)
    batched = predict_served(fp32, texts, per_row=False, chunk=8)
    np.testing.assert_allclose(softmax(batched.logits), softmax(np.vstack([fp32.predict_logits([t]) for t in texts])),
                               atol=1e-5)
    with pytest.raises(ValueError, match="no texts"):
        predict_served(pred, [], per_row=True)
