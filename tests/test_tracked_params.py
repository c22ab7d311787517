"""Params dvc.yaml tracks and params files that leave some out
(shrinkflow.tracked_params; the CLI's side is in tests/test_cli.py).

A params file may leave out a key with a default, but DVC refuses a stage
whose tracked key is missing from params.yaml: the shipped params/reuters.yaml
did (data.feedback_heldout_fraction, added after it), and
``shrinkflow run --params params/reuters.yaml`` failed at the data stage.
DVC's own check (``ParamsDependency.get_hash``) is the judge here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shrinkflow.config import ParamsError, load_params, parse_params, parse_params_yaml
from shrinkflow.tracked_params import (FILLED_COMMENT, check_tracked, fill_missing, load_project_params,
                                       missing_tracked, tracked_params)
from tests.conftest import PROJECT_ROOT

DVC_YAML = PROJECT_ROOT / "dvc.yaml"
SHIPPED = [PROJECT_ROOT / "params.yaml", *sorted((PROJECT_ROOT / "params").glob("*.yaml"))]


DVC_VERDICT = """
import sys
from dvc.dependency.param import MissingParamsError, ParamsDependency
from dvc.repo import Repo
with Repo.init(sys.argv[1], no_scm=True, force=True) as repo:
    for stage in repo.index.stages:
        for dep in stage.deps:
            if isinstance(dep, ParamsDependency):
                try:
                    dep.get_hash()
                except MissingParamsError as exc:
                    print(f"{stage.name}: {exc}")
"""


def dvc_missing(root: Path) -> list[str]:
    """DVC's own verdict on the project's params.yaml (``ParamsDependency``,
    what ``dvc repro`` checks before a stage runs): a line for each stage
    whose tracked params it refuses. Read in a copy of the project's
    dvc.yaml and params.yaml, in a process of its own, so the project is
    left as it was."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dvc-params-") as copy:
        for name in ("dvc.yaml", "params.yaml"):
            shutil.copyfile(root / name, Path(copy) / name)
        out = subprocess.run([sys.executable, "-c", DVC_VERDICT, copy], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if "are missing from" in line]


def without(text: str, *keys: str) -> str:
    """``text`` with the line of each ``key:`` (a leaf key, any indent) dropped."""
    lines = text.splitlines(keepends=True)
    out = [line for line in lines if not any(line.lstrip().startswith(f"{k}:") for k in keys)]
    assert len(out) == len(lines) - len(keys), keys
    return "".join(out)


def test_tracked_params_reads_this_dvc_yaml():
    tracked = tracked_params(DVC_YAML)
    assert tracked["data.feedback_heldout_fraction"] == ("data",)
    assert "fetch" in tracked["data.source"] and "data" in tracked["data.source"]
    assert all("." in k or k.isidentifier() for k in tracked)


def test_tracked_params_takes_params_yaml_mappings_and_skips_other_files(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  a:\n    cmd: x\n    params:\n      - data.seed\n      - params.yaml: [train.seed]\n"
        "      - other.yaml: [x.y]\n      - other2.yaml:\n"
        "  b:\n    cmd: y\n    params:\n      - data.seed\n"
        "  c:\n    cmd: z\n")
    assert tracked_params(tmp_path / "dvc.yaml") == {"data.seed": ("a", "b"), "train.seed": ("a",)}
    (tmp_path / "dvc.yaml").write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="no 'stages'"):
        tracked_params(tmp_path / "dvc.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_params_file_names_every_tracked_key(path):
    """A shipped file that leaves a tracked key out is a run DVC refuses
    (params/reuters.yaml lacked data.feedback_heldout_fraction)."""
    assert missing_tracked(parse_params_yaml(path.read_bytes(), path), tracked_params(DVC_YAML)) == {}


def test_fill_missing_adds_lines_and_changes_nothing_else(tmp_path):
    original = (PROJECT_ROOT / "params.yaml").read_text()
    short = without(original, "feedback_heldout_fraction", "min_rows_per_class", "country_iso_code")
    tracked = tracked_params(DVC_YAML)
    assert set(missing_tracked(parse_params_yaml(short), tracked)) == {
        "data.feedback_heldout_fraction", "data.min_rows_per_class", "cost.country_iso_code"}
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_bytes(DVC_YAML.read_bytes())
    (root / "params.yaml").write_text(short)
    assert any("feedback_heldout_fraction" in e for e in dvc_missing(root))  # DVC refuses it as written

    filled, values = fill_missing(short, "short.yaml", tracked)
    defaults = load_params(PROJECT_ROOT / "params.yaml").data
    assert values["data.feedback_heldout_fraction"] == defaults.feedback_heldout_fraction
    assert values["data.min_rows_per_class"] == defaults.min_rows_per_class
    assert values["cost.country_iso_code"] == load_params(PROJECT_ROOT / "params.yaml").cost.country_iso_code
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(short))
    # every line of the file is still there, in order; only whole lines were added
    added = filled.splitlines()
    it = iter(added)
    assert all(line in it for line in short.splitlines())
    assert len(added) - len(short.splitlines()) == 2 * len(values)
    assert filled.count(FILLED_COMMENT) == len(values)
    (root / "params.yaml").write_text(filled)
    assert dvc_missing(root) == []
    assert fill_missing(filled, "filled.yaml", tracked) == (filled, {})


def test_fill_missing_into_a_flow_mapping_rewrites_the_file_with_the_same_params():
    original = (PROJECT_ROOT / "params.yaml").read_text()
    start, end = original.index("\ndata:\n") + 1, original.index("\ntrain:")
    flow = original[:start] + ("data: {source: {kind: files, path: data/user/a.csv, "
                                      "text_column: text, label_column: label}}\n") + original[end:]
    tracked = tracked_params(DVC_YAML)
    filled, values = fill_missing(flow, "flow.yaml", tracked)
    assert "data.seed" in values and "data.feedback_heldout_fraction" in values
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(flow))
    assert missing_tracked(parse_params_yaml(filled), tracked) == {}


def test_fill_missing_refuses_a_key_shrinkflow_does_not_have_and_bad_params():
    text = (PROJECT_ROOT / "params.yaml").read_text()
    with pytest.raises(ValueError, match="data.no_such_key"):
        fill_missing(text, "p.yaml", {"data.no_such_key": ("data",)})
    with pytest.raises(ParamsError, match="val_fraction"):
        fill_missing(text.replace("val_fraction: 0.", "val_fraction: 7", 1), "p.yaml", tracked_params(DVC_YAML))


def test_check_tracked_names_the_key_its_stage_and_the_line_to_add(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(without((PROJECT_ROOT / "params.yaml").read_text(),
                                              "feedback_heldout_fraction"))
    params = load_params(root / "params.yaml")
    check_tracked(root, (root / "params.yaml").read_bytes(), params)  # no dvc.yaml: nothing to check
    (root / "dvc.yaml").write_bytes(DVC_YAML.read_bytes())
    with pytest.raises(ParamsError) as info:
        check_tracked(root, (root / "params.yaml").read_bytes(), params)
    text = str(info.value)
    assert "data.feedback_heldout_fraction (tracked by stage data)" in text
    assert f"feedback_heldout_fraction: {params.data.feedback_heldout_fraction}" in text
    assert "under data:" in text
    with pytest.raises(ParamsError, match="feedback_heldout_fraction"):
        load_project_params(root)
    (root / "params.yaml").write_bytes((PROJECT_ROOT / "params.yaml").read_bytes())
    assert load_project_params(root) == load_params(PROJECT_ROOT / "params.yaml")


def test_fill_missing_writes_the_files_own_line_endings():
    text = without((PROJECT_ROOT / "params.yaml").read_text(), "feedback_heldout_fraction").replace("\n", "\r\n")
    filled, values = fill_missing(text, "crlf.yaml", tracked_params(DVC_YAML))
    assert list(values) == ["data.feedback_heldout_fraction"]
    assert filled.count("\n") == filled.count("\r\n") == text.count("\r\n") + 2
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(text))


def test_fill_missing_writes_a_validate_key_by_its_params_yaml_name():
    """validate is ``validate_`` in the pydantic model (a helper's finding:
    every tracked validate.* key read as unknown)."""
    import re

    text = re.sub(r"(?m)^  latency:\n(    .*\n)+", "", (PROJECT_ROOT / "params" / "reuters.yaml").read_text())
    tracked = tracked_params(DVC_YAML)
    assert "validate.latency" in missing_tracked(parse_params_yaml(text), tracked)
    filled, values = fill_missing(text, "v.yaml", tracked)
    assert values["validate.latency"]["threads"] == parse_params(parse_params_yaml(text)).validate_.latency.threads
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(text))


def test_fill_missing_beside_keys_a_merge_brought():
    """Keys from ``<<: {...}`` have no line of their own (a helper's
    finding: a TypeError); the file is rewritten instead, same params."""
    import re

    text = re.sub(r"(?ms)^cost:[^\n]*\n.*?(?=^\S)", "cost:\n  <<: {country_iso_code: USA}\n\n",
                  (PROJECT_ROOT / "params" / "reuters.yaml").read_text())
    filled, values = fill_missing(text, "m.yaml", tracked_params(DVC_YAML))
    assert "cost.price_per_core_hour_usd" in values
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(text))


def test_the_round_trip_keeps_line_endings_the_document_end_and_writes_a_comment_line_above_each_key():
    """A flow-mapping section goes through ruamel's round trip (a helper's
    finding: it wrote end-of-line comments, LF lines into a CRLF file and
    dropped a final ``...``)."""
    original = (PROJECT_ROOT / "params.yaml").read_text()
    start, end = original.index("\ndata:\n") + 1, original.index("\ntrain:")
    text = (original[:start] + "data: {seed: 3}  # flow style\n" + original[end:] + "...\n").replace("\n", "\r\n")
    tracked = tracked_params(DVC_YAML)
    filled, values = fill_missing(text, "flow.yaml", tracked)
    assert "data.feedback_heldout_fraction" in values and "data.seed" not in values
    assert filled.count("\n") == filled.count("\r\n") and filled.endswith("\r\n...\r\n")
    lines = filled.split("\r\n")
    comments = [i for i, line in enumerate(lines) if line.strip() == "# " + FILLED_COMMENT]
    assert len(comments) == len(values) and not any(line.endswith(FILLED_COMMENT) and not line.lstrip().startswith("#")
                                                    for line in lines)
    for key in values:   # the line after each comment line is an added key, at its section's indent
        leaf = key.split(".")[-1]
        assert any(lines[i + 1].strip().startswith(leaf + ":")
                   and len(lines[i + 1]) - len(lines[i + 1].lstrip()) == len(lines[i]) - len(lines[i].lstrip())
                   for i in comments), key
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(text))
    assert missing_tracked(parse_params_yaml(filled), tracked) == {}


def test_a_file_with_only_the_sections_it_changes_is_filled_whole_and_dvc_takes_it(tmp_path):
    """A newcomer's finding: a params file with only data, train, compress
    and validate was refused ("deploy: required section or key is
    missing", and cost and frontier), though every key there has a default
    and the docs say such a file runs as is. Every section has its
    defaults now; --params writes the tracked keys of the sections left out."""
    original = (PROJECT_ROOT / "params.yaml").read_text()
    short = original[:original.index("\ndeploy:\n") + 1]   # data, train, compress, validate only
    assert {"deploy", "cost", "frontier"}.isdisjoint(parse_params_yaml(short))
    from shrinkflow.config import CostParams, DeployParams, FrontierParams

    params = parse_params(parse_params_yaml(short))   # no "required section" error: the defaults
    assert (params.deploy, params.cost, params.frontier) == (DeployParams(), CostParams(), FrontierParams())
    assert params.data == load_params(PROJECT_ROOT / "params.yaml").data
    tracked = tracked_params(DVC_YAML)
    filled, values = fill_missing(short, "short.yaml", tracked)
    assert {k.split(".")[0] for k in values} >= {"deploy", "cost", "frontier"}
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(short))
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_bytes(DVC_YAML.read_bytes())
    (root / "params.yaml").write_text(short)
    assert dvc_missing(root)                          # DVC refuses it as written
    (root / "params.yaml").write_text(filled)
    assert dvc_missing(root) == []


@pytest.mark.parametrize("ending", [
    "...\n",
    "...\n# after the document's end\n",          # a helper's finding: both were lost
    "...\n\n# two comments\n# after a blank line",  # no final newline
    "... # on the marker's line\n",
    "...  # two spaces, then a comment\n# and a line after\n",   # a helper's finding: both lost
    "# a last comment, no document end\n",
])
def test_the_round_trip_keeps_what_follows_the_document_end_once(ending):
    original = (PROJECT_ROOT / "params.yaml").read_text()
    start, end = original.index("\ndata:\n") + 1, original.index("\ntrain:")
    text = original[:start] + "data: {seed: 3}\n" + original[end:] + ending
    filled, values = fill_missing(text, "end.yaml", tracked_params(DVC_YAML))
    assert "data.feedback_heldout_fraction" in values   # the round trip was taken
    comments = [line for line in ending.splitlines() if "#" in line]
    for line in comments:
        assert filled.count(line.split("#", 1)[1]) == 1, filled[-300:]
    if ending.startswith("..."):
        assert filled.endswith(ending if ending.endswith("\n") else ending + "\n")
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(text))


@pytest.mark.parametrize("start", [
    "---\n",                                             # a helper's finding: dropped
    "%YAML 1.2\n---\n",                                  # the directive and the marker dropped
    "# a header comment\n%YAML 1.2\n---\n",             # the comment too
    "--- # on the marker's line\n",                    # garbled into an indented comment
    "\n# a comment, then a blank line\n\n---\n",
    "",                                                  # none: nothing is added
])
def test_the_round_trip_keeps_what_precedes_the_document_start_once(start):
    original = (PROJECT_ROOT / "params.yaml").read_text()
    begin, end = original.index("\ndata:\n") + 1, original.index("\ntrain:")
    text = start + original[:begin] + "data: {seed: 3}\n" + original[end:]
    filled, values = fill_missing(text, "start.yaml", tracked_params(DVC_YAML))
    assert "data.feedback_heldout_fraction" in values   # the round trip was taken
    assert filled.startswith(start + original[:original.index("\n") + 1]), filled[:300]
    for line in start.splitlines():
        if "#" in line:
            assert filled.count(line.split("#", 1)[1]) == 1, filled[:300]
    assert filled.count("---") == start.count("---")
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(text))


@pytest.mark.parametrize("make", [
    lambda body: "\ufeff---\n" + body,                                          # a byte-order mark: kept with it
    lambda body: "%TAG !e! tag:yaml.org,2002:\n---\n" + body.replace("seed: 3", "seed: !e!int 3"),  # tag used
    lambda body: "--- !!map # a tag on the marker\n" + body,
    lambda body: "--- {data: {seed: 3}}\n",                                      # the document on the marker's line
    lambda body: "--- {data: {seed: 3},\n  train: {}}\n",
])
def test_a_document_start_the_round_trip_cannot_keep_apart_still_fills_the_same_params(make):
    """A helper's findings on the first version: a %TAG directive cut off
    from the tags it defines (ParserError), and a document written on the
    ``---`` line taken for the start (ValueError, a second mapping after
    it): the old code filled both. They are filled again; a BOM before the
    marker no longer hides it."""
    original = (PROJECT_ROOT / "params.yaml").read_text()
    begin, end = original.index("\ndata:\n") + 1, original.index("\ntrain:")
    text = make(original[:begin] + "data: {seed: 3}\n" + original[end:])
    filled, values = fill_missing(text, "start.yaml", tracked_params(DVC_YAML))
    assert values
    assert parse_params(parse_params_yaml(filled)) == parse_params(parse_params_yaml(text))
    if text.startswith("\ufeff---\n"):
        assert filled.startswith("\ufeff---\n# ")
