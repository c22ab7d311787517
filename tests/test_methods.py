"""Compression methods on a tiny real model: each one does what it claims."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shrinkflow.config import Candidate, DistillStep, MagnitudePruneStep, QuantizeStep, VocabPruneStep
from shrinkflow.modeling import TOKENIZER, encode, load_tokenizer, load_torch_model


@pytest.fixture
def teacher(tiny_teacher_dir):
    return load_torch_model(tiny_teacher_dir)


def logits(model, tok, texts):
    ids, mask = encode(tok, texts)
    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def test_student_keeps_the_chosen_teacher_layers(teacher):
    from shrinkflow.compress.distill import make_student

    student = make_student(teacher, (0,))
    assert student.config.num_hidden_layers == 1 and teacher.config.num_hidden_layers == 2
    assert torch.equal(student.bert.encoder.layer[0].output.dense.weight,
                       teacher.bert.encoder.layer[0].output.dense.weight)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    with pytest.raises(ValueError, match="out of range for a 2-layer teacher"):
        make_student(teacher, (0, 5))


def test_distillation_loss_falls(teacher, tiny_teacher_dir, small_splits):
    from shrinkflow.compress.distill import distill

    tok = load_tokenizer(tiny_teacher_dir / TOKENIZER, 32)
    tok.no_padding()
    texts = small_splits["train"]["text"].tolist()[:160]
    seqs = [e.ids for e in tok.encode_batch(texts)]
    labels = small_splits["train"]["label"].to_numpy()[:160]
    log: list[float] = []
    student = distill(teacher, seqs, labels, DistillStep(layers=(1,), epochs=4, batch_size=16, learning_rate=3e-3),
                      threads=1, progress=False, log=log)
    first, last = np.mean(log[:5]), np.mean(log[-5:])
    assert last < 0.8 * first, (first, last)
    assert student.config.num_hidden_layers == 1


def test_distill_loss_is_zero_for_a_perfect_copy_at_alpha_1():
    from shrinkflow.compress.distill import distill_loss

    t = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    assert distill_loss(t, t, torch.tensor([0, 1]), 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(-t, t, torch.tensor([0, 1]), 2.0, 1.0).item() > 0.1


def test_resegmenting_vocab_prune_gives_identical_logits_on_in_vocab_text(teacher, tiny_teacher_dir, small_splits):
    from shrinkflow.compress.recipe import transform_torch

    texts = small_splits["train"]["text"].tolist()
    tok_json = (tiny_teacher_dir / TOKENIZER).read_text()
    before = logits(teacher, load_tokenizer(tiny_teacher_dir / TOKENIZER, 32), texts[:20])
    pruned, new_json, stats = transform_torch(load_torch_model(tiny_teacher_dir), tok_json,
                                              Candidate(name="v", recipe=(VocabPruneStep(unseen_tokens="resegment"),)),
                                              texts, None)
    assert stats["vocab_size"] < 0.5 * teacher.config.vocab_size
    assert pruned.bert.embeddings.word_embeddings.weight.shape[0] == stats["vocab_size"]
    from tokenizers import Tokenizer

    new_tok = Tokenizer.from_str(new_json)
    new_tok.enable_truncation(32)
    new_tok.enable_padding(pad_id=new_tok.token_to_id("[PAD]"))
    np.testing.assert_allclose(logits(pruned, new_tok, texts[:20]), before, atol=1e-5)
    # Unseen words still tokenize into kept pieces (single characters at worst).
    assert new_tok.token_to_id("[UNK]") not in new_tok.encode("zyxwvut qqqq").ids


def test_unseen_tokens_read_their_nearest_kept_embedding_and_keep_the_teachers_segmentation(
        teacher, tiny_teacher_dir, small_splits):
    import torch
    from tokenizers import Tokenizer

    from shrinkflow.compress.recipe import transform_torch

    texts = small_splits["train"]["text"].tolist()
    tok_json = (tiny_teacher_dir / TOKENIZER).read_text()
    unseen = "zyxwvut quizzically photosynthesis"
    full = Tokenizer.from_str(tok_json)
    step = VocabPruneStep(unseen_tokens="nearest")
    pruned, new_json, stats = transform_torch(load_torch_model(tiny_teacher_dir), tok_json,
                                              Candidate(name="v", recipe=(step,)), texts, None)
    new_tok = Tokenizer.from_str(new_json)
    old_ids, new_ids = full.encode(unseen).ids, new_tok.encode(unseen).ids
    assert len(new_ids) == len(old_ids)                      # segmented exactly as the teacher does
    assert max(new_ids) < stats["vocab_size"] == pruned.config.vocab_size
    emb = torch.nn.functional.normalize(teacher.bert.embeddings.word_embeddings.weight.detach(), dim=1)
    kept_rows = torch.nn.functional.normalize(pruned.bert.embeddings.word_embeddings.weight.detach(), dim=1)
    dropped = 0
    for old, new in zip(old_ids, new_ids):
        sims = kept_rows @ emb[old]
        # The row it reads is the most similar kept row (itself, if it was kept).
        assert sims[new].item() == pytest.approx(sims.max().item(), abs=1e-6)
        dropped += sims[new].item() < 1 - 1e-6
    assert dropped >= 2                                      # the test does exercise dropped tokens
    # In-vocabulary text is unchanged, as with "resegment".
    before = logits(teacher, load_tokenizer(tiny_teacher_dir / TOKENIZER, 32), texts[:20])
    new_tok.enable_truncation(32)
    new_tok.enable_padding(pad_id=new_tok.token_to_id("[PAD]"))
    np.testing.assert_allclose(logits(pruned, new_tok, texts[:20]), before, atol=1e-5)


def test_one_shot_magnitude_pruning_hits_the_target_exactly(teacher):
    from shrinkflow.compress.magnitude import encoder_linears, magnitude_prune, sparsity

    total = sum(m.weight.numel() for m in encoder_linears(teacher))
    original = torch.cat([m.weight.detach().abs().flatten() for m in encoder_linears(teacher)]).clone()
    magnitude_prune(teacher, 0.3)
    assert sparsity(teacher) == pytest.approx(round(0.3 * total) / total, abs=1e-12)
    after = torch.cat([m.weight.detach().flatten() for m in encoder_linears(teacher)])
    # Global, not per layer: every survivor is at least as large as every pruned weight.
    assert original[after != 0].min() >= original[after == 0].max()
    magnitude_prune(teacher, 0.7)
    assert sparsity(teacher) == pytest.approx(round(0.7 * total) / total, abs=1e-12)


def test_composed_recipe_produces_a_working_smaller_candidate(tmp_path, tiny_teacher_dir, small_splits):
    from shrinkflow.compress import apply_recipe
    from shrinkflow.files import dir_size_bytes
    from shrinkflow.modeling import read_manifest
    from shrinkflow.predictors import load_predictor, predict_labels

    train = small_splits["train"]
    cand = Candidate(name="all", recipe=(DistillStep(layers=(0,), epochs=1, batch_size=16),
                                          VocabPruneStep(), MagnitudePruneStep(target_sparsity=0.5),
                                          QuantizeStep()))
    out = apply_recipe(tiny_teacher_dir, cand, tmp_path / "all", train_texts=train["text"].tolist(),
                       train_labels=train["label"].to_numpy(), threads=1, progress=False)
    stats = read_manifest(out)["stats"]
    assert stats["layers"] == [0] and stats["encoder_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert dir_size_bytes(out) < 0.2 * dir_size_bytes(tiny_teacher_dir)
    pred = predict_labels(load_predictor(out, threads=1), small_splits["test"]["text"].tolist())
    assert set(pred.tolist()) <= {0, 1} and len(pred) == len(small_splits["test"])
    assert not (tmp_path / ".all.tmp").exists()


def test_recipe_order_errors():
    from shrinkflow.config import ParamsError, parse_params

    def err(recipe):
        with pytest.raises(ParamsError) as info:
            parse_params({"data": {}, "train": {}, "validate": {}, "deploy": {},
                          "compress": {"candidates": [{"name": "c", "recipe": recipe}]}})
        return str(info.value)

    assert "(quantize) must be the last step" in err([{"method": "quantize"}, {"method": "vocab_prune"}])
    assert "(distill) must be the first step" in err([{"method": "vocab_prune"}, {"method": "distill"}])
    assert "at most one of each" in err([{"method": "vocab_prune"}, {"method": "vocab_prune"}])
    assert "strictly increasing" in err([{"method": "distill", "layers": [2, 0]}])
    assert "compress.candidates.0.recipe.0.target_sparsity" in err(
        [{"method": "magnitude_prune", "target_sparsity": 1.5}])
    assert "unknown key" in err([{"method": "distill", "teacher_layers": [0]}])


def test_structured_pruning_equals_zeroing_the_removed_units(teacher, tiny_teacher_dir, small_splits):
    """Removing head 1 and FFN neurons 0..31 must give exactly the logits of the
    full model with those units' output columns zeroed."""
    import copy

    from shrinkflow.compress.structured import prune_layer

    tok = load_tokenizer(tiny_teacher_dir / TOKENIZER, 32)
    texts = small_splits["test"]["text"].tolist()[:12]
    zeroed = copy.deepcopy(teacher)
    h = teacher.bert.encoder.layer[0].attention.self.attention_head_size
    for layer in zeroed.bert.encoder.layer:
        with torch.no_grad():
            layer.attention.output.dense.weight[:, h:2 * h] = 0.0
            layer.output.dense.weight[:, :32] = 0.0
    for layer in teacher.bert.encoder.layer:
        prune_layer(teacher, layer, keep_heads=[0], keep_neurons=list(range(32, 64)))
    assert teacher.bert.encoder.layer[0].attention.self.query.out_features == h
    assert teacher.bert.encoder.layer[0].intermediate.dense.out_features == 32
    np.testing.assert_allclose(logits(teacher, tok, texts), logits(zeroed, tok, texts), atol=1e-5)


def test_structured_prune_step_shrinks_and_recovers(tmp_path, tiny_teacher_dir, small_splits):
    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import StructuredPruneStep
    from shrinkflow.modeling import read_manifest
    from shrinkflow.predictors import load_predictor

    train = small_splits["train"]
    step = StructuredPruneStep(heads_keep_fraction=0.5, ffn_keep_fraction=0.25, importance_batches=4,
                               recovery_epochs=1, learning_rate=1e-3)
    out = apply_recipe(tiny_teacher_dir, Candidate(name="sp", recipe=(step,)), tmp_path / "sp",
                       train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                       threads=1, progress=False)
    stats = read_manifest(out)["stats"]
    assert stats["heads_per_layer"] == 1 and stats["ffn_per_layer"] == 16
    full = sum(p.numel() for p in load_torch_model(tiny_teacher_dir).parameters())
    assert stats["num_parameters"] < full
    out_logits = load_predictor(out, threads=1).predict_logits(small_splits["test"]["text"].tolist()[:8])
    assert np.isfinite(out_logits).all()


def test_importance_ranks_a_dead_head_last(teacher, tiny_teacher_dir, small_splits):
    from shrinkflow.compress.structured import importance

    tok = load_tokenizer(tiny_teacher_dir / TOKENIZER, 32)
    tok.no_padding()
    seqs = [e.ids for e in tok.encode_batch(small_splits["train"]["text"].tolist()[:64])]
    h = teacher.bert.encoder.layer[0].attention.self.attention_head_size
    with torch.no_grad():  # head 1 of layer 0 contributes nothing: its importance must be 0
        teacher.bert.encoder.layer[0].attention.output.dense.weight[:, h:2 * h] = 0.0
        for m in (teacher.bert.encoder.layer[0].attention.self.query, teacher.bert.encoder.layer[0].attention.self.key,
                  teacher.bert.encoder.layer[0].attention.self.value):
            m.weight[h:2 * h] = 0.0
            m.bias[h:2 * h] = 0.0
    heads, neurons = importance(teacher, seqs, small_splits["train"]["label"].to_numpy()[:64], batches=2)
    assert heads[0][1] == 0.0 and heads[0][0] > 0.0
    assert len(neurons) == 2 and neurons[0].shape == (64,)


def test_static_int8_quantization_with_calibration(tmp_path, tiny_teacher_dir, small_splits):
    import onnx

    from shrinkflow.compress import apply_recipe
    from shrinkflow.predictors import load_predictor, predict_labels

    train, test = small_splits["train"], small_splits["test"]
    out = apply_recipe(tiny_teacher_dir, Candidate(name="s", recipe=(QuantizeStep(mode="static", calibration_samples=64),)),
                       tmp_path / "s", train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                       threads=1, progress=False)
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ static graph, not dynamic
    assert "DynamicQuantizeLinear" not in ops
    a = predict_labels(load_predictor(tiny_teacher_dir, threads=1), test["text"].tolist())
    b = predict_labels(load_predictor(out, threads=1), test["text"].tolist())
    assert (a == b).mean() >= 0.8


def test_cubic_schedule_ends_exactly_at_target():
    from shrinkflow.compress.magnitude import cubic_schedule

    s = cubic_schedule(0.8, 4)
    assert s[-1] == pytest.approx(0.8) and all(a < b for a, b in zip(s, s[1:]))
    assert s[0] > 0.8 / 4  # front-loaded: prunes fastest while the model is most redundant


def test_gradual_pruning_keeps_zeros_and_reaches_target(tmp_path, tiny_teacher_dir, small_splits):
    from shrinkflow.compress import apply_recipe
    from shrinkflow.modeling import read_manifest

    train = small_splits["train"]
    out_dir = {}
    for schedule in ("one_shot", "gradual"):
        step = MagnitudePruneStep(target_sparsity=0.6, schedule=schedule, gradual_steps=3, learning_rate=1e-3)
        out_dir[schedule] = apply_recipe(tiny_teacher_dir, Candidate(name=schedule, recipe=(step,)),
                                         tmp_path / schedule, train_texts=train["text"].tolist(),
                                         train_labels=train["label"].to_numpy(), threads=1, progress=False)
        stats = read_manifest(out_dir[schedule])["stats"]
        assert stats["encoder_sparsity"] == pytest.approx(0.6, abs=1e-3)
    # Zeros compress: the pruned fp32 model is smaller once compressed than raw.
    stats = read_manifest(out_dir["gradual"])["stats"]
    assert stats["size_mb_zlib"] * 1e6 < 0.95 * (out_dir["gradual"] / "model.onnx").stat().st_size


def test_distillation_uses_unlabelled_text_labelled_by_the_teacher(tmp_path, tiny_teacher_dir, small_splits):
    from shrinkflow.compress import apply_recipe
    from shrinkflow.modeling import read_manifest

    train = small_splits["train"]
    extra = small_splits["shifted"]["text"].tolist()[:40] + ["", "   "]  # blank lines are ignored
    step = DistillStep(layers=(0,), epochs=1, batch_size=16)
    out = apply_recipe(tiny_teacher_dir, Candidate(name="u", recipe=(step,)), tmp_path / "u",
                       train_texts=train["text"].tolist()[:80], train_labels=train["label"].to_numpy()[:80],
                       threads=1, progress=False, unlabelled_texts=extra)
    assert read_manifest(out)["stats"]["distill_unlabelled_rows"] == 40
    off = DistillStep(layers=(0,), epochs=1, batch_size=16, use_unlabelled=False)
    out = apply_recipe(tiny_teacher_dir, Candidate(name="n", recipe=(off,)), tmp_path / "n",
                       train_texts=train["text"].tolist()[:80], train_labels=train["label"].to_numpy()[:80],
                       threads=1, progress=False, unlabelled_texts=extra)
    assert read_manifest(out)["stats"]["distill_unlabelled_rows"] == 0
    # Hidden-state matching caches the teacher's layer outputs for every row it
    # learns from: the split, the window and the augmented copies alike.
    both = DistillStep(layers=(0,), epochs=1, batch_size=16, hidden_weight=1.0, augment_copies=1)
    out = apply_recipe(tiny_teacher_dir, Candidate(name="h", recipe=(both,)), tmp_path / "h",
                       train_texts=train["text"].tolist()[:80], train_labels=train["label"].to_numpy()[:80],
                       threads=1, progress=False, unlabelled_texts=extra)
    stats = read_manifest(out)["stats"]
    assert (stats["distill_unlabelled_rows"], stats["distill_augmented_rows"]) == (40, 80)


def test_hidden_state_matching(teacher, tiny_teacher_dir, small_splits):
    from shrinkflow.compress.distill import (distill, hidden_loss, hidden_targets, make_student, soft_labels,
                                             teacher_outputs)

    # Each student layer matches the end of the teacher block it stands for.
    assert hidden_targets((0, 2, 4), 6) == (1, 3, 5)
    assert hidden_targets((0, 2, 5), 6) == (1, 4, 5)
    assert hidden_targets((1,), 2) == (1,)

    tok = load_tokenizer(tiny_teacher_dir / TOKENIZER, 32)
    tok.no_padding()
    texts = small_splits["train"]["text"].tolist()[:96]
    seqs = [e.ids for e in tok.encode_batch(texts)]
    # The cache holds, per sequence and real token, what the teacher computes
    # on a padded batch; its logits are soft_labels'.
    logits, cache = teacher_outputs(teacher, seqs[:8], (0, 1))
    np.testing.assert_allclose(logits, soft_labels(teacher, seqs[:8]), atol=1e-5)
    ids, mask = (torch.from_numpy(a) for a in encode(load_tokenizer(tiny_teacher_dir / TOKENIZER, 32), texts[:8]))
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        s = make_student(teacher, (1,))(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i, seq in enumerate(seqs[:8]):
        assert cache[i].shape == (len(seq), 2, teacher.config.hidden_size)
        np.testing.assert_allclose(cache[i][:, 1].float().numpy(), t[2][i, :len(seq)].numpy(), atol=2e-2)
    from shrinkflow.compress.distill import _pad_hidden

    padded = _pad_hidden(cache, list(range(8)), ids.shape[1])
    assert hidden_loss(t, padded, mask).item() < 1e-4          # the teacher matches its own cache
    # A 1-layer student from teacher layer 1 sees the embeddings, not layer 0's output: it does not match.
    assert hidden_loss(s, padded[:, :, 1:], mask).item() > 1e-2

    log: list[float] = []
    distill(teacher, seqs, small_splits["train"]["label"].to_numpy()[:96],
            DistillStep(layers=(1,), epochs=3, batch_size=16, learning_rate=3e-3, hidden_weight=1.0),
            threads=1, progress=False, log=log)
    assert np.isfinite(log).all() and np.mean(log[-3:]) < np.mean(log[:3])


def test_every_step_order_the_schema_allows_composes_safely(tiny_teacher_dir, small_splits):
    """All orders of the middle steps: the schema accepts exactly the safe
    ones, and in each accepted order every step's effect survives the later
    steps. The refused order is shown to be really unsafe (it revives the
    pruned weights), so the rule is not arbitrary."""
    import itertools

    from pydantic import ValidationError

    from shrinkflow.compress.magnitude import sparsity
    from shrinkflow.compress.recipe import transform_torch
    from shrinkflow.config import StructuredPruneStep

    train = small_splits["train"]
    tok_json = (tiny_teacher_dir / TOKENIZER).read_text()
    steps = {"structured_prune": StructuredPruneStep(heads_keep_fraction=0.5, ffn_keep_fraction=0.5,
                                                     importance_batches=2, recovery_epochs=1, learning_rate=3e-3),
             "vocab_prune": VocabPruneStep(),
             "magnitude_prune": MagnitudePruneStep(target_sparsity=0.5)}
    full_vocab = load_torch_model(tiny_teacher_dir).config.vocab_size

    def apply(recipe):
        model, _, stats = transform_torch(load_torch_model(tiny_teacher_dir), tok_json, Candidate.model_construct(
            name="c", recipe=recipe), train["text"].tolist(), train["label"].to_numpy(), threads=1, progress=False)
        return model, stats

    accepted = []
    for order in itertools.permutations(steps):
        recipe = tuple(steps[m] for m in order)
        try:
            Candidate(name="c", recipe=recipe)
        except ValidationError as exc:
            assert order.index("magnitude_prune") < order.index("structured_prune")
            assert "magnitude_prune must come after structured_prune" in str(exc)
            continue
        accepted.append(order)
        model, stats = apply(recipe)
        assert sparsity(model) >= 0.5 - 1e-6, order            # the mask survived
        assert stats["heads_per_layer"] == 1, order             # 2 heads -> 1
        assert model.config.vocab_size < full_vocab, order      # vocabulary pruned
    assert len(accepted) == 3
    unsafe, _ = apply((steps["magnitude_prune"], steps["structured_prune"]))
    assert sparsity(unsafe) < 0.25  # recovery training revived the zeros


def test_augmented_variants_are_crops_and_swaps_from_the_training_vocabulary():
    from shrinkflow.compress.augment import augment_texts

    texts = ["the plot is thin but the acting is wonderful throughout", "bad", "a truly great film with heart"]
    vocab = {w for t in texts for w in t.split()}
    out = augment_texts(texts, copies=3, seed=0, replace_fraction=0.2)
    assert len(out) == 9 and out == augment_texts(texts, copies=3, seed=0, replace_fraction=0.2)
    assert out != augment_texts(texts, copies=3, seed=1, replace_fraction=0.2)
    for i, variant in enumerate(out):
        src = texts[i % 3].split()
        words = variant.split()
        assert set(words) <= vocab and 1 <= len(words) <= len(src)
        if len(src) >= 4:
            assert len(words) >= 2  # a crop keeps at least two words
    # without swaps a variant is a contiguous span of its source
    for i, variant in enumerate(augment_texts(texts, copies=4, seed=3, replace_fraction=0.0)):
        assert f" {variant} " in f" {texts[i % 3]} "
    assert any(v != texts[i % 3] for i, v in enumerate(out))
    assert augment_texts(texts, copies=0, seed=0) == [] and augment_texts([], copies=2, seed=0) == []


def test_distillation_trains_on_teacher_labelled_augmented_text(tmp_path, tiny_teacher_dir, small_splits):
    from shrinkflow.compress import apply_recipe
    from shrinkflow.modeling import read_manifest
    from shrinkflow.predictors import load_predictor

    train = small_splits["train"]
    step = DistillStep(layers=(0,), epochs=1, batch_size=16, augment_copies=2)
    out = apply_recipe(tiny_teacher_dir, Candidate(name="a", recipe=(step,)), tmp_path / "a",
                       train_texts=train["text"].tolist()[:50], train_labels=train["label"].to_numpy()[:50],
                       threads=1, progress=False)
    assert read_manifest(out)["stats"]["distill_augmented_rows"] == 100
    assert load_predictor(out, threads=1).predict_logits(["a fine film"]).shape == (1, 2)


def distill_from(teacher, tiny_teacher_dir, small_splits):
    """(start, run): a fresh one-layer student's weights, and ``run(warm,
    **step)`` distilling 48 training texts for one epoch (rate 3e-3, batches
    of 16) from ``start`` (warm) or the teacher's layer (cold), with the
    DistillStep fields ``step`` on top; it returns the student's state dict."""
    from shrinkflow.compress.distill import distill, make_student

    tok = load_tokenizer(tiny_teacher_dir / TOKENIZER, 32)
    tok.no_padding()
    texts = small_splits["train"]["text"].tolist()[:48]
    seqs = [e.ids for e in tok.encode_batch(texts)]
    labels = small_splits["train"]["label"].to_numpy()[:48]
    start = make_student(teacher, (1,)).state_dict()

    def run(warm: bool, **kw):
        student = None
        if warm:
            student = make_student(teacher, (1,))
            student.load_state_dict(start)
        step = DistillStep(layers=(1,), learning_rate=3e-3, batch_size=16, epochs=1, warm_start_epochs=1, **kw)
        return distill(teacher, seqs, labels, step, threads=1, progress=False, student=student).state_dict()

    return start, run


def test_a_warm_re_distillation_trains_at_warm_start_learning_rate_and_a_cold_one_ignores_it(
        teacher, tiny_teacher_dir, small_splits):
    """DistillStep.warm_start_learning_rate is the peak rate of a warm
    re-distillation (null: the step's learning_rate): at a rate too small to
    move a weight the warm student ends where it started, at the step's rate
    it moves; a cold distillation trains at learning_rate whatever it says."""
    start, run = distill_from(teacher, tiny_teacher_dir, small_splits)
    still, moved = run(True, warm_start_learning_rate=1e-12), run(True, warm_start_learning_rate=None)
    name = "classifier.weight"
    assert torch.allclose(still[name], start[name], atol=1e-7)
    assert not torch.allclose(moved[name], start[name], atol=1e-4)

    a, b = run(False, warm_start_learning_rate=1e-12), run(False, warm_start_learning_rate=None)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_warm_re_distillation_weighs_its_loss_by_warm_start_alpha_kl(teacher, tiny_teacher_dir, small_splits):
    """DistillStep.warm_start_alpha_kl replaces alpha_kl in a warm
    re-distillation only: warm at warm_start_alpha_kl 0 is, weight for
    weight, warm at alpha_kl 0 (hard labels only), and differs from the
    step's alpha_kl 1 (soft labels only); a cold distillation ignores it."""
    _, run = distill_from(teacher, tiny_teacher_dir, small_splits)
    hard = run(True, alpha_kl=0.0)
    assert all(torch.equal(hard[k], v) for k, v in run(True, alpha_kl=1.0, warm_start_alpha_kl=0.0).items())
    soft = run(True, alpha_kl=1.0)
    assert not torch.allclose(soft["classifier.weight"], hard["classifier.weight"], atol=1e-5)
    cold = run(False, alpha_kl=1.0)
    assert all(torch.equal(cold[k], v) for k, v in run(False, alpha_kl=1.0, warm_start_alpha_kl=0.0).items())


def test_weight_averaging_ends_with_the_mean_of_the_last_steps_weights(teacher, tiny_teacher_dir, small_splits):
    """kd_train's average_last: the student it returns holds the mean of its
    weights after each of the last ceil(share x steps) steps (stochastic
    weight averaging), taken here from a run without averaging that records
    the weights after every step; same seed, same batches, same steps."""
    from shrinkflow.compress.distill import kd_train, make_student, teacher_outputs

    tok = load_tokenizer(tiny_teacher_dir / TOKENIZER, 32)
    tok.no_padding()
    texts = small_splits["train"]["text"].tolist()[:64]
    seqs = [e.ids for e in tok.encode_batch(texts)]
    labels = small_splits["train"]["label"].to_numpy()[:64]
    targets, _ = teacher_outputs(teacher, seqs)
    kw = dict(epochs=2, learning_rate=3e-3, temperature=2.0, alpha_kl=1.0, batch_size=16, warmup_fraction=0.1,
              seed=3, threads=1, progress=False)        # 8 steps
    plain = make_student(teacher, (1,))
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    seen: list[dict] = []
    torch.manual_seed(0)           # dropout draws from torch's own generator
    kd_train(plain, seqs, targets, labels, **kw,
             after_step=lambda: seen.append({k: v.detach().clone() for k, v in plain.state_dict().items()}))
    assert len(seen) == 8
    averaged = make_student(teacher, (1,))
    averaged.load_state_dict(start)
    torch.manual_seed(0)
    kd_train(averaged, seqs, targets, labels, **kw, average_last=0.3)      # ceil(2.4): the last 3 steps
    got = averaged.state_dict()
    name = "classifier.weight"
    want = torch.stack([s[name] for s in seen[-3:]]).mean(dim=0)
    assert torch.allclose(got[name], want, atol=1e-6)
    assert not torch.allclose(got[name], seen[-1][name], atol=1e-4)     # not the last step's
    for k, v in got.items():
        if v.is_floating_point():
            assert torch.allclose(v, torch.stack([s[k] for s in seen[-3:]]).mean(dim=0), atol=1e-6), k
        else:
            assert torch.equal(v, seen[-1][k]), k
    with pytest.raises(ValueError, match="average_last must be in"):
        kd_train(averaged, seqs, targets, labels, **kw, average_last=1.0)
    with pytest.raises(ValueError, match="mean of masked weights"):
        kd_train(averaged, seqs, targets, labels, **kw, average_last=0.5, after_step=lambda: None)


def _lookup_graph(table: np.ndarray, opset: int = 17):
    """A graph of one embedding lookup: ids [n] -> table[ids] [n, width]."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, table.shape[1]])],
        [numpy_helper.from_array(table.astype(np.float32), "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def test_per_row_embedding_scales_keep_a_small_rows_precision_where_one_scale_loses_it(tmp_path):
    """A table with one large row and one small one: one scale for the table
    (ORT's Gather quantization, per_channel or not) rounds the small row to
    zero; one scale per row keeps every row within half its own step."""
    import onnx

    from shrinkflow.compress.quantize import quantize_dynamic_onnx

    table = np.array([[100.0, -50.0, 25.0], [0.01, -0.02, 0.005], [0.0, 0.0, 0.0], [3.0, 1.0, -2.0]])
    src = tmp_path / "lookup.onnx"
    onnx.save(_lookup_graph(table), str(src))
    ids = np.array([1, 0, 2, 3, 1], dtype=np.int64)
    for per_channel in (False, True):
        one = quantize_dynamic_onnx(src, tmp_path / f"tensor{per_channel}.onnx", QuantizeStep(per_channel=per_channel))
        assert np.all(_run(one, ids)[0] == 0.0)  # the small row is lost
    rows = quantize_dynamic_onnx(src, tmp_path / "row.onnx", QuantizeStep(embedding_scales="row"))
    got = _run(rows, ids)
    step = np.abs(table).max(axis=1, keepdims=True) / 127.0
    assert np.all(np.abs(got - table[ids]) <= step[ids] / 2 + 1e-6), (got, table[ids])
    assert np.all(got[2] == 0.0) and np.all(np.sign(got[0]) == np.sign(table[1]))
    model = onnx.load(str(rows))
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    assert "table" not in kinds and kinds["table_int8_rows"] == onnx.TensorProto.INT8
    assert not list(tmp_path.glob(".*"))  # no copy or temporary file left


def test_per_row_embedding_scales_refuse_a_graph_with_no_lookup_and_leave_other_gathers(tmp_path):
    import onnx

    from shrinkflow.compress.quantize import quantize_embeddings_per_row

    model = _lookup_graph(np.ones((4, 3)))
    model.graph.node[0].attribute[0].i = 1  # a Gather along columns is not a lookup
    with pytest.raises(ValueError, match="no embedding table to quantize per row"):
        quantize_embeddings_per_row(model)
    assert [t.name for t in model.graph.initializer] == ["table"]  # unchanged
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).dtype == np.float32


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_tiny_teacher_quantized_with_per_row_embeddings_agrees_with_its_fp32(tmp_path, tiny_teacher_dir,
                                                                               small_splits, mode):
    import onnx

    from shrinkflow.compress import apply_recipe
    from shrinkflow.predictors import load_predictor, predict_labels

    train, test = small_splits["train"], small_splits["test"]
    out = apply_recipe(tiny_teacher_dir, Candidate(name="r", recipe=(
        QuantizeStep(mode=mode, per_channel=True, embedding_scales="row", calibration_samples=64),)),
        tmp_path / "r", train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
        threads=1, progress=False)
    model = onnx.load(str(out / "model.onnx"))
    int8_rows = [t for t in model.graph.initializer if t.name.endswith("_int8_rows")]
    assert len(int8_rows) == 3  # word, position and token-type tables
    assert all(t.data_type == onnx.TensorProto.INT8 for t in int8_rows)
    a = predict_labels(load_predictor(tiny_teacher_dir, threads=1), test["text"].tolist())
    b = predict_labels(load_predictor(out, threads=1), test["text"].tolist())
    assert (a == b).mean() >= 0.8


def test_per_row_embedding_scales_on_shared_tables_colliding_names_and_other_readers(tmp_path):
    """Edge cases a helper found: two unnamed lookups of one table (quantized
    once, node names unique), an initializer already named like a generated
    one (left as it was), and a table also returned as a graph output (kept
    in fp32 for that reader). The graph opens and computes every output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from shrinkflow.compress.quantize import quantize_dynamic_onnx

    rng = np.random.default_rng(0)
    table, other = rng.normal(size=(10, 4)).astype(np.float32), np.arange(4, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["A", "ids"], ["a1"]), helper.make_node("Gather", ["A", "ids"], ["a2"]),
         helper.make_node("Add", ["a1", "A_row_scale"], ["shifted"])], "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
         for n, s in (("a2", [None, 4]), ("shifted", [None, 4]), ("A", [10, 4]))],
        [numpy_helper.from_array(table, "A"), numpy_helper.from_array(other, "A_row_scale")])
    src = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dst = quantize_dynamic_onnx(src, tmp_path / "rows.onnx", QuantizeStep(embedding_scales="row"))
    model = onnx.load(str(dst))
    onnx.checker.check_model(model)
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    assert sum(t.data_type == TensorProto.INT8 for t in model.graph.initializer) == 1  # one table, once
    import onnxruntime as ort

    ids = np.array([3, 0, 9], dtype=np.int64)
    a2, shifted, a = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    step = np.abs(table).max(axis=1, keepdims=True)[ids] / 127.0
    assert np.all(np.abs(a2 - table[ids]) <= step / 2 + 1e-6)
    assert np.all(np.abs(shifted - (table[ids] + other)) <= step / 2 + 1e-6)  # the old A_row_scale, not the scales
    np.testing.assert_array_equal(a, table)  # the graph output still reads the fp32 table


@pytest.mark.parametrize("case, says", [
    ("nan", "holds NaN or infinity in 2 row(s) (first: [1, 4])"),
    ("opset 11", "needs ONNX opset 13 or later; this graph has opset 11"),
    ("graph input", "no embedding table to quantize per row"),
    ("float16", "no embedding table to quantize per row"),
])
def test_per_row_embedding_scales_refuse_what_they_cannot_quantize(case, says):
    from onnx import TensorProto, helper

    from shrinkflow.compress.quantize import quantize_embeddings_per_row

    table = np.ones((6, 3))
    if case == "nan":
        table[1, 0], table[4, 2] = np.nan, np.inf
    model = _lookup_graph(table.astype(np.float16) if case == "float16" else table,
                          opset=11 if case == "opset 11" else 17)
    if case == "float16":
        model.graph.initializer[0].data_type = TensorProto.FLOAT16
    if case == "graph input":  # an overridable value, not a constant table
        model.graph.input.append(helper.make_tensor_value_info("table", TensorProto.FLOAT, [6, 3]))
    before = model.SerializeToString()
    with pytest.raises(ValueError) as info:
        quantize_embeddings_per_row(model)
    assert says in str(info.value), str(info.value)
    assert model.SerializeToString() == before  # refused before anything changed


def test_a_refused_per_row_quantize_leaves_the_graph_it_was_given_and_no_hint_is_logged(tmp_path, caplog):
    """A second helper's findings: a quantize step that refuses (here: NaN in
    a table) puts the exported graph back where the build keeps it, whole;
    a sparse initializer's name is never reused; and neither quantizer logs
    ORT's pre-processing hint (the static one words it another way)."""
    import logging

    import onnx
    from onnx import numpy_helper

    from shrinkflow.compress.quantize import quantize_dynamic_onnx, quantize_static_onnx
    from shrinkflow.compress.steps import Build, method_of

    table = np.ones((4, 3))
    table[2, 1] = np.nan
    path = tmp_path / "model.onnx"
    onnx.save(_lookup_graph(table), str(path))
    before = path.read_bytes()
    step = QuantizeStep(embedding_scales="row")
    with pytest.raises(ValueError, match="NaN or infinity"):
        method_of(step).apply(step, Build(model=None, tokenizer_json="{}", onnx_path=path))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]

    model = _lookup_graph(np.arange(12.0).reshape(4, 3) + 1)
    model.graph.sparse_initializer.append(onnx.SparseTensorProto(
        values=numpy_helper.from_array(np.array([1.0], dtype=np.float32), "table_int8_rows"),
        indices=numpy_helper.from_array(np.array([0], dtype=np.int64), "i"), dims=[1]))
    src = tmp_path / "sparse.onnx"
    onnx.save(model, str(src))
    with caplog.at_level(logging.WARNING):
        dst = quantize_dynamic_onnx(src, tmp_path / "rows.onnx", step)
        quantize_static_onnx(src, tmp_path / "static.onnx", QuantizeStep(mode="static", calibration_samples=8),
                             [{"ids": np.array([0, 3], dtype=np.int64)}])
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    names = [t.name for t in onnx.load(str(dst)).graph.initializer]
    assert "table_int8_rows" not in names and "table_int8_rows_2" in names
    np.testing.assert_allclose(_run(dst, np.array([3, 0], dtype=np.int64)), [[10, 11, 12], [1, 2, 3]], atol=0.05)


def test_a_row_too_small_for_a_float32_scale_reads_back_as_zeros():
    from onnx import numpy_helper

    from shrinkflow.compress.quantize import quantize_embeddings_per_row

    model = _lookup_graph(np.array([[1e-44, -1e-44], [2.0, -1.0]]))
    assert quantize_embeddings_per_row(model) == 1
    tables = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert tables["table_int8_rows"][0].tolist() == [0, 0] and tables["table_row_scale"][0] == 1.0
    assert tables["table_int8_rows"][1].tolist() == [127, -64]
