"""params.yaml is read exactly as DVC reads it (issue 14, item 7).

DVC's own YAML loader (``dvc.utils.serialize.parse_yaml``) is the oracle:
same values for the scalars YAML 1.1 and 1.2 read differently, and a
duplicated key refused, here with the key path, both values and their lines,
at every entry point, before anything runs or is written. Cron expressions
in params with no next run are refused the same way.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc.utils.serialize import YAMLFileCorruptedError, parse_yaml

from shrinkflow.config import ParamsError, load_params, parse_params, parse_params_bytes, parse_params_yaml
from tests.conftest import PROJECT_ROOT

PARAMS_TEXT = (PROJECT_ROOT / "params.yaml").read_text()


def cli(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)  # so that an entry point that got far enough would create root/.prefect
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def project_with(tmp_path: Path, params_text: str) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(params_text)
    return root


def with_duplicated_min_accuracy() -> tuple[str, int, int]:
    """params.yaml with ``min_accuracy: 0.99`` six lines after
    ``min_accuracy: 0.82`` under validate.gates (1-based lines of both)."""
    lines = PARAMS_TEXT.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("min_accuracy: 0.82"))
    assert lines[first].startswith("    min_accuracy: 0.82")
    lines.insert(first + 6, "    min_accuracy: 0.99\n")
    return "".join(lines), first + 1, first + 7


# ----------------------------------------------------------------- equality
def test_the_current_params_yaml_reads_as_the_same_params_as_with_pyyaml():
    # No value of the shipped file changes with the switch to DVC's loader.
    assert load_params(PROJECT_ROOT / "params.yaml") == parse_params(yaml.safe_load(PARAMS_TEXT))
    assert parse_params_yaml(PARAMS_TEXT) == parse_yaml(PARAMS_TEXT, "params.yaml")


# Scalars YAML 1.1 (PyYAML) and 1.2 (ruamel.yaml, DVC) read differently, and
# the value DVC gets for each.
YAML_1_2 = [
    ("5e-5", 5e-5),            # PyYAML: the string "5e-5"
    ("1e3", 1000.0),           # PyYAML: "1e3"
    ("yes", "yes"),            # PyYAML: True
    ("on", "on"),              # PyYAML: True
    ("NO", "NO"),              # PyYAML: False
    ("0777", 777),             # PyYAML: 511 (octal)
    ("0o17", 15),              # PyYAML: "0o17"
    ("12:30", "12:30"),        # PyYAML: 750 (sexagesimal)
    ("1_000", 1000),
    ("0x1F", 31),
    (".5", 0.5),
    ("~", None),
    ("2024-01-01", datetime.date(2024, 1, 1)),
    ("'0777'", "0777"),
]


@pytest.mark.parametrize("scalar, value", YAML_1_2)
def test_scalars_get_the_value_dvc_gets(scalar, value):
    doc = f"train:\n  x: {scalar}\n"
    dvc_value = parse_yaml(doc, "params.yaml")["train"]["x"]
    ours = parse_params_yaml(doc.encode())["train"]["x"]
    assert dvc_value == value and type(dvc_value) is type(value)
    assert ours == value and type(ours) is type(value)


def test_a_yaml_1_2_float_reaches_a_param_as_dvc_reads_it():
    # 5e-5 without a dot: a float for DVC and for shrinkflow (PyYAML made it a
    # string that pydantic happened to coerce); 0777 is 777, not 511.
    text = PARAMS_TEXT.replace("  learning_rate: 5.0e-5", "  learning_rate: 5e-5", 1)
    text = text.replace("  seed: 0", "  seed: 0777", 1)
    p = parse_params_bytes(text.encode())
    assert p.train.learning_rate == 5e-5 and p.data.seed == 777
    assert parse_yaml(text, "params.yaml")["data"]["seed"] == 777


def test_the_special_floats_match_dvc():
    doc = "a: .inf\nb: -.Inf\nc: .nan\n"
    ours, dvc = parse_params_yaml(doc), parse_yaml(doc, "params.yaml")
    assert ours["a"] == dvc["a"] == math.inf and ours["b"] == dvc["b"] == -math.inf
    assert math.isnan(ours["c"]) and math.isnan(dvc["c"])


# ------------------------------------------------------------ duplicate keys
def test_a_duplicated_key_is_refused_with_its_path_both_values_and_lines():
    text, line_a, line_b = with_duplicated_min_accuracy()
    with pytest.raises(YAMLFileCorruptedError):  # DVC refuses the file
        parse_yaml(text, "params.yaml")
    with pytest.raises(ParamsError) as info:
        parse_params_bytes(text.encode(), "params.yaml")
    problems = dict(info.value.problems)
    assert list(problems) == ["validate.gates.min_accuracy"]
    assert problems["validate.gates.min_accuracy"].startswith(
        f"duplicated key: 0.82 (line {line_a}) and 0.99 (line {line_b})")


def test_duplicates_are_found_in_lists_and_at_the_top_and_each_is_named():
    text = PARAMS_TEXT.replace("    - name: int8\n", "    - name: int8\n      name: int9\n", 1) + "serve:\n  port: 9\n"
    assert "      name: int9\n" in text
    with pytest.raises(YAMLFileCorruptedError):
        parse_yaml(text, "params.yaml")
    with pytest.raises(ParamsError) as info:
        parse_params_yaml(text)
    problems = dict(info.value.problems)
    assert set(problems) == {"compress.candidates.0.name", "serve"}
    assert problems["compress.candidates.0.name"].startswith("duplicated key: int8 (line ")
    assert "and int9 (line" in problems["compress.candidates.0.name"]
    assert "a mapping (line" in problems["serve"]


def test_keys_equal_as_values_are_duplicates_and_merge_keys_are_not():
    with pytest.raises(YAMLFileCorruptedError):
        parse_yaml("a:\n  1: x\n  0x1: y\n", "p.yaml")
    with pytest.raises(ParamsError) as info:
        parse_params_yaml("a:\n  1: x\n  0x1: y\n")
    assert dict(info.value.problems) == {"a.1": "duplicated key: x (line 2) and y (line 3); DVC refuses a params "
                                                "file with a duplicated key, so shrinkflow does too: keep one"}
    merged = "base: &b\n  x: 1\nother:\n  <<: *b\n  x: 2\n"
    assert parse_params_yaml(merged) == parse_yaml(merged, "p.yaml") == {"base": {"x": 1}, "other": {"x": 2}}


def test_broken_yaml_and_bad_encoding_name_the_file():
    with pytest.raises(ParamsError) as info:
        parse_params_bytes(b"train: [1, 2\n", "p.yaml")
    assert list(dict(info.value.problems)) == ["<file>"] and "line 2" in str(info.value)
    with pytest.raises(ParamsError) as info:
        parse_params_bytes(b"train:\n  x: \xff\n", "p.yaml")
    assert "not valid UTF-8" in str(info.value)


@pytest.mark.parametrize("command", [["status"], ["run"], ["schedule"], ["versions"], ["monitor"],
                                     ["simulate-traffic", "--domain", "in", "--n", "3"]])
def test_every_command_refuses_a_duplicated_key_fast_and_writes_nothing(tmp_path, command):
    text, line_a, line_b = with_duplicated_min_accuracy()
    root = project_with(tmp_path, text)
    t0 = time.perf_counter()
    proc = cli(root, *command)
    took = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"validate.gates.min_accuracy: duplicated key: 0.82 (line {line_a}) and 0.99 (line {line_b})"
            in proc.stderr)
    assert took < 15, took  # refused before Prefect or DVC start (`run` used to fail after 23 s)
    assert sorted(p.name for p in root.iterdir()) == ["dvc.yaml", "params.yaml"]  # no .prefect/, no .shrinkflow/
    assert (root / "params.yaml").read_text() == text


def test_a_stage_refuses_a_duplicated_key_before_its_body_runs(tmp_path):
    from stages.common import run_stage

    text, _, _ = with_duplicated_min_accuracy()
    root = project_with(tmp_path, text)
    ran = []
    assert run_stage("validate", lambda p, r: ran.append(p), root) == 2
    assert ran == []


# ------------------------------------------------------- crons in params.yaml
@pytest.mark.parametrize("key, edit", [
    ("monitor.lifecycle_cron", ('lifecycle_cron: "0 3 * * 0"', 'lifecycle_cron: "0 0 31 2 *"')),
    ("monitor.cron", ("  interval_minutes: 60", "  interval_minutes: null\n  cron: \"0 0 30 2 *\"")),
])
def test_a_params_cron_with_no_next_run_is_a_params_error(tmp_path, key, edit):
    text = PARAMS_TEXT.replace(*edit, 1)
    if key == "monitor.cron":
        text = text.replace("  cron: null\n", "", 1)
    assert text != PARAMS_TEXT
    with pytest.raises(ParamsError) as info:
        parse_params_bytes(text.encode())
    why = dict(info.value.problems)[key]
    expr = "0 0 31 2 *" if key == "monitor.lifecycle_cron" else "0 0 30 2 *"
    assert f"{expr!r} has no next run" in why
    root = project_with(tmp_path, text)
    for command in (["status"], ["schedule"], ["run"]):
        proc = cli(root, *command)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"{key}: " in proc.stderr and repr(expr) in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["dvc.yaml", "params.yaml"]


# --------------------------------------------- property: DVC is the oracle
# Key tokens and the key each is in YAML 1.2: "1" and "0x1" are the same key
# (int 1), "'1'" is the string "1", "yes"/"on" are strings, not true.
KEYS = {"a": "a", "b": "b", "1": 1, "0x1": 1, "'1'": "1", "yes": "yes", "on": "on"}
SCALARS = ["5e-5", "yes", "0777", "x", "~", "12:30", "0o17"]


def _mappings(depth: int):
    from hypothesis import strategies as st

    value = st.sampled_from(SCALARS) if depth == 0 else st.one_of(st.sampled_from(SCALARS), _mappings(depth - 1))
    return st.lists(st.tuples(st.sampled_from(sorted(KEYS)), value), min_size=1, max_size=4)


def _render(pairs, indent: int = 0) -> str:
    out = ""
    for key, value in pairs:
        if isinstance(value, list):
            out += " " * indent + f"{key}:\n" + _render(value, indent + 2)
        else:
            out += " " * indent + f"{key}: {value}\n"
    return out


def _duplicated_paths(pairs, prefix: str = "") -> set[str]:
    seen, out = set(), set()
    for key, value in pairs:
        k = KEYS[key]
        path = f"{prefix}.{k}" if prefix else str(k)
        if k in seen:
            out.add(path)
        seen.add(k)
        if isinstance(value, list):
            out |= _duplicated_paths(value, path)
    return out


def test_generated_documents_read_as_dvc_reads_them_and_duplicates_are_named():
    from hypothesis import given, settings

    @settings(max_examples=300, deadline=None)
    @given(_mappings(2))
    def check(pairs):
        text = _render(pairs)
        try:
            expected = parse_yaml(text, "params.yaml")
        except YAMLFileCorruptedError:
            expected = None
        dupes = _duplicated_paths(pairs)
        if expected is None:
            assert dupes, text  # DVC refused it: it has a duplicated key
            with pytest.raises(ParamsError) as info:
                parse_params_yaml(text)
            # every duplicated key is named, not only the first one DVC stops at
            assert set(dict(info.value.problems)) == dupes, text
        else:
            assert not dupes, text
            assert parse_params_yaml(text) == expected

    check()


# ------------------------------------------------------ values never coerced
def params_with(old: str, new: str) -> bytes:
    assert PARAMS_TEXT.count(old) == 1, old
    return PARAMS_TEXT.replace(old, new).encode()


@pytest.mark.parametrize("old, new, key, says", [
    # DVC reads true; pydantic's lax mode made it 1.0, a gate nothing passes
    ("min_accuracy: 0.82", "min_accuracy: true", "validate.gates.min_accuracy", "valid number"),
    # YAML 1.2 (DVC) reads yes/on as strings; lax mode made them True
    ("batching: true ", "batching: yes ", "serve.batching", "valid boolean"),
    ("batching: true ", "batching: on ", "serve.batching", "valid boolean"),
    ("min_accuracy: 0.82", "min_accuracy: '0.82'", "validate.gates.min_accuracy", "valid number"),
    ("epochs: 2\n  learning_rate", "epochs: 2.5\n  learning_rate", "train.epochs", "valid integer"),
    ("host: 127.0.0.1", "host: !!binary aGVsbG8=", "serve.host", "a YAML bytes"),
    ("cron: null", "cron: 2024-01-01", "monitor.cron", "a YAML date"),
])
def test_a_value_of_the_wrong_type_is_refused_not_coerced(old, new, key, says):
    with pytest.raises(ParamsError) as err:
        parse_params_bytes(params_with(old, new))
    assert [k for k, _ in err.value.problems] == [key] and says in str(err.value), str(err.value)


def test_integers_still_read_as_floats_and_lists_as_tuples():
    p = parse_params_bytes(params_with("cooldown_hours: 24.0", "cooldown_hours: 24"))
    assert p.monitor.cooldown_hours == 24.0 and p.compress.candidates[1].recipe[0].layers == (0, 1, 3, 5)


@pytest.mark.slow  # ~5 s: in the full suite, not the quick run (kept under 3 minutes)
def test_a_params_file_nested_too_deeply_is_a_params_error_not_a_crash(tmp_path):
    deep = PARAMS_TEXT + "zz: " + "[" * 2000 + "]" * 2000 + "\n"
    with pytest.raises(ParamsError) as err:
        parse_params_bytes(deep.encode())
    assert "nested too deeply" in str(err.value)
    root = project_with(tmp_path, deep)
    out = cli(root, "status")
    assert out.returncode == 2 and "nested too deeply" in out.stderr and "Traceback" not in out.stderr, out.stderr
