"""dvc.yaml knows everything each stage runs and reads.

The deps check follows each stage command's imports (shrinkflow.codegraph:
every ``import`` anywhere in a module, lazy ones inside functions included,
plus the ``__init__`` of every package on the way), so a stage that starts importing
a new module fails here until dvc.yaml lists it. The params check is done at
run time by ScopedParams; here its declarations are checked to exist.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from shrinkflow.codegraph import import_closure
from tests.conftest import PROJECT_ROOT


def uncovered(root: Path, dvc_yaml: dict) -> dict[str, list[str]]:
    """Per stage: project files its command imports that no dep covers."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        argv = shlex.split(stage["cmd"])
        assert argv[:2] == ["python", "-m"], f"stage {name}: cmd must be `python -m <module>`"
        deps = [Path(next(iter(d)) if isinstance(d, dict) else d) for d in stage.get("deps", [])]
        missing = sorted(str(f) for f in import_closure(root, argv[2])
                         if not any(f == d or d in f.parents for d in deps))
        if missing:
            out[name] = missing
    return out


def load_dvc_yaml(root: Path = PROJECT_ROOT) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())


def test_every_stage_depends_on_every_module_it_imports():
    assert uncovered(PROJECT_ROOT, load_dvc_yaml()) == {}


def test_every_code_dep_exists():
    """A dep that is no stage's out is source: it must be in the tree (a
    renamed module must not leave a dangling dep behind)."""
    stages = load_dvc_yaml()["stages"]
    produced = {next(iter(o)) if isinstance(o, dict) else o
                for s in stages.values() for key in ("outs", "metrics") for o in s.get(key, [])}
    for name, stage in stages.items():
        for d in stage.get("deps", []):
            if d not in produced:
                assert (PROJECT_ROOT / d).exists(), f"stage {name}: dep {d} does not exist"


def test_the_check_fails_when_a_stage_imports_something_undeclared(tmp_path):
    """The checker itself can fail: a stage that grows an import (lazy, inside
    a function, through a package) without a matching dep is reported."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "shrinkflow" / "compress").mkdir(parents=True)
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "shrinkflow" / "__init__.py").write_text("")
    (tmp_path / "shrinkflow" / "helper.py").write_text("from shrinkflow.compress import thing\n")
    (tmp_path / "shrinkflow" / "compress" / "__init__.py").write_text("from .inner import thing\n")
    (tmp_path / "shrinkflow" / "compress" / "inner.py").write_text("thing = 1\n")
    (tmp_path / "stages" / "a.py").write_text("def body():\n    from shrinkflow import helper\n")
    doc = {"stages": {"a": {"cmd": "python -m stages.a",
                            "deps": ["stages/__init__.py", "stages/a.py", "shrinkflow/__init__.py"]}}}
    assert uncovered(tmp_path, doc) == {"a": ["shrinkflow/compress/__init__.py", "shrinkflow/compress/inner.py",
                                              "shrinkflow/helper.py"]}
    doc["stages"]["a"]["deps"] += ["shrinkflow/helper.py", "shrinkflow/compress"]
    assert uncovered(tmp_path, doc) == {}


def test_every_declared_params_key_exists_in_params_yaml():
    from shrinkflow.bootstrap import declared_params

    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for stage in load_dvc_yaml()["stages"]:
        for key in declared_params(stage, PROJECT_ROOT):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {stage}: params key {key} not in params.yaml"
                node = node[part]


def test_scoped_params_refuse_an_undeclared_key():
    from shrinkflow.config import ParamsScopeError, ScopedParams, load_params

    params = load_params(PROJECT_ROOT / "params.yaml")
    view = ScopedParams(params, frozenset({"train.threads", "validate", "compress.candidates"}), "demo")
    assert view.train.threads == params.train.threads
    assert view.validate.gates == params.validate_.gates           # yaml key
    assert view.validate_.latency == params.validate_.latency      # attribute name
    assert view.compress.candidates == params.compress.candidates
    with pytest.raises(ParamsScopeError, match="stage 'demo' read params key 'train.epochs'"):
        view.train.epochs
    with pytest.raises(ParamsScopeError, match="'compress.runner'"):
        view.compress.runner
    with pytest.raises(ParamsScopeError, match="'data'"):
        view.data
    with pytest.raises(AttributeError):
        view.digest()  # a method, not a key: lineage may not hash undeclared keys


def test_unlabelled_text_has_one_source_of_truth():
    """The path is a catalog constant, not a param, and it is a compress dep;
    not a validate dep: validate does not predict the distilled texts."""
    from shrinkflow.config import CompressParams
    from shrinkflow.paths import UNLABELLED

    assert "unlabelled_path" not in CompressParams.model_fields
    compress = load_dvc_yaml()["stages"]["compress"]
    assert str(UNLABELLED) in compress["deps"]
    assert str(UNLABELLED) not in load_dvc_yaml()["stages"]["validate"]["deps"]
    assert "UNLABELLED" not in (PROJECT_ROOT / "stages" / "validate.py").read_text()


def test_window_files_are_deps_of_the_stages_that_read_them():
    """Re-compression writes the held-out window (validate gates on it) and
    window.json (deploy copies it into lineage): DVC must see both change.
    Compress reads the held-out texts too, only to keep them out of what
    distillation learns from: a production label's text among them is dropped
    (shrinkflow.splits.read_unlabelled; its boundaries: tests/test_warm_start.py)."""
    from shrinkflow.paths import UNLABELLED, WINDOW_HELDOUT, WINDOW_META

    stages = load_dvc_yaml()["stages"]
    assert str(WINDOW_HELDOUT) in stages["validate"]["deps"]
    assert str(WINDOW_META) in stages["deploy"]["deps"]
    assert str(WINDOW_HELDOUT) in stages["compress"]["deps"]   # the filter's input
    assert str(UNLABELLED) in stages["compress"]["deps"]       # the distilled part


def test_the_warm_start_is_a_compress_dep_and_the_students_reach_deploy():
    """The staged production student (compress reads it) exists in a fresh
    checkout, so the dep is never missing; the students compress writes are
    what deploy stores with the version."""
    from shrinkflow.paths import STUDENTS, WARM_START

    stages = load_dvc_yaml()["stages"]
    assert str(WARM_START) in stages["compress"]["deps"]
    assert (PROJECT_ROOT / WARM_START / "README.md").is_file()
    assert str(STUDENTS) in stages["deploy"]["deps"]


def test_catalog_outs_match_dvc_yaml():
    from shrinkflow import paths

    stages = load_dvc_yaml()["stages"]

    def outs(stage):
        return {next(iter(o)) if isinstance(o, dict) else o
                for key in ("outs", "metrics") for o in stages[stage].get(key, [])}

    assert outs("fetch") == {str(paths.RAW_DIR)}
    assert paths.RAW.parent == paths.RAW_DIR
    assert outs("data") == ({str(paths.split_path(s)) for s in (*paths.SPLITS, *paths.FEEDBACK_SPLITS)}
                            | {str(paths.METRICS_DATA), str(paths.LABELS_JSON), str(paths.UNLABELLED_PREPARED),
                               str(paths.HEADLINE_DATA)})
    assert outs("train") == {str(paths.TEACHER), str(paths.METRICS_TRAIN), str(paths.HEADLINE_TRAIN)}
    assert outs("compress") == {str(paths.CANDIDATES), str(paths.STUDENTS), str(paths.METRICS_COMPRESS)}
    assert outs("validate") == {str(paths.METRICS_VALIDATE), str(paths.GATES_JSON), str(paths.GATES_MD),
                                str(paths.HEADLINE_VALIDATE)}
    assert outs("deploy") == {str(paths.DEPLOYMENT)}
    assert outs("small_direct") == {str(paths.SMALL_DIRECT), str(paths.METRICS_SMALL_DIRECT),
                                    str(paths.HEADLINE_SMALL_DIRECT)}
    assert outs("frontier") == {str(paths.FRONTIER_MD), str(paths.FRONTIER_PNG), str(paths.METRICS_FRONTIER),
                                str(paths.HEADLINE_FRONTIER)}
    # `dvc metrics show` shows the headline files only (tests/test_headline.py)
    assert {next(iter(o)) for s in stages.values() for o in s.get("metrics", [])} == {
        str(p) for p in (paths.HEADLINE_DATA, paths.HEADLINE_TRAIN, paths.HEADLINE_VALIDATE,
                         paths.HEADLINE_SMALL_DIRECT, paths.HEADLINE_FRONTIER)}


def test_tasks_and_flows_import_no_stage():
    """Imports run downwards: a stage may call a flow (compress fans out on
    Prefect), but no task or flow imports a stage module."""
    for pkg in ("tasks", "flows"):
        for path in sorted((PROJECT_ROOT / pkg).glob("*.py")):
            module = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            found = sorted(str(f) for f in import_closure(PROJECT_ROOT, module) if f.parts[0] == "stages")
            assert found == [], f"{module} imports {found}"
