"""The compress build's parts: the recipe-method registry, the cache keys,
the code hash that follows the build's imports, and the library build."""

from __future__ import annotations

import shutil
import typing
from pathlib import Path

import pytest

from shrinkflow.config import (Candidate, DistillStep, MagnitudePruneStep, QuantizeStep, RecipeStep,
                               StructuredPruneStep, VocabPruneStep)


def schema_methods() -> set[str]:
    """Every ``method`` the params schema accepts in a recipe."""
    union = typing.get_args(RecipeStep)[0]
    return {cls.model_fields["method"].default for cls in typing.get_args(union)}


def test_every_method_the_schema_accepts_is_registered_once():
    from shrinkflow.compress.steps import METHODS, Method, register

    assert set(METHODS) == schema_methods()
    assert {m.level for m in METHODS.values()} == {"torch", "onnx"}
    assert [n for n, m in METHODS.items() if m.level == "onnx"] == ["quantize"]

    class Again(Method):
        name = "quantize"

    with pytest.raises(ValueError, match="'quantize' registered twice"):
        register(Again)


def test_each_step_says_whether_it_reads_text():
    from shrinkflow.compress.steps import method_of, reads_text

    table = {DistillStep(): True, StructuredPruneStep(): True, VocabPruneStep(): True,
             MagnitudePruneStep(): False, MagnitudePruneStep(schedule="gradual"): True,
             QuantizeStep(): False, QuantizeStep(mode="static"): True}
    assert {step: method_of(step).reads_text(step) for step in table} == table
    assert reads_text(Candidate(name="a", recipe=(MagnitudePruneStep(), QuantizeStep()))) is False
    assert reads_text(Candidate(name="b", recipe=(MagnitudePruneStep(), QuantizeStep(mode="static")))) is True
    assert reads_text(Candidate(name="fp32")) is False


def test_an_unregistered_method_names_the_registered_ones():
    from shrinkflow.compress.steps import method_of

    class Step:
        method = "lowrank"

    with pytest.raises(KeyError, match="no recipe method 'lowrank'.*'distill'"):
        method_of(Step())


def key_inputs(**changed) -> dict:
    base = {"teacher_hash": "t", "train_hash": "tr", "unlabelled_hash": "u", "code": "c",
            "libraries": {"torch": "2"}, "opset": 17, "threads": 1, "labels": ("negative", "positive")}
    return base | changed


def test_the_key_covers_text_only_for_a_recipe_that_reads_it():
    from shrinkflow.compress.keys import candidate_key

    int8 = Candidate(name="int8", recipe=(QuantizeStep(),))
    static = Candidate(name="int8", recipe=(QuantizeStep(mode="static"),))
    for text_input in ("train_hash", "unlabelled_hash"):
        assert candidate_key(int8, **key_inputs(**{text_input: "new"})) == candidate_key(int8, **key_inputs())
        assert candidate_key(static, **key_inputs(**{text_input: "new"})) != candidate_key(static, **key_inputs())
    for other in ({"teacher_hash": "x"}, {"code": "x"}, {"threads": 2}, {"opset": 18}, {"fuse": True},
                  {"labels": ("a", "b")}):
        assert candidate_key(int8, **key_inputs(**other)) != candidate_key(int8, **key_inputs()), other


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_code_hash_follows_the_builds_imports(tmp_path):
    """A module the build imports only lazily, through another one, still
    changes the key; a module it never imports does not."""
    from shrinkflow.compress.keys import BUILD_ENTRY, build_modules, code_hash

    write_tree(tmp_path, {"shrinkflow/__init__.py": "", "shrinkflow/compress/__init__.py": "",
                          "shrinkflow/compress/build.py": "from shrinkflow.compress import steps\n",
                          "shrinkflow/compress/steps.py": "def f():\n    from shrinkflow.helper import g\n",
                          "shrinkflow/helper.py": "g = 1\n", "shrinkflow/serving.py": "s = 1\n"})
    assert BUILD_ENTRY == "shrinkflow.compress.build"
    assert [p.as_posix() for p in build_modules(tmp_path)] == [
        "shrinkflow/__init__.py", "shrinkflow/compress/__init__.py", "shrinkflow/compress/build.py",
        "shrinkflow/compress/steps.py", "shrinkflow/helper.py"]
    before = code_hash(tmp_path)
    (tmp_path / "shrinkflow/serving.py").write_text("s = 2\n")
    assert code_hash(tmp_path) == before
    (tmp_path / "shrinkflow/helper.py").write_text("g = 2\n")
    assert code_hash(tmp_path) != before


def test_the_real_build_covers_every_module_the_hand_kept_list_did():
    """The list the key used to be computed from (shrinkflow/compress, arch,
    modeling, train, io, config) is inside what the imports give, with every
    recipe method's module."""
    from shrinkflow.compress.keys import build_modules, package_root

    root = package_root()
    got = {p.as_posix() for p in build_modules(root)}
    old = {"shrinkflow/arch.py", "shrinkflow/modeling.py", "shrinkflow/train.py", "shrinkflow/files.py",
           "shrinkflow/config.py"}
    methods = {f"shrinkflow/compress/{m}.py" for m in ("steps", "texts", "recipe", "distill", "augment",
                                                        "structured", "vocab", "magnitude", "quantize",
                                                        "export", "build", "cache")}
    assert old | methods <= got
    assert "shrinkflow/serving.py" not in got and not any(p.startswith(("flows/", "tasks/", "stages/")) for p in got)


def project(tmp_path: Path, tiny_teacher_dir: Path, small_splits) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(tiny_teacher_dir, root / "models" / "teacher")
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "unlabelled").mkdir(parents=True)
    (root / "data" / "unlabelled" / "texts.txt").write_text("a new production sentence\n")
    small_splits["train"].to_parquet(root / "data" / "prepared" / "train.parquet", index=False)
    return root


def test_the_library_build_copies_an_unchanged_candidate_from_the_cache(tmp_path, tiny_teacher_dir, small_splits):
    """What one compress task runs, without Prefect: built once, then copied
    byte for byte under the same key; its record is metrics/compress.json's."""
    from shrinkflow.compress.build import build_candidate
    from shrinkflow.compress.keys import candidate_keys
    from shrinkflow.files import file_hashes

    root = project(tmp_path, tiny_teacher_dir, small_splits)
    cands = [Candidate(name="int8", recipe=(QuantizeStep(),)),
             Candidate(name="vocab", recipe=(VocabPruneStep(), QuantizeStep()))]
    keys = candidate_keys(root, cands, 17, 1, False)
    assert len(set(keys.values())) == 2
    first = {c.name: build_candidate(root, c, opset=17, threads=1, key=keys[c.name]) for c in cands}
    assert {n: r["cached"] for n, r in first.items()} == {"int8": False, "vocab": False}
    assert first["vocab"]["vocab_size"] < 30522 and first["int8"]["build_cpu_seconds"] > 0
    built = {c.name: file_hashes(root / "models" / "candidates" / c.name) for c in cands}
    shutil.rmtree(root / "models" / "candidates")

    # New window text: the vocabulary (which reads it) gets a new key, int8 keeps its own.
    (root / "data" / "unlabelled" / "texts.txt").write_text("another sentence entirely\n")
    new_keys = candidate_keys(root, cands, 17, 1, False)
    assert new_keys["int8"] == keys["int8"] and new_keys["vocab"] != keys["vocab"]
    again = build_candidate(root, cands[0], opset=17, threads=1, key=new_keys["int8"])
    assert again["cached"] is True and again["build_seconds"] == first["int8"]["build_seconds"]
    assert file_hashes(root / "models" / "candidates" / "int8") == built["int8"]


def test_a_recipe_that_reads_text_without_texts_fails_before_any_work(tiny_teacher_dir):
    """Every step that reads text is refused up front when there is none,
    static quantization (the last step) included, not after the steps
    before it ran."""
    import torch

    from shrinkflow.compress.recipe import transform_torch
    from shrinkflow.modeling import TOKENIZER, load_torch_model

    model = load_torch_model(tiny_teacher_dir)
    before = [p.detach().clone() for p in model.parameters()]
    tok = (tiny_teacher_dir / TOKENIZER).read_text()
    for recipe, method in (((MagnitudePruneStep(), QuantizeStep(mode="static")), "quantize"),
                           ((MagnitudePruneStep(schedule="gradual"),), "magnitude_prune"),
                           ((VocabPruneStep(),), "vocab_prune")):
        with pytest.raises(ValueError, match=f"recipe step '{method}' needs the training texts"):
            transform_torch(model, tok, Candidate(name="c", recipe=recipe), None, None, threads=1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # Without a step that reads text, no texts are needed.
    _, _, stats = transform_torch(model, tok, Candidate(name="c", recipe=(MagnitudePruneStep(),)), None, None,
                                  threads=1, progress=False)
    assert stats["encoder_sparsity"] == 0.5
