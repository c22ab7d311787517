"""The user's own teacher (issue 15, item 2): ``train.model.kind: local``.

Tiny real checkpoints (hidden 32, 2 layers) of each supported family (BERT,
MPNet, RoBERTa, DistilBERT) are written the way a user has them: config.json,
model.safetensors (``save_pretrained(safe_serialization=True)``) and the slow
tokenizer's vocabulary files only, so the offline tokenizer.json conversion
runs too. A 3-class task (billing / shipping / tech, keyword-driven so a tiny
model learns it in seconds) goes through fine-tuning, every compression step
each family supports, ONNX export and int8 quantization; the refusals
(unsupported model_type, pickle-only weights, a step the family cannot
take, fine_tune false without a local checkpoint, an id2label that names
other classes) are checked by their messages.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from shrinkflow.arch import UnsupportedArchitecture
from shrinkflow.config import (Candidate, DistillStep, LocalModel, MagnitudePruneStep, QuantizeStep,
                               RandomInitModel, StructuredPruneStep, TrainParams, VocabPruneStep)
from shrinkflow.errors import DataError, ModelError

FAMILIES = ("bert", "mpnet", "roberta", "distilbert")
LABELS = ("billing", "shipping", "tech")
KEYWORDS = {"billing": "refund invoice charge payment card bank price".split(),
            "shipping": "parcel delivery courier tracking package address late".split(),
            "tech": "crash error login password bug screen update install".split()}
FILLER = "the a my is was not please help with and it to of".split()
WORDS = sorted({w for ws in KEYWORDS.values() for w in ws} | set(FILLER))


def task_frame(n: int, seed: int) -> pd.DataFrame:
    """``n`` texts: two keywords of one class among filler words; label = class id."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % len(LABELS)
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 6)))) + \
            list(rng.choice(KEYWORDS[LABELS[label]], size=2))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return pd.DataFrame(rows, columns=["text", "label"])


def _wordpiece_vocab(specials: list[str]) -> list[str]:
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'"))
    return specials + chars + ["##" + c for c in chars] + WORDS


def make_checkpoint(kind: str, d: Path, id2label: dict | None = None, classifier: bool = False) -> Path:
    """A tiny random checkpoint of family ``kind`` with slow-tokenizer files only.

    ``classifier``: save a ForSequenceClassification with ``id2label`` (an
    already fine-tuned model); else the bare encoder (a pretrained body).
    """
    import torch
    import transformers as T

    torch.manual_seed(0)
    d.mkdir(parents=True, exist_ok=True)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([" ".join(WORDS)] * 3, vocab_size=300, min_frequency=1,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
        bpe.save_model(str(d))
        cfg, cls = T.RobertaConfig(vocab_size=bpe.get_vocab_size(), max_position_embeddings=130, **sizes), "Roberta"
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>"] if kind == "mpnet" else \
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = _wordpiece_vocab(specials)
        (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
        if kind == "bert":
            cfg, cls = T.BertConfig(vocab_size=len(vocab), max_position_embeddings=128, **sizes), "Bert"
        elif kind == "distilbert":
            cfg, cls = T.DistilBertConfig(vocab_size=len(vocab), max_position_embeddings=128, dim=32, n_layers=2,
                                          n_heads=2, hidden_dim=64), "DistilBert"
        else:
            cfg, cls = T.MPNetConfig(vocab_size=len(vocab), max_position_embeddings=130, **sizes), "MPNet"
    if classifier:
        cfg.num_labels = len(id2label)
        cfg.id2label = dict(id2label)
        cfg.label2id = {v: k for k, v in id2label.items()}
        model = getattr(T, f"{cls}ForSequenceClassification")(cfg)
    else:
        model = getattr(T, f"{cls}Model")(cfg)
    model.save_pretrained(str(d), safe_serialization=True)
    return d


def tiny_params(path: Path, **kw) -> TrainParams:
    return TrainParams(model=LocalModel(path=str(path)), epochs=10, batch_size=16, learning_rate=3e-3,
                       max_seq_len=16, threads=1, **kw)


@pytest.fixture(scope="module")
def task():
    return {"train": task_frame(300, 0), "val": task_frame(45, 1), "test": task_frame(30, 2)}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, task):
    """Per family: a 3-class teacher fine-tuned from a local checkpoint, saved
    as a shrinkflow model dir, with its TrainResult."""
    from shrinkflow.modeling import save_torch_model_atomically
    from shrinkflow.train import train_teacher

    root = tmp_path_factory.mktemp("local")
    out = {}
    for kind in FAMILIES:
        ck = make_checkpoint(kind, root / f"ck_{kind}")
        model, tok, result = train_teacher(task["train"], task["val"], tiny_params(ck), progress=False,
                                           labels=LABELS)
        out[kind] = (save_torch_model_atomically(model, tok, root / f"teacher_{kind}", 16, labels=LABELS), result)
    return out


@pytest.mark.parametrize("kind", FAMILIES)
def test_fine_tunes_a_local_checkpoint_on_three_classes(kind, teachers, task):
    from shrinkflow.modeling import read_manifest
    from shrinkflow.predictors import load_predictor, predict_labels

    teacher_dir, result = teachers[kind]
    assert result.fine_tuned and result.best_val_accuracy >= 0.9  # keyword task; chance is 1/3
    assert read_manifest(teacher_dir)["labels"] == list(LABELS)
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["model_type"] == kind and config["id2label"] == {"0": "billing", "1": "shipping", "2": "tech"}
    assert not list(teacher_dir.glob("*.bin"))
    pred = predict_labels(load_predictor(teacher_dir, threads=1), task["test"]["text"].tolist())
    assert (pred == task["test"]["label"].to_numpy()).mean() >= 0.9


def test_the_checkpoint_gets_a_tokenizer_json_built_offline_from_its_vocab(tmp_path):
    from shrinkflow.modeling import load_tokenizer, tokenizer_path

    for kind, pad, cls in (("bert", "[PAD]", "[CLS]"), ("mpnet", "<pad>", "<s>"), ("roberta", "<pad>", "<s>"),
                           ("distilbert", "[PAD]", "[CLS]")):
        ck = make_checkpoint(kind, tmp_path / kind)
        assert not (ck / "tokenizer.json").exists()
        path = tokenizer_path(LocalModel(path=str(ck)))
        assert path == ck / "tokenizer.json" and path.is_file()
        enc = load_tokenizer(path, 16).encode_batch(["refund", "my parcel was late"])
        assert enc[0].tokens[0] == cls and enc[0].tokens[-1] == pad  # padded to the longer text


def test_a_checkpoint_directory_that_does_not_exist_is_named_as_such(tmp_path):
    """A newcomer's finding: a mistyped train.model.path failed with "no
    tokenizer.json (nor vocab.txt ...)", as if the directory were there."""
    from shrinkflow.errors import MissingInput
    from shrinkflow.modeling import tokenizer_path

    with pytest.raises(MissingInput, match=r"nonexist: no such checkpoint directory \(train\.model\.path"):
        tokenizer_path(LocalModel(path=str(tmp_path / "nonexist")))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MissingInput, match=r"no such checkpoint directory \(it is a file\)"):
        tokenizer_path(LocalModel(path=str(tmp_path / "afile")))


# Every step each family supports; the rest are refused (below). The student
# also matches the teacher's hidden states (its layer outputs).
DISTILL = DistillStep(layers=(1,), epochs=1, use_unlabelled=False, hidden_weight=1.0)
STEPS = {
    "bert": [(DISTILL, VocabPruneStep(),
              MagnitudePruneStep(target_sparsity=0.5), QuantizeStep()),
             (StructuredPruneStep(heads_keep_fraction=0.5, ffn_keep_fraction=0.5, importance_batches=2),)],
    "mpnet": [(DISTILL, VocabPruneStep(),
               MagnitudePruneStep(target_sparsity=0.5), QuantizeStep())],
    "roberta": [(DISTILL, MagnitudePruneStep(target_sparsity=0.5),
                 QuantizeStep()),
                (StructuredPruneStep(heads_keep_fraction=0.5, ffn_keep_fraction=0.5, importance_batches=2),)],
    "distilbert": [(DISTILL, VocabPruneStep(),
                    MagnitudePruneStep(target_sparsity=0.5), QuantizeStep()),
                   (StructuredPruneStep(heads_keep_fraction=0.5, ffn_keep_fraction=0.5, importance_batches=2),)],
}


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_supported_compression_step_runs_on_each_family(kind, teachers, task, tmp_path):
    from shrinkflow.compress import apply_recipe
    from shrinkflow.modeling import read_manifest
    from shrinkflow.predictors import load_predictor, predict_labels

    teacher_dir, _ = teachers[kind]
    texts = task["test"]["text"].tolist()
    teacher = load_predictor(teacher_dir, threads=1)
    # The plain export first: ONNX must give the torch logits on padded
    # batches (the pad id and position ids are family-specific).
    fp32 = apply_recipe(teacher_dir, Candidate(name="fp32"), tmp_path / "fp32", threads=1, progress=False)
    np.testing.assert_allclose(load_predictor(fp32, threads=1).predict_logits(texts),
                               teacher.predict_logits(texts), atol=1e-4)
    want = predict_labels(teacher, texts)
    for i, recipe in enumerate(STEPS[kind]):
        cand = apply_recipe(teacher_dir, Candidate(name=f"c{i}", recipe=recipe), tmp_path / f"c{i}",
                            train_texts=task["train"]["text"].tolist(), train_labels=task["train"]["label"].to_numpy(),
                            threads=1, progress=False)
        man = read_manifest(cand)
        assert man["labels"] == list(LABELS) and man["format"] == "onnx"
        predictor = load_predictor(cand, threads=1)
        logits = predictor.predict_logits(texts)
        assert logits.shape == (len(texts), 3) and np.isfinite(logits).all()
        assert (predict_labels(predictor, texts) == want).mean() >= 0.6, (kind, recipe)
        stats = man["stats"]
        if recipe[0].method == "distill":
            assert stats["layers"] == [1] and stats["encoder_sparsity"] == pytest.approx(0.5, abs=1e-3)
        else:
            assert stats["heads_per_layer"] == 1 and stats["ffn_per_layer"] == 32


def test_a_step_the_family_cannot_take_is_refused_by_the_schema_and_by_compress(teachers, tmp_path):
    from shrinkflow.compress import apply_recipe
    import yaml

    from shrinkflow.config import parse_params

    teacher_dir, _ = teachers["mpnet"]
    with pytest.raises(UnsupportedArchitecture, match="structured_prune is not supported for model_type mpnet"):
        apply_recipe(teacher_dir, Candidate(name="sp", recipe=(StructuredPruneStep(),)), tmp_path / "sp",
                     train_texts=["a"], train_labels=np.array([0]), threads=1, progress=False)
    assert not (tmp_path / "sp").exists()
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["train"]["model"] = {"kind": "local", "path": str(teacher_dir)}
    raw["compress"]["candidates"] = [{"name": "sp", "recipe": [{"method": "structured_prune"}]}]
    with pytest.raises(ValueError, match="structured_prune is not supported for model_type mpnet"):
        parse_params(raw)
    raw["train"]["model"]["path"] = str(teachers["roberta"][0])
    raw["compress"]["candidates"] = [{"name": "vp", "recipe": [{"method": "vocab_prune"}]}]
    with pytest.raises(ValueError, match="vocab_prune is not supported for model_type roberta"):
        parse_params(raw)
    # A layer-subset student needs layers the teacher has (2 here).
    raw["compress"]["candidates"] = [{"name": "d", "recipe": [{"method": "distill", "layers": [0, 2]}]}]
    with pytest.raises(ValueError, match=r"distill.layers \[0, 2\] out of range for the 2-layer teacher"):
        parse_params(raw)
    raw["compress"]["candidates"] = [{"name": "d", "recipe": [{"method": "distill", "layers": [1]}]}]
    assert parse_params(raw).train.model.num_layers() == 2


def test_an_unsupported_architecture_is_refused_naming_it_and_the_supported_ones(tmp_path):
    from shrinkflow.train import train_teacher

    ck = make_checkpoint("bert", tmp_path / "ck")
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValidationError, match=r"model_type 'gpt2' is not supported; supported "
                                              r"architectures: bert, mpnet, roberta, distilbert"):
        LocalModel(path=str(ck))
    # Unreadable at params time (the directory appears later): refused when train starts.
    later = tmp_path / "later"
    spec = tiny_params(later)
    shutil.copytree(ck, later)
    with pytest.raises(UnsupportedArchitecture, match="'gpt2'"):
        train_teacher(task_frame(9, 0), task_frame(9, 1), spec, progress=False, labels=LABELS)


def test_a_pickle_only_checkpoint_is_refused_and_never_loaded(tmp_path):
    from shrinkflow.modeling import load_checkpoint

    ck = make_checkpoint("bert", tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    # Not a real pickle: if anything tried to unpickle it, the error would differ.
    (ck / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValidationError, match="only pytorch_model.bin .*never loads it"):
        LocalModel(path=str(ck))
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_checkpoint(ck, LABELS)


def test_fine_tune_false_needs_a_local_checkpoint():
    with pytest.raises(ValidationError, match="fine_tune: false needs model.kind: local"):
        TrainParams(model=RandomInitModel(), fine_tune=False)


def _fine_tuned_checkpoint(tmp_path, teachers, id2label: dict) -> Path:
    """The BERT teacher's weights saved as a user's already fine-tuned
    checkpoint whose classes are in ``id2label`` order (head rows permuted)."""
    import torch
    from safetensors.torch import load_file, save_file

    teacher_dir, _ = teachers["bert"]
    ck = tmp_path / "finetuned"
    ck.mkdir()
    state = load_file(str(teacher_dir / "model.safetensors"))
    order = [LABELS.index(id2label[i].strip()) for i in range(len(id2label))]
    for key in ("classifier.weight", "classifier.bias"):
        state[key] = state[key][torch.tensor(order)].contiguous()
    save_file(state, str(ck / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((teacher_dir / "config.json").read_text())
    config["id2label"] = {str(k): v for k, v in id2label.items()}
    config["label2id"] = {v: k for k, v in id2label.items()}
    (ck / "config.json").write_text(json.dumps(config))
    shutil.copy(teacher_dir / "tokenizer.json", ck / "tokenizer.json")
    return ck


def test_fine_tune_false_measures_the_checkpoint_in_the_datas_label_order(tmp_path, teachers, task):
    from shrinkflow.predictors import load_predictor
    from shrinkflow.train import measure_teacher

    # The user's model lists its classes in another order, with a stray space.
    ck = _fine_tuned_checkpoint(tmp_path, teachers, {0: "tech", 1: " billing", 2: "shipping"})
    model, tok, result = measure_teacher(task["val"], tiny_params(ck, fine_tune=False), LABELS)
    assert not result.fine_tuned and result.best_epoch == 0 and result.train_loss_by_epoch == []
    assert model.config.id2label == {0: "billing", 1: "shipping", 2: "tech"}
    # Realigned, it is the teacher it was made from: same logits, same accuracy.
    teacher_dir, trained = teachers["bert"]
    out = tmp_path / "saved"
    from shrinkflow.modeling import save_torch_model

    save_torch_model(model, tok, out, 16, labels=LABELS)
    texts = task["val"]["text"].tolist()
    np.testing.assert_allclose(load_predictor(out, threads=1).predict_logits(texts),
                               load_predictor(teacher_dir, threads=1).predict_logits(texts), atol=1e-5)
    assert result.best_val_accuracy == pytest.approx(trained.best_val_accuracy)


def test_fine_tune_false_with_other_classes_fails_listing_both_sets(tmp_path, teachers, task):
    from shrinkflow.train import measure_teacher

    ck = _fine_tuned_checkpoint(tmp_path, teachers, {0: "billing", 1: "shipping", 2: "tech"})
    with pytest.raises(DataError, match=r"id2label names \['billing', 'shipping', 'tech'\] but the data's labels "
                                        r"are \['account', 'billing', 'shipping'\]"):
        measure_teacher(task["val"], tiny_params(ck, fine_tune=False), ("account", "billing", "shipping"))


def test_the_train_stage_with_fine_tune_false_records_the_teachers_figures(tmp_path, teachers, task, monkeypatch):
    """The stage end to end in a scratch project: no training, the teacher
    dir written (safetensors, tokenizer, manifest with labels), and
    metrics/train.json saying fine_tuned false."""
    import yaml

    from shrinkflow.files import read_json
    from shrinkflow.labels import write_labels
    from stages.train import train
    from stages.common import run_stage

    project = Path(__file__).resolve().parents[1]
    ck = _fine_tuned_checkpoint(tmp_path, teachers, {0: "shipping", 1: "tech", 2: "billing"})
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update({"model": {"kind": "local", "path": str(ck)}, "fine_tune": False, "max_seq_len": 16,
                         "threads": 1})
    # The default recipes distil 6-layer MiniLM's layers [0, 1, 3, 5]; this teacher has 2.
    raw["compress"]["candidates"] = [{"name": "int8", "recipe": [{"method": "quantize"}]}]
    work = tmp_path / "project"
    (work / "data" / "prepared").mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copy(project / "dvc.yaml", work / "dvc.yaml")
    task["train"].to_parquet(work / "data" / "prepared" / "train.parquet")
    task["val"].to_parquet(work / "data" / "prepared" / "val.parquet")
    write_labels(work / "data" / "prepared" / "labels.json", LABELS)
    # Started elsewhere: the stage reads and writes under its root only.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_stage("train", train, work) == 0
    assert list(elsewhere.iterdir()) == []
    metrics = read_json(work / "metrics" / "train.json")
    assert metrics["fine_tuned"] is False and metrics["labels"] == list(LABELS)
    assert metrics["best_val_accuracy"] == pytest.approx(teachers["bert"][1].best_val_accuracy)
    teacher = work / "models" / "teacher"
    assert sorted(p.name for p in teacher.iterdir()) == ["config.json", "model.safetensors",
                                                        "shrinkflow_model.json", "tokenizer.json"]
    assert read_json(teacher / "shrinkflow_model.json")["labels"] == list(LABELS)
    # A label set the checkpoint does not have: non-zero exit, no teacher written.
    shutil.rmtree(teacher)
    write_labels(work / "data" / "prepared" / "labels.json", ("account", "billing", "shipping"))
    assert run_stage("train", train, work) == 1
    assert not teacher.exists()


def test_the_default_teachers_classifier_init_is_unchanged():
    """build_model(PretrainedModel(), ..., labels) draws the same classifier
    init as the code before labels existed (num_labels=2, same seed)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from shrinkflow.config import PretrainedModel
    from shrinkflow.labels import BUILTIN_LABELS
    from shrinkflow.modeling import build_model, teacher_source_dir
    from shrinkflow.train import seed_everything

    seed_everything(0)
    new = build_model(PretrainedModel(), 30522, BUILTIN_LABELS)
    after_new = torch.rand(3)
    seed_everything(0)
    old = AutoModelForSequenceClassification.from_pretrained(str(teacher_source_dir()), num_labels=2)
    after_old = torch.rand(3)
    for (k, a), (_, b) in zip(sorted(new.state_dict().items()), sorted(old.state_dict().items())):
        assert torch.equal(a, b), k
    assert torch.equal(after_new, after_old)  # the same number of RNG draws
    assert new.config.id2label == {0: "negative", 1: "positive"}


def test_loading_says_which_weights_are_new_in_one_line_without_transformers_table(tmp_path, capfd):
    """A bare encoder gets a new head; a fine-tuned 2-class checkpoint loaded
    for 3 labels gets its head re-initialised; loaded as it is, nothing is
    said. Never transformers' box-drawn LOAD REPORT with escape codes."""
    from shrinkflow.modeling import load_checkpoint

    bare = make_checkpoint("bert", tmp_path / "bare")
    tuned = make_checkpoint("bert", tmp_path / "tuned", id2label={0: "no", 1: "yes"}, classifier=True)

    load_checkpoint(bare, LABELS)
    out, err = capfd.readouterr()
    assert f"loaded {tmp_path.name}/bare: newly initialised (not in the checkpoint): " \
           "classifier.bias, classifier.weight" in out
    load_checkpoint(tuned, LABELS)
    out, err = capfd.readouterr()
    assert f"loaded {tmp_path.name}/tuned: re-initialised for another shape: classifier.bias (2,) -> (3,), " \
           "classifier.weight (2, 32) -> (3, 32)" in out, out
    load_checkpoint(tuned, None)
    out, err = capfd.readouterr()
    assert "loaded" not in out
    for text in (out, err):
        assert "LOAD REPORT" not in text and "\x1b[" not in text and "not sharded" not in text


def test_max_seq_len_beyond_the_models_positions_is_refused(tmp_path):
    from shrinkflow.train import train_teacher

    ck = make_checkpoint("mpnet", tmp_path / "ck")  # 130 positions, numbered from pad id 1 + 1: 128 tokens
    spec = TrainParams(model=LocalModel(path=str(ck)), max_seq_len=129, threads=1)
    with pytest.raises(ModelError, match="max_seq_len 129 is longer than this mpnet model's 128 positions"):
        train_teacher(task_frame(9, 0), task_frame(9, 1), spec, progress=False, labels=LABELS)
