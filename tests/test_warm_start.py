"""Re-distillation that keeps what the student knew, and costs less: the
distilled student kept beside its candidate and with its registry version,
staged for a re-compression and warm-started from; the training text mixed
in at a ratio; the teacher's outputs cached between builds. Tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shrinkflow.config import Candidate, DistillStep, QuantizeStep, VocabPruneStep
from tests.test_registry import PASS, model_dir

# The tiny teacher has 2 layers: a 1-layer student of its layer 0.
STEP = DistillStep(layers=(0,), epochs=1, hidden_weight=1.0)
STUDENT = Candidate(name="student", recipe=(STEP, VocabPruneStep(), QuantizeStep()))


def project(tmp_path: Path, tiny_teacher_dir: Path, small_splits, window: str = "") -> Path:
    """A project with the tiny teacher, the training split, the window text
    and an empty warm-start directory, as a fresh checkout has them."""
    from shrinkflow.paths import STUDENTS, TEACHER, UNLABELLED, WARM_START, split_path

    root = tmp_path / "proj"
    shutil.copytree(tiny_teacher_dir, root / TEACHER)
    (root / split_path("train")).parent.mkdir(parents=True)
    small_splits["train"].to_parquet(root / split_path("train"), index=False)
    (root / WARM_START).mkdir(parents=True)
    (root / WARM_START / "README.md").write_text("staged students\n")
    (root / UNLABELLED).write_text(window)
    (root / STUDENTS).mkdir(parents=True)
    return root


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def distil(teacher_dir: Path, splits, step: DistillStep, *, window=(), warm=None, student_dir=None, int8=None):
    """One distill step on the tiny teacher, as a build runs it; the Build."""
    from shrinkflow.compress.steps import Build, method_of
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.modeling import TOKENIZER, load_torch_model

    train = splits["train"]
    build = Build(load_torch_model(teacher_dir), (teacher_dir / TOKENIZER).read_text(),
                  train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                  unlabelled_texts=list(window), threads=1, progress=False, candidate="student",
                  teacher_hash=content_hash(file_hashes(teacher_dir)), warm_start=warm, student_dir=student_dir,
                  int8=int8)
    method_of(step).apply(step, build)
    return build


def test_a_warm_start_loads_the_production_students_weights(tmp_path, tiny_teacher_dir, small_splits):
    """The sidecar a cold distillation saves holds its student exactly; a warm
    start with no epochs is that student, weight for weight, and one with
    epochs moves on from it, not from the teacher's layers."""
    from shrinkflow.compress.distill import make_student
    from shrinkflow.compress.warm import read_meta
    from shrinkflow.modeling import load_torch_model

    cold = distil(tiny_teacher_dir, small_splits, STEP, student_dir=tmp_path / "sidecar")
    production = state(cold.model)
    meta = read_meta(tmp_path / "sidecar")
    assert (meta["candidate"], meta["layers"], meta["teacher_hash"]) == ("student", [0], cold.teacher_hash)
    assert cold.run_stats["warm_start_from"] is None and cold.run_stats["distill_epochs"] == 1

    window = ["a brand new kind of sentence", "another one from production"]
    kept = distil(tiny_teacher_dir, small_splits, STEP.model_copy(update={"warm_start_epochs": 0}), window=window,
                  warm=tmp_path / "sidecar")
    assert same_state(state(kept.model), production)
    assert kept.run_stats["warm_start_from"] == str(tmp_path / "sidecar")
    assert kept.run_stats["distill_epochs"] == 0

    # The teacher's own layer-0 student is not what production was.
    fresh = state(make_student(load_torch_model(tiny_teacher_dir), (0,)))
    assert not same_state(fresh, production)
    trained = distil(tiny_teacher_dir, small_splits, STEP, window=window, warm=tmp_path / "sidecar")
    assert not same_state(state(trained.model), production)
    # Off, the same sidecar is ignored: the cold build, bit for bit.
    off = distil(tiny_teacher_dir, small_splits, STEP.model_copy(update={"warm_start": False}), window=window,
                 warm=tmp_path / "sidecar")
    again = distil(tiny_teacher_dir, small_splits, STEP, window=window)
    assert same_state(state(off.model), state(again.model))


def test_the_mix_samples_the_asked_training_rows_seeded(tmp_path, tiny_teacher_dir, small_splits):
    from shrinkflow.compress.warm import mix_rows

    rows = mix_rows(10, 1000, 4.0, seed=3)
    assert len(rows) == 40 and len(set(rows.tolist())) == 40 and rows.max() < 1000
    assert np.array_equal(rows, mix_rows(10, 1000, 4.0, seed=3))
    assert not np.array_equal(rows, mix_rows(10, 1000, 4.0, seed=4))
    assert len(mix_rows(10, 1000, 2.5, seed=0)) == 25
    assert len(mix_rows(10, 30, 4.0, seed=0)) == 30      # capped at the split
    assert len(mix_rows(10, 1000, 0.0, seed=0)) == 0     # the window alone

    cold = distil(tiny_teacher_dir, small_splits, STEP, student_dir=tmp_path / "sidecar")
    window = [f"production sentence number {i}" for i in range(6)]
    step = STEP.model_copy(update={"warm_start_train_rows_per_window_text": 3.0, "warm_start_epochs": 0})
    warm = distil(tiny_teacher_dir, small_splits, step, window=window, warm=tmp_path / "sidecar")
    assert warm.run_stats["warm_start_train_rows"] == 18
    assert warm.run_stats["distill_rows"] == 18 + 6
    assert cold.run_stats["distill_rows"] == len(small_splits["train"])
    # the window weighed up: each window text seen 3 times, the anchor unchanged
    thrice = distil(tiny_teacher_dir, small_splits, step.model_copy(update={"warm_start_window_repeats": 3}),
                    window=window, warm=tmp_path / "sidecar")
    assert thrice.run_stats["warm_start_train_rows"] == 18
    assert thrice.run_stats["distill_rows"] == 18 + 3 * 6 and thrice.stats["distill_unlabelled_rows"] == 6
    # teacher-labelled variants of the window: new text, not the same texts again
    varied = distil(tiny_teacher_dir, small_splits, step.model_copy(update={"warm_start_window_augment_copies": 2}),
                    window=window, warm=tmp_path / "sidecar")
    assert varied.run_stats["warm_start_train_rows"] == 18
    assert varied.run_stats["warm_start_window_augmented_rows"] == 2 * 6
    assert varied.run_stats["distill_rows"] == 18 + 6 + 2 * 6 and varied.stats["distill_augmented_rows"] == 12
    assert "warm_start_window_augmented_rows" not in warm.run_stats
    # ... and both only in a warm start: a cold build of the same step ignores them
    cold3 = distil(tiny_teacher_dir, small_splits, STEP.model_copy(update={"warm_start_window_repeats": 3,
                                                                         "warm_start_window_augment_copies": 2}),
                   window=window)
    assert cold3.run_stats["distill_rows"] == len(small_splits["train"]) + 6
    assert "warm_start_window_augmented_rows" not in cold3.run_stats


@pytest.mark.slow  # ~7 s: in the full suite, not the quick run
def test_teacher_outputs_come_from_the_cache_and_a_corrupted_entry_is_rebuilt(tmp_path, tiny_teacher_dir,
                                                                               small_splits):
    """The second build reads the teacher's outputs from the cache and builds
    the same model, byte for byte; a corrupted entry is a miss, recomputed."""
    from shrinkflow.compress.build import build_candidate
    from shrinkflow.files import file_hashes
    from shrinkflow.paths import CANDIDATES, STUDENTS, TEACHER_OUTPUT_CACHE

    root = project(tmp_path, tiny_teacher_dir, small_splits)
    first = build_candidate(root, STUDENT, opset=17, threads=1)
    built = file_hashes(root / CANDIDATES / "student")
    student = file_hashes(root / STUDENTS / "student")
    assert first["teacher_outputs_cached"] is False
    entries = [p for p in (root / TEACHER_OUTPUT_CACHE).iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "hidden.npy").is_file()

    second = build_candidate(root, STUDENT, opset=17, threads=1)
    assert second["teacher_outputs_cached"] is True
    assert file_hashes(root / CANDIDATES / "student") == built
    assert file_hashes(root / STUDENTS / "student") == student

    logits = entries[0] / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-8] + b"\0" * 8)
    third = build_candidate(root, STUDENT, opset=17, threads=1)
    assert third["teacher_outputs_cached"] is False
    assert file_hashes(root / CANDIDATES / "student") == built
    fourth = build_candidate(root, STUDENT, opset=17, threads=1)
    assert fourth["teacher_outputs_cached"] is True


def test_the_key_covers_the_warm_start_only_when_one_is_used(tmp_path, tiny_teacher_dir, small_splits):
    """Without a staged student the keys are what they were: the warm-start
    params change nothing, and the key is the one computed without them. With
    a matching student staged, its content and those params are in the key; a
    student of other layers or another teacher is no warm start."""
    from shrinkflow.compress.keys import candidate_key, candidate_keys, inputs_hashes
    from shrinkflow.compress.warm import save_sidecar
    from shrinkflow.paths import WARM_START

    root = project(tmp_path, tiny_teacher_dir, small_splits)
    variants = [STUDENT.model_copy(update={"recipe": (STEP.model_copy(update=u),) + STUDENT.recipe[1:]})
                for u in ({}, {"warm_start": False}, {"warm_start_epochs": 7},
                          {"warm_start_train_rows_per_window_text": 0.5}, {"warm_start_window_repeats": 3},
                          {"warm_start_window_augment_copies": 2}, {"warm_start_learning_rate": 1e-3},
                          {"warm_start_alpha_kl": 0.5})]
    cold = {candidate_keys(root, [c], 17, 1, False)["student"] for c in variants}
    assert len(cold) == 1
    hashes = inputs_hashes(root)
    common = dict(**hashes, code="c", libraries={}, opset=17, threads=1)
    assert candidate_key(variants[0], **common) == candidate_key(variants[2], **common) \
        == candidate_key(variants[0], **common, warm_start_hash=None)

    cold_build = distil(tiny_teacher_dir, small_splits, STEP, student_dir=root / WARM_START / "student")
    assert cold_build.model is not None
    warm = [candidate_keys(root, [c], 17, 1, False)["student"] for c in variants]
    assert warm[1] in cold                               # warm_start: false -> the cold key
    assert len({warm[0], warm[2], warm[3], warm[4], warm[5], warm[6], warm[7]} | cold) == 8   # each warm param: the key

    meta = json.loads((root / WARM_START / "student" / "warm_start.json").read_text())
    for other in ({"layers": [1]}, {"teacher_hash": "another teacher"}, {"candidate": "other"}):
        (root / WARM_START / "student" / "warm_start.json").write_text(json.dumps({**meta, **other}))
        assert candidate_keys(root, [variants[0]], 17, 1, False)["student"] in cold, other
    # A sidecar with other weights is another key.
    (root / WARM_START / "student" / "warm_start.json").write_text(json.dumps(meta))
    save_sidecar(cold_build.model.half().float(), root / WARM_START / "student", candidate="student", layers=(0,),
                 teacher_hash=meta["teacher_hash"], labels=meta["labels"])
    assert candidate_keys(root, [variants[0]], 17, 1, False)["student"] not in set(warm) | cold


def test_the_registry_keeps_the_student_with_the_version_and_verifies_it(tmp_path):
    """Stored beside the model, hashed in the manifest, not served and not in
    the content hash; a changed file is refused; staging copies production's
    into the project and says which version it is."""
    from shrinkflow.compress.warm import SOURCE, read_meta, save_sidecar
    from shrinkflow.errors import IntegrityError
    from shrinkflow.paths import WARM_START
    from shrinkflow.registry import Registry
    from shrinkflow.warmstart import stage_warm_start
    import torch

    sidecar = save_sidecar(torch.nn.Linear(4, 2), tmp_path / "sidecar", candidate="student", layers=(0, 2),
                           teacher_hash="t", labels=("negative", "positive"))
    reg = Registry(tmp_path / "reg")
    plain = reg.promote(model_dir(tmp_path, "m1", b"one"), PASS, {"candidate": "student"})
    assert reg.warm_start(plain.version) is None
    promo = reg.promote(model_dir(tmp_path, "m2", b"one"), PASS, {"candidate": "student"}, warm_start=sidecar)
    man = reg.manifest(promo.version)
    assert promo.same_model_as == plain.version          # the served files alone decide
    assert set(man["files"]) == {"model.onnx", "shrinkflow_model.json"}
    assert set(man["warm_start_files"]) == {"student.safetensors", "warm_start.json"}
    stored = reg.warm_start(promo.version)
    assert stored == reg.path(promo.version) / "warm_start"
    assert (stored / "student.safetensors").read_bytes() == (sidecar / "student.safetensors").read_bytes()

    project_root = tmp_path / "proj"
    (project_root / WARM_START).mkdir(parents=True)
    (project_root / WARM_START / "README.md").write_text("kept\n")
    (project_root / WARM_START / "old-candidate").mkdir()   # staged by an earlier re-compression
    staged = stage_warm_start(project_root, "../reg")
    assert staged["version"] == promo.version and staged["candidate"] == "student"
    assert sorted(p.name for p in (project_root / WARM_START).iterdir()) == ["README.md", SOURCE, "student"]
    assert read_meta(project_root / WARM_START / "student")["layers"] == [0, 2]
    assert json.loads((project_root / WARM_START / SOURCE).read_text()) == staged
    assert "for_retrain" not in staged
    for_retrain = stage_warm_start(project_root, "../reg", for_retrain=True)
    assert for_retrain == {**staged, "for_retrain": True}
    assert json.loads((project_root / WARM_START / SOURCE).read_text()) == for_retrain

    (stored / "student.safetensors").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="warm-start files changed"):
        reg.warm_start(promo.version)
    refused = stage_warm_start(project_root, "../reg")
    assert refused["version"] == promo.version and "warm-start files changed" in refused["error"]
    assert sorted(p.name for p in (project_root / WARM_START).iterdir()) == ["README.md"]


def test_a_staged_student_warm_starts_the_build_and_the_cache_keeps_its_sidecar(tmp_path, tiny_teacher_dir,
                                                                               small_splits):
    """The library build, as a re-compression runs it: the staged student
    warm-starts the distillation (the record says from which version, with how
    many rows and epochs), and its own sidecar comes back with a cached build."""
    from shrinkflow.compress.build import build_candidate
    from shrinkflow.compress.keys import candidate_keys
    from shrinkflow.files import file_hashes
    from shrinkflow.paths import STUDENTS, UNLABELLED, WARM_START

    from shrinkflow.modeling import read_manifest
    from shrinkflow.paths import CANDIDATES

    root = project(tmp_path, tiny_teacher_dir, small_splits)
    cold = build_candidate(root, STUDENT, opset=17, threads=1)
    assert cold["warm_start_from"] is None and cold["distill_epochs"] == 1
    assert cold["distill_learning_rate"] == STEP.learning_rate and cold["distill_alpha_kl"] == STEP.alpha_kl
    # A cold build's manifest records the recipe as builds did before the warm-start params existed.
    assert "warm_start_epochs" not in read_manifest(root / CANDIDATES / "student")["recipe"][0]
    shutil.copytree(root / STUDENTS / "student", root / WARM_START / "student")
    (root / WARM_START / "source.json").write_text(json.dumps({"version": "v0007"}))
    (root / UNLABELLED).write_text("".join(f"a production text, number {i}\n" for i in range(5)))

    key = candidate_keys(root, [STUDENT], 17, 1, False)["student"]
    warm = build_candidate(root, STUDENT, opset=17, threads=1, key=key)
    assert (warm["warm_start_from"], warm["warm_start_train_rows"], warm["distill_rows"],
            warm["distill_epochs"], warm["cached"]) == ("v0007", 20, 25, 2, False)
    assert read_manifest(root / CANDIDATES / "student")["recipe"][0]["warm_start_epochs"] == 2
    assert warm["distill_learning_rate"] == STEP.learning_rate      # null: the step's rate
    sidecar = file_hashes(root / STUDENTS / "student")
    assert sidecar != file_hashes(root / WARM_START / "student")
    shutil.rmtree(root / STUDENTS / "student")
    again = build_candidate(root, STUDENT, opset=17, threads=1, key=key)
    assert again["cached"] is True and again["warm_start_from"] == "v0007"
    assert file_hashes(root / STUDENTS / "student") == sidecar
    slower = STUDENT.model_copy(update={"recipe": (STEP.model_copy(update={"warm_start_learning_rate": 1e-5}),)
                                        + STUDENT.recipe[1:]})
    assert build_candidate(root, slower, opset=17, threads=1)["distill_learning_rate"] == 1e-5
    hard = STUDENT.model_copy(update={"recipe": (STEP.model_copy(update={"warm_start_alpha_kl": 0.25}),)
                                      + STUDENT.recipe[1:]})
    assert build_candidate(root, hard, opset=17, threads=1)["distill_alpha_kl"] == 0.25


def test_the_teacher_output_cache_keeps_the_most_recently_used_entries(tmp_path):
    """At most max_entries: storing one more deletes the least recently used
    (stored or loaded), never the one just stored; a loaded entry is used."""
    import os

    from shrinkflow.compress.teacher_cache import INFO, TeacherOutputCache

    cache = TeacherOutputCache(tmp_path / "cache", max_entries=2)
    logits = np.zeros((3, 2), dtype=np.float32)
    for i, key in enumerate(("a", "b")):
        cache.store(key, logits, [])
        os.utime(cache.entry(key) / INFO, (1000 + i, 1000 + i))  # a older than b
    assert cache.load("a") is not None  # a is now the most recently used
    cache.store("c", logits, [])
    assert sorted(p.name for p in cache.entries()) == ["a", "c"]
    assert cache.load("b") is None
    # never the entry just stored, even when the cache holds one entry
    one = TeacherOutputCache(tmp_path / "one", max_entries=1)
    one.store("x", logits, [])
    one.store("y", logits, [])
    assert [p.name for p in one.entries()] == ["y"] and one.load("y") is not None


def test_interpolation_keeps_the_asked_share_of_the_production_weights():
    """WiSE-FT: (1 - keep) * new + keep * production on every float tensor;
    keep 0 changes nothing; different tensors are refused."""
    import torch

    from shrinkflow.compress.warm import interpolate

    torch.manual_seed(0)
    new, prod = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    w_new, w_prod = new.weight.detach().clone(), prod.weight.detach().clone()
    assert interpolate(new, prod, 0.0) == {"tensors": 0} and torch.equal(new.weight, w_new)
    assert interpolate(new, prod, 0.25) == {"tensors": 2}
    assert torch.allclose(new.weight, 0.75 * w_new + 0.25 * w_prod)
    assert torch.equal(prod.weight, w_prod)  # production untouched
    with pytest.raises(ValueError, match="differ in their tensors"):
        interpolate(new, torch.nn.Linear(4, 2), 0.5)


def one_weight_models():
    """(student, production): models of one float64 weight w, 0 and 1, so
    that interpolating keeps ``keep`` of production's w."""
    import torch

    student = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    production = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        student.weight.fill_(0.0)
        production.weight.fill_(1.0)
    return student, production


def test_the_grid_keeps_the_first_share_within_the_val_drop_and_else_the_last():
    """``choose_interpolation`` on its boundaries. Models of one weight w:
    interpolating keeps ``keep`` of production's w = 1 (the student's is 0),
    and the accuracy is 0.8 + 0.1 w, so production scores 0.90 and the
    shares 0.3, 0.5, 0.7 score 0.83, 0.85, 0.87 (7, 5 and 3 points under)."""
    from shrinkflow.compress.warm import choose_interpolation

    def accuracy(model) -> float:
        return 0.8 + 0.1 * float(model.weight.detach())

    grid = (0.3, 0.5, 0.7)
    for max_drop, chosen, met, n_tried in ((7.0, 0.3, True, 1), (5.0, 0.5, True, 2), (4.99, 0.7, True, 3),
                                           (3.0, 0.7, True, 3), (2.99, 0.7, False, 3), (0.0, 0.7, False, 3)):
        student, production = one_weight_models()
        got = choose_interpolation(student, production, grid, max_drop, accuracy)
        assert (got["chosen"], got["met"], len(got["tried"])) == (chosen, met, n_tried), (max_drop, got)
        assert got["production_val_accuracy"] == pytest.approx(0.9)
        # the student is left at the chosen share, not at the last one tried
        assert float(student.weight.detach()) == pytest.approx(chosen)
        assert float(production.weight.detach()) == 1.0
        assert [t["keep"] for t in got["tried"]] == list(grid[:n_tried])


def test_a_warm_distillation_with_a_grid_chooses_on_val_and_keys_the_val_split(tmp_path, tiny_teacher_dir,
                                                                                small_splits):
    """A real warm re-distillation of the tiny student with a grid: the share
    kept is one of the grid's, chosen on the val split's accuracies, which the
    run stats record; the student saved as the version's sidecar is the
    interpolated one. Without a val split it is refused. The val split is in
    the candidate key only for a warm start with a grid."""
    from shrinkflow.compress.keys import candidate_keys
    from shrinkflow.compress.steps import Build, method_of
    from shrinkflow.compress.warm import warm_student
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.modeling import TOKENIZER, load_torch_model
    from shrinkflow.paths import WARM_START, split_path

    root = project(tmp_path, tiny_teacher_dir, small_splits)
    distil(tiny_teacher_dir, small_splits, STEP, student_dir=root / WARM_START / "student")
    grid_step = STEP.model_copy(update={"warm_start_interpolation": (0.3, 0.7), "warm_start_epochs": 1,
                                        "warm_start_train_rows_per_window_text": 2.0})
    train, val = small_splits["train"], small_splits["val"]
    window = val["text"].tolist()[:20]

    def build(with_val: bool) -> Build:
        return Build(load_torch_model(tiny_teacher_dir), (tiny_teacher_dir / TOKENIZER).read_text(),
                     train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                     unlabelled_texts=window, threads=1, progress=False, candidate="student",
                     teacher_hash=content_hash(file_hashes(tiny_teacher_dir)), warm_start=root / WARM_START / "student",
                     student_dir=tmp_path / "new-sidecar",
                     val_texts=val["text"].tolist() if with_val else None,
                     val_labels=val["label"].to_numpy() if with_val else None)

    b = build(True)
    method_of(grid_step).apply(grid_step, b)
    choice = b.run_stats["warm_start_interpolation_choice"]
    # No step after distill (a bare Build: no finish): scored in fp32, as before.
    assert "scored" not in choice and "teacher_val_accuracy" not in choice
    assert b.run_stats["warm_start_interpolation"] in (0.3, 0.7)
    assert [t["keep"] for t in choice["tried"]] == [0.3, 0.7][:len(choice["tried"])]
    assert all(0.0 <= t["val_accuracy"] <= 1.0 for t in choice["tried"])
    assert 0.0 < choice["production_val_accuracy"] <= 1.0
    assert choice["met"] == any((choice["production_val_accuracy"] - t["val_accuracy"]) * 100 <= 0.5
                                for t in choice["tried"])
    saved = warm_student(b.model, (0,), tmp_path / "new-sidecar")
    assert same_state(state(saved), state(b.model))
    with pytest.raises(ValueError, match="no val split"):
        method_of(grid_step).apply(grid_step, build(False))

    grid_candidate = STUDENT.model_copy(update={"recipe": (grid_step,) + STUDENT.recipe[1:]})
    plain = STUDENT.model_copy(update={"recipe": (grid_step.model_copy(update={"warm_start_interpolation": 0.3}),)
                                       + STUDENT.recipe[1:]})
    def keys() -> tuple[str, str]:
        return (candidate_keys(root, [grid_candidate], 17, 1, False)["student"],
                candidate_keys(root, [plain], 17, 1, False)["student"])

    small_splits["val"].to_parquet(root / split_path("val"), index=False)
    before = keys()
    small_splits["val"].head(10).to_parquet(root / split_path("val"), index=False)
    after = keys()
    assert before[0] != after[0]       # the grid's key follows the val split
    assert before[1] == after[1]       # one share: val is not read, nor keyed


def test_the_grid_skips_a_share_whose_built_candidate_loses_what_fp32_does_not():
    """The rule scored on the built candidates, with a fake scorer. Models of
    one weight w (production 1, the re-distilled student 0, a share keeps
    w = share): in fp32 every share scores production's 0.90, but as built
    (int8) share w scores 0.90 - 0.2 * (0.7 - w): 0.82, 0.86, 0.90 for 0.3,
    0.5, 0.7, and production 0.90. The fp32 bound keeps 0.3; the built one
    skips it. The teacher bound, on its boundary: teacher 0.87 keeps 0.5 at
    exactly 1 point, not at 0.99."""
    from shrinkflow.compress.warm import choose_interpolation

    def fp32(model) -> float:
        return 0.9

    def built(model) -> float:
        w = float(model.weight.detach())
        return 0.9 if w == 1.0 else 0.9 - 0.2 * (0.7 - w)

    grid = (0.3, 0.5, 0.7)
    assert choose_interpolation(*one_weight_models(), grid, 5.0, fp32)["chosen"] == 0.3
    student, production = one_weight_models()
    got = choose_interpolation(student, production, grid, 5.0, built)
    assert (got["chosen"], got["met"]) == (0.5, True)
    assert [(t["keep"], t["val_accuracy"]) for t in got["tried"]] == [(0.3, pytest.approx(0.82)),
                                                                      (0.5, pytest.approx(0.86))]
    assert float(student.weight.detach()) == pytest.approx(0.5) and "teacher_val_accuracy" not in got
    # teacher bound: at (1.0 point for 0.86 under 0.87), just under (0.99: skipped), just over
    for teacher, max_teacher, chosen, met in ((0.87, 1.0, 0.5, True), (0.87, 0.99, 0.7, True),
                                              (0.87, 1.01, 0.5, True), (0.95, 4.99, 0.7, False),
                                              (0.95, 5.0, 0.7, True)):
        student, production = one_weight_models()
        got = choose_interpolation(student, production, grid, 5.0, built, teacher_accuracy=teacher,
                                   max_teacher_drop_points=max_teacher)
        assert (got["chosen"], got["met"], got["teacher_val_accuracy"]) == (chosen, met, teacher), \
            (teacher, max_teacher, got)
        assert float(student.weight.detach()) == pytest.approx(chosen)
    # the teacher bound is not checked without a threshold
    got = choose_interpolation(*one_weight_models(), grid, 5.0, built, teacher_accuracy=0.99, max_teacher_drop_points=None)
    assert got["chosen"] == 0.5 and "teacher_val_accuracy" not in got


@pytest.mark.slow  # ~11 s: in the full suite, not the quick run (kept under 3 minutes)
def test_a_warm_build_with_a_grid_chooses_on_the_built_candidate_and_ships_it(tmp_path, tiny_teacher_dir,
                                                                              small_splits, capsys):
    """A real warm build of the tiny student (distill with a grid, vocabulary
    pruning, int8): every share tried and the production student are built
    through the later steps and scored on val in ONNX Runtime; the run stats
    record each built val accuracy, production's and the teacher's; the
    candidate is the chosen share's build (its val accuracy is the one
    recorded, and the later steps re-run from the saved sidecar give the same
    files); no trial directory is left behind. The val labels scored go
    through the prediction cache under validate's keys: the candidate's are
    there for validate, and production's student, rebuilt byte for byte by
    the next build (same window), is read back, not predicted."""
    from shrinkflow.compress.recipe import _later_steps, apply_recipe
    from shrinkflow.compress.steps import Build, built_accuracy
    from shrinkflow.compress.teacher_cache import TeacherOutputCache
    from shrinkflow.compress.warm import warm_student
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.modeling import TOKENIZER, load_torch_model, read_manifest
    from shrinkflow.paths import WARM_START
    from shrinkflow.prediction_cache import PredictionCache, model_hash
    from shrinkflow.predictors import load_predictor

    root = project(tmp_path, tiny_teacher_dir, small_splits)
    predictions = PredictionCache(tmp_path / "predictions")
    distil(tiny_teacher_dir, small_splits, STEP, student_dir=root / WARM_START / "student")
    grid = (0.3, 0.5, 0.7)
    # Bounds of 0 points: a share is kept only if its build ties or beats
    # both production's and the teacher's; in practice all three are tried.
    step = STEP.model_copy(update={"warm_start_interpolation": grid, "warm_start_epochs": 1,
                                   "warm_start_train_rows_per_window_text": 2.0,
                                   "warm_start_max_val_drop_points": 0.0,
                                   "warm_start_max_teacher_val_drop_points": 0.0})
    candidate = STUDENT.model_copy(update={"recipe": (step,) + STUDENT.recipe[1:]})
    train, val = small_splits["train"], small_splits["val"]
    teacher_hash = content_hash(file_hashes(tiny_teacher_dir))
    run_stats: dict = {}
    out = apply_recipe(tiny_teacher_dir, candidate, tmp_path / "out" / "student", train_texts=train["text"].tolist(),
                       train_labels=train["label"].to_numpy(), threads=1, progress=False,
                       unlabelled_texts=val["text"].tolist()[:20], teacher_hash=teacher_hash,
                       teacher_cache=TeacherOutputCache(tmp_path / "cache"), warm_start=root / WARM_START / "student",
                       student_dir=tmp_path / "sidecar", run_stats=run_stats,
                       val_texts=val["text"].tolist(), val_labels=val["label"].to_numpy(),
                       prediction_cache=predictions)
    assert "read from the prediction cache" not in capsys.readouterr().out  # nothing scored before
    choice = run_stats["warm_start_interpolation_choice"]
    assert choice["scored"] == "built"
    tried = [t["keep"] for t in choice["tried"]]
    assert tried == list(grid[:len(tried)]) and run_stats["warm_start_interpolation"] == tried[-1]
    for figure in [choice["production_val_accuracy"], choice["teacher_val_accuracy"]] + \
            [t["val_accuracy"] for t in choice["tried"]]:
        assert 0.0 < figure <= 1.0
    within = [(choice["production_val_accuracy"] - t["val_accuracy"]) * 100 <= 1e-9
              and (choice["teacher_val_accuracy"] - t["val_accuracy"]) * 100 <= 1e-9 for t in choice["tried"]]
    assert choice["met"] == any(within) and within[:-1] == [False] * (len(tried) - 1)
    # the teacher's val accuracy is the teacher's own; its val logits are kept
    # in the teacher-output cache beside the training split's
    assert len(TeacherOutputCache(tmp_path / "cache").entries()) == 2
    from shrinkflow.predictors import predict_labels

    teacher_pred = predict_labels(load_predictor(tiny_teacher_dir, threads=1), val["text"].tolist())
    assert choice["teacher_val_accuracy"] == pytest.approx(float((teacher_pred == val["label"].to_numpy()).mean()),
                                                           abs=1.5 / len(val))
    # production's figure is production's student taken through the same later steps
    teacher = load_torch_model(tiny_teacher_dir)

    def later_steps(sidecar: Path, dest: Path, stats: dict) -> Path:
        dest.mkdir()
        b = Build(warm_student(teacher, (0,), sidecar), (tiny_teacher_dir / TOKENIZER).read_text(),
                  train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                  unlabelled_texts=val["text"].tolist()[:20], threads=1, progress=False,
                  max_seq_len=read_manifest(tiny_teacher_dir)["max_seq_len"], stats=stats)
        _later_steps(b, candidate, 1, dest, 17, False, train["text"].tolist(), read_manifest(out)["labels"], True)
        return dest

    production = later_steps(root / WARM_START / "student", tmp_path / "production", {})
    assert built_accuracy(production, val["text"].tolist(), val["label"].to_numpy(), 1) == \
        pytest.approx(choice["production_val_accuracy"], abs=1e-6)
    # the candidate is the chosen share, as built and scored
    assert built_accuracy(out, val["text"].tolist(), val["label"].to_numpy(), 1) == \
        pytest.approx(choice["tried"][-1]["val_accuracy"], abs=1e-6)
    # both are in the prediction cache under the key validate reads (the
    # same labels the scoring above predicted afresh)
    for model, acc in ((production, choice["production_val_accuracy"]), (out, choice["tried"][-1]["val_accuracy"])):
        per_row = bool(load_predictor(model, threads=1).batch_dependent)
        cached = predictions.get(predictions.key(model_hash(model), "labels", val["text"].tolist(),
                                                 per_row=per_row, threads=1))
        assert cached is not None
        assert float((np.asarray(cached) == val["label"].to_numpy()).mean()) == pytest.approx(acc, abs=1e-6)
    manifest = read_manifest(out)
    assert manifest["stats"]["layers"] == [0] and "vocab_size" in manifest["stats"]
    assert manifest["recipe"][0]["warm_start_max_teacher_val_drop_points"] == 0.0
    # the later steps again, from the sidecar the build saved (the chosen share's student): the same files
    again = later_steps(tmp_path / "sidecar", tmp_path / "again", dict(manifest["stats"]))
    rebuilt = file_hashes(again)
    assert {k: v for k, v in rebuilt.items() if k != "shrinkflow_model.json"} == \
        {k: v for k, v in file_hashes(out).items() if k != "shrinkflow_model.json"}
    assert read_manifest(again)["stats"] == manifest["stats"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["student"]

    # Bounds nothing misses: the first share is kept, and it is the candidate.
    loose = step.model_copy(update={"warm_start_max_val_drop_points": 100.0,
                                    "warm_start_max_teacher_val_drop_points": 100.0})
    run_stats = {}
    out = apply_recipe(tiny_teacher_dir, candidate.model_copy(update={"recipe": (loose,) + STUDENT.recipe[1:]}),
                       tmp_path / "loose" / "student", train_texts=train["text"].tolist(),
                       train_labels=train["label"].to_numpy(), threads=1, progress=False,
                       unlabelled_texts=val["text"].tolist()[:20], teacher_hash=teacher_hash,
                       teacher_cache=TeacherOutputCache(tmp_path / "cache"), warm_start=root / WARM_START / "student",
                       run_stats=run_stats, val_texts=val["text"].tolist(), val_labels=val["label"].to_numpy(),
                       prediction_cache=predictions)
    # production's student, rebuilt here byte for byte (the same weights and
    # window texts, so the same pruned vocabulary), is read back
    out_log = capsys.readouterr().out
    assert "student (production's student): val labels read from the prediction cache" in out_log, out_log
    choice = run_stats["warm_start_interpolation_choice"]
    assert (run_stats["warm_start_interpolation"], choice["met"], len(choice["tried"])) == (0.3, True, 1)
    assert built_accuracy(out, val["text"].tolist(), val["label"].to_numpy(), 1) == \
        pytest.approx(choice["tried"][0]["val_accuracy"], abs=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["student"]


def test_the_interpolation_line_says_which_bound_each_refused_share_missed():
    """The console line for a grid: every share tried with its val accuracy,
    and for a refused one the bound it missed by how many points (the limits
    are in the result, so the line needs nothing else)."""
    from shrinkflow.compress.warm import choose_interpolation, interpolation_line

    def built(model) -> float:  # as in the test above: 0.82, 0.86, 0.90 for 0.3, 0.5, 0.7; production 0.90
        w = float(model.weight.detach())
        return 0.9 if w == 1.0 else 0.9 - 0.2 * (0.7 - w)

    got = choose_interpolation(*one_weight_models(), (0.3, 0.5, 0.7), 5.0, built, teacher_accuracy=0.87,
                               max_teacher_drop_points=1.0)
    assert (got["max_drop_points"], got["max_teacher_drop_points"]) == (5.0, 1.0)
    line = interpolation_line("student", got, "built")
    assert line.startswith("compress: student: kept 0.5 of the production student's weights"), line
    assert "at most 5 points under production's 0.9000 and 1 under the teacher's 0.8700 on built val" in line
    # 0.3 missed both bounds (8 points under production, 5 under the teacher); 0.5 is within
    assert "0.3 -> 0.8200 (refused: 8.00 under production, 5.00 under the teacher)" in line, line
    assert "0.5 -> 0.8600 (within)" in line and "0.7" not in line.split("val accuracy:")[1], line
    # nothing within: the last share is kept, and the line says so
    got = choose_interpolation(*one_weight_models(), (0.3, 0.5), 1.0, built)
    line = interpolation_line("student", got, None)
    assert "teacher" not in line and "on val accuracy" in line
    assert "0.5 -> 0.8600 (refused: 4.00 under production)" in line and line.endswith("so the last was kept")


def test_the_build_line_names_what_a_warm_re_distillation_learned_from():
    from shrinkflow.compress.build import warm_start_note

    assert warm_start_note({}, {"distill_unlabelled_rows": 5}) == ""  # a cold build
    run_stats = {"warm_start_from": "v0004", "warm_start_train_rows": 6024, "warm_start_window_augmented_rows": 753,
                 "distill_rows": 7530, "distill_epochs": 2}
    note = warm_start_note(run_stats, {"distill_unlabelled_rows": 753})
    assert note == (" (warm start from v0004: 6,024 training rows, 753 window texts, 753 variants of them; "
                    "7,530 rows in all, 2 epoch(s))"), note
    del run_stats["warm_start_window_augmented_rows"]
    assert "variants" not in warm_start_note(run_stats, {"distill_unlabelled_rows": 753})


def test_the_re_compression_log_says_whether_the_students_start_warm():
    from shrinkflow.warmstart import warm_start_summary

    assert warm_start_summary(None, None) == "warm start: nothing is in production; every student distils cold"
    cold = warm_start_summary("v0001", None)
    assert "production v0001 keeps no distilled student (the int8 teacher" in cold and cold.endswith("distils cold")
    bad = warm_start_summary("v0002", {"version": "v0002", "error": "sha256 mismatch"})
    assert "v0002's student failed verification" in bad and "sha256 mismatch" in bad and bad.endswith("distils cold")
    warm = warm_start_summary("v0003", {"version": "v0003", "candidate": "student", "content_hash": "h"})
    assert warm == "warm start: production v0003's student staged: candidate 'student' re-distils from it"


def test_a_student_of_another_teacher_warm_starts_only_when_a_retrain_staged_it(tmp_path, tiny_teacher_dir,
                                                                              small_splits):
    """After a retrain the sidecar's teacher is not the kept one: the build
    starts from it only when the retrain flow staged it (``for_retrain`` in
    source.json) and the step's ``warm_start_across_teachers`` is on; then
    the record names the version and the key differs from the cold build's.
    Another candidate's or other layers' student never fits."""
    from shrinkflow.compress.build import build_candidate
    from shrinkflow.compress.keys import candidate_keys
    from shrinkflow.compress.warm import META, SOURCE, candidate_warm_start, matching_sidecar
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.paths import STUDENTS, TEACHER, WARM_START

    root = project(tmp_path, tiny_teacher_dir, small_splits)
    cold = build_candidate(root, STUDENT, opset=17, threads=1)
    assert cold["warm_start_from"] is None
    cold_key = candidate_keys(root, [STUDENT], 17, 1, False)["student"]
    staged = root / WARM_START / "student"
    shutil.copytree(root / STUDENTS / "student", staged)
    meta = json.loads((staged / META).read_text())
    (staged / META).write_text(json.dumps({**meta, "teacher_hash": "the-old-teacher"}))
    teacher = content_hash(file_hashes(root / TEACHER))
    across = Candidate(name="student", recipe=(STEP.model_copy(update={"warm_start_across_teachers": True}),))
    not_across = Candidate(name="student", recipe=(STEP.model_copy(update={"warm_start_across_teachers": False}),))

    for source in (None, {"version": "v0003"}, {"version": "v0003", "for_retrain": False}):
        if source is not None:
            (root / WARM_START / SOURCE).write_text(json.dumps(source))
        assert candidate_warm_start(root / WARM_START, across, teacher) is None, source
    (root / WARM_START / SOURCE).write_text(json.dumps({"version": "v0003", "for_retrain": True}))
    assert candidate_warm_start(root / WARM_START, across, teacher) == staged
    assert candidate_warm_start(root / WARM_START, not_across, teacher) is None
    assert matching_sidecar(root / WARM_START, "student", (0, 1), teacher, across_teachers=True) is None
    assert matching_sidecar(root / WARM_START, "other", (0,), teacher, across_teachers=True) is None

    (root / "data/unlabelled/texts.txt").write_text("".join(f"a production text, number {i}\n" for i in range(5)))
    warm_key = candidate_keys(root, [STUDENT], 17, 1, False)["student"]
    assert warm_key != cold_key
    warm = build_candidate(root, STUDENT, opset=17, threads=1, key=warm_key)
    assert (warm["warm_start_from"], warm["warm_start_train_rows"]) == ("v0003", 20)


def test_distillation_reads_the_production_labels_texts_and_the_key_follows_them(tmp_path, small_splits):
    """The window, then the texts of the production labels a retrain
    fine-tuned on (never the held-out labels, nor a text among the window's
    held-out texts), then the user's unlabelled text; with no production
    labels the key is the window's alone, as before."""
    import pandas as pd

    from shrinkflow.files import sha256_file
    from shrinkflow.paths import UNLABELLED, UNLABELLED_PREPARED, WINDOW_HELDOUT, split_path
    from shrinkflow.splits import read_unlabelled, unlabelled_hash

    root = tmp_path
    (root / UNLABELLED).parent.mkdir(parents=True)
    (root / UNLABELLED).write_text("window one\n\nwindow two\n")
    (root / split_path("feedback_train")).parent.mkdir(parents=True)
    empty = pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype="int64")})
    for name in ("feedback_train", "feedback_heldout"):
        empty.to_parquet(root / split_path(name), index=False)
    assert read_unlabelled(root) == ["window one", "window two"]
    assert unlabelled_hash(root) == sha256_file(root / UNLABELLED)

    pd.DataFrame({"text": ["labelled tweet", "  "], "label": [1, 0]}).to_parquet(root / split_path("feedback_train"),
                                                                                index=False)
    pd.DataFrame({"text": ["held out tweet"], "label": [0]}).to_parquet(root / split_path("feedback_heldout"),
                                                                        index=False)
    assert read_unlabelled(root) == ["window one", "window two", "labelled tweet"]
    with_labels = unlabelled_hash(root)
    assert with_labels != sha256_file(root / UNLABELLED)

    # a production label's text that is also one of the window's held-out texts is not learned from
    (root / WINDOW_HELDOUT).write_text("held out text\n")
    pd.DataFrame({"text": ["labelled tweet", "held  out text "], "label": [1, 0]}).to_parquet(
        root / split_path("feedback_train"), index=False)
    assert read_unlabelled(root) == ["window one", "window two", "labelled tweet"]
    filtered = unlabelled_hash(root)
    assert filtered != with_labels
    (root / WINDOW_HELDOUT).write_text("another held out text\n")
    assert read_unlabelled(root) == ["window one", "window two", "labelled tweet", "held  out text "]
    assert unlabelled_hash(root) not in (filtered, with_labels)

    pd.DataFrame({"text": ["user text"]}).to_parquet(root / UNLABELLED_PREPARED, index=False)
    assert read_unlabelled(root) == ["window one", "window two", "labelled tweet", "held  out text ", "user text"]
    assert unlabelled_hash(root) not in (with_labels, sha256_file(root / UNLABELLED))
    empty.to_parquet(root / split_path("feedback_train"), index=False)
    # the user's text alone: the key it had before production labels counted
    import hashlib
    assert unlabelled_hash(root) == hashlib.sha256(
        f"{sha256_file(root / UNLABELLED)}:{sha256_file(root / UNLABELLED_PREPARED)}".encode()).hexdigest()


def test_a_soup_is_the_mean_of_its_members_each_with_its_own_seed_and_half_the_training_rows(
        tmp_path, tiny_teacher_dir, small_splits):
    """warm_start_soup 2: two warm re-distillations from the production
    student on the same window, seeds 0 and 1, each on its own sample of
    rows_per_window_text / 2 training rows; the student is the mean of their
    weights. Each member, built alone as a one-member warm build with its
    seed and rows, is that member; a cold build ignores the soup."""
    import torch

    from shrinkflow.compress.warm import average_weights

    distil(tiny_teacher_dir, small_splits, STEP, student_dir=tmp_path / "sidecar")
    window = [f"production sentence number {i}" for i in range(6)]
    step = STEP.model_copy(update={"warm_start_train_rows_per_window_text": 4.0})
    soup = distil(tiny_teacher_dir, small_splits, step.model_copy(update={"warm_start_soup": 2}), window=window,
                  warm=tmp_path / "sidecar")
    assert soup.run_stats["warm_start_soup"] == 2
    assert soup.run_stats["warm_start_train_rows"] == 2 * 12 and soup.run_stats["distill_rows"] == 2 * (12 + 6)
    half = step.model_copy(update={"warm_start_train_rows_per_window_text": 2.0})
    members = [distil(tiny_teacher_dir, small_splits, half.model_copy(update={"seed": s}), window=window,
                      warm=tmp_path / "sidecar") for s in (0, 1)]
    assert all(m.run_stats["warm_start_train_rows"] == 12 for m in members)
    a, b, got = state(members[0].model), state(members[1].model), state(soup.model)
    assert not same_state(a, b)
    for k, v in got.items():
        want = (a[k] + b[k]) / 2 if v.is_floating_point() else a[k]
        assert torch.allclose(v, want, atol=1e-6), k
    assert "warm_start_soup" not in distil(tiny_teacher_dir, small_splits, step.model_copy(
        update={"warm_start_soup": 2}), window=window).run_stats              # cold: one student
    with pytest.raises(ValueError, match="differ in their tensors"):
        average_weights([torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)])
    with pytest.raises(ValueError, match="at least one"):
        average_weights([])


def test_every_warm_start_param_is_left_out_of_an_ordinary_builds_record():
    """DistillStep.WARM_START_KEYS names every ``warm_start*`` field: a new
    one left out would enter every ordinary build's manifest and cache key
    (and move its content hash) though it changes nothing without a warm
    start. The record of a cold build holds none of them; a warm one all."""
    from shrinkflow.compress.warm import recipe_record

    fields = {name for name in DistillStep.model_fields if name.startswith("warm_start")}
    assert fields == set(DistillStep.WARM_START_KEYS)
    cand = Candidate(name="s", recipe=(DistillStep(layers=(0,)),))
    cold, warm = recipe_record(cand, False)[0], recipe_record(cand, True)[0]
    assert not fields & set(cold) and fields <= set(warm)
