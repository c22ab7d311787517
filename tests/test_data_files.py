"""The user's own data (data.source.kind: files): formats, encodings, labels,
cleaning counts, splits, the fetch and data stages, bad data, and DVC
re-running exactly when a new export arrives.

Real files on disk, the real stage functions, the real DVC; nothing mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from shrinkflow.config import DataParams, FilesSource, ParamsError, parse_params
from shrinkflow.data import (DataContractError, DataError, check_contract, clean, normalize, normalized,
                             prepare_files, read_table, stratified_split)
from tests.conftest import PROJECT_ROOT, three_class_rows

LABELLED = {"text_column": "text", "label_column": "label"}


def write_rows(path: Path, rows, fmt: str, header=("text", "label")) -> Path:
    """``rows`` as a file of format ``fmt`` (csv, tsv, parquet, jsonl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(list(rows), columns=list(header))
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


# ------------------------------------------------------------------ params
def params_doc(source: dict, **data) -> dict:
    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    doc["data"]["source"] = source
    doc["data"].update(data)
    return doc


def test_todays_params_without_kind_are_the_builtin_archive():
    source = parse_params(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())).data.source
    assert source.kind == "pypi_sdist" and source.package == "vadersentiment"
    files = parse_params(params_doc({"kind": "files", "path": "data/user/t.csv"})).data.source
    assert isinstance(files, FilesSource) and files.encoding == "utf-8" and files.files() == {"train": "data/user/t.csv"}


@pytest.mark.parametrize("source, key, message", [
    ({"kind": "files", "path": "/home/me/tickets.csv"}, "data.source.path", "must name a file under data/user/"),
    ({"kind": "files", "path": "data/user/../tickets.csv"}, "data.source.path", "put the file there"),
    ({"kind": "files", "path": "tickets.csv"}, "data.source.path", "under data/user/"),
    ({"kind": "files", "path": "data/user/t.csv", "test_path": "../t.csv"}, "data.source.test_path", "data/user/"),
    ({"kind": "files", "path": "data/user/t.txt"}, "data.source", "set data.source.format"),
    ({"kind": "files", "path": "data/user/t.csv", "encoding": "utf-9"}, "data.source.encoding", "unknown encoding"),
    ({"kind": "files", "path": "data/user/t.csv", "test_path": "data/user/./t.csv"}, "data.source", "named twice"),
    ({"kind": "files"}, "data.source.path", "missing"),
    ({"kind": "files", "path": "data/user/t.csv", "label_column": "text"}, "data.source", "both 'text'"),
])
def test_bad_files_source_names_the_key(source, key, message):
    with pytest.raises(ParamsError) as info:
        parse_params(params_doc(source))
    assert any(k == key and message in why for k, why in info.value.problems), info.value.problems


# ------------------------------------------------------------------ reading
@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    rows = [("Refund, please", "billing"), ('He said "down" again', "outage"), ("tab\there", "3"), ("  padded  ", " x ")]
    path = write_rows(tmp_path / f"t.{fmt}", rows, fmt)
    df = read_table(path, fmt, LABELLED)
    assert df.to_dict("list") == {"text": ["Refund, please", 'He said "down" again', "tab\there", "padded"],
                                  "label": ["billing", "outage", "3", "x"]}


def test_csv_with_bom_crlf_and_quoted_newlines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b'\xef\xbb\xbftext,label\r\n"first line\r\nsecond line",a\r\nplain,b\r\n"x, y",c\r\n')
    df = read_table(path, "csv", LABELLED)
    assert df.to_dict("list") == {"text": ["first line\r\nsecond line", "plain", "x, y"], "label": ["a", "b", "c"]}


def test_jsonl_with_bom_integer_labels_and_a_missing_key(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "caf\\u00e9 open", "label": 2}\n{"text": "no label"}\n'
                     b'{"text": "ten", "label": 10, "extra": true}\n')
    assert read_table(path, "jsonl", LABELLED).to_dict("list") == {
        "text": ["café open", "no label", "ten"], "label": ["2", "", "10"]}


def test_parquet_integer_labels_with_a_gap_read_as_integers(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"body": ["a", "b", "c"], "y": [1.0, None, 12.0]}).to_parquet(path)
    df = read_table(path, "parquet", {"text_column": "body", "label_column": "y"})
    assert df["label"].tolist() == ["1", "", "12"]


def test_latin1_needs_its_encoding_and_utf8_names_the_bad_byte(tmp_path):
    path = tmp_path / "t.csv"
    body = "text,label\nfine,a\nalso fine,b\ncafé au lait,a\n".encode("latin-1")
    path.write_bytes(body)
    assert read_table(path, "csv", LABELLED, encoding="latin-1")["text"].tolist() == [
        "fine", "also fine", "café au lait"]
    with pytest.raises(DataError) as info:
        read_table(path, "csv", LABELLED, shown="data/user/t.csv")
    offset = body.index(b"\xe9")
    assert str(info.value).startswith(f"data/user/t.csv: bytes not valid utf-8 at byte offset {offset} (line 4")
    assert "data.source.encoding" in str(info.value)
    # with a byte-order mark in front, the offset still counts from the file's first byte
    path.write_bytes(b"\xef\xbb\xbf" + body)
    with pytest.raises(DataError, match=f"at byte offset {offset + 3} \\(line 4: e9 20 61 75\\)"):
        read_table(path, "csv", LABELLED)


def test_a_utf16_file_read_as_utf8_is_told_to_set_utf16(tmp_path):
    """A newcomer's finding: a UTF-16 export (FF FE first) was advised
    "e.g. latin-1, cp1252", which then read garbage columns."""
    path = tmp_path / "t.csv"
    path.write_bytes("text,label\nthe parcel was late,shipping\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16 byte-order mark: set data.source.encoding to utf-16"):
        read_table(path, "csv", LABELLED, shown="data/user/t.csv")
    assert read_table(path, "csv", LABELLED, encoding="utf-16").to_dict("records") == [
        {"text": "the parcel was late", "label": "shipping"}]


def test_unknown_column_lists_the_columns_found(tmp_path):
    path = write_rows(tmp_path / "t.tsv", [("a", "b")], "tsv", header=("body", "queue"))
    with pytest.raises(DataError) as info:
        read_table(path, "tsv", LABELLED, shown="data/user/t.tsv")
    assert str(info.value) == ("data/user/t.tsv: no column 'text' (data.source.text_column); the file has columns "
                               "['body', 'queue']: set data.source.text_column to one of them")


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_two_columns_of_the_chosen_name_are_refused_as_ambiguous(tmp_path, fmt):
    """A newcomer's finding: a header `body,queue,queue` was read silently,
    the first `queue` taken (pandas renames the second queue.1). A column
    of another name may repeat."""
    sep = "," if fmt == "csv" else "\t"
    path = tmp_path / f"t.{fmt}"
    path.write_text(sep.join(["text", "label", "label", "note", "note"]) + "\n"
                    + sep.join(["a", "x", "y", "1", "2"]) + "\n")
    with pytest.raises(DataError) as info:
        read_table(path, fmt, LABELLED, shown=f"data/user/t.{fmt}")
    assert str(info.value) == (f"data/user/t.{fmt}: 2 columns are named 'label' (data.source.label_column): which "
                               "one holds the data is ambiguous; rename or drop the others")
    path.write_text(sep.join(["text", "label", "note", "note"]) + "\n" + sep.join(["a", "x", "1", "2"]) + "\n")
    assert read_table(path, fmt, LABELLED).to_dict("records") == [{"text": "a", "label": "x"}]


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n{"text": "c", "label": "y"}\n')
    with pytest.raises(DataError, match=r"t.jsonl: line 2 is not a JSON object") as info:
        read_table(path, "jsonl", LABELLED)
    # the position within that line, not json's "line 2 column 1" of the line itself (a newcomer's finding)
    assert "(Expecting value at the end of the line)" in str(info.value) and "column" not in str(info.value)
    path.write_text('{"text": "a", "label": "x"}\n{"text" "b"}\n')
    with pytest.raises(DataError, match=r"line 2 is not a JSON object \(Expecting ':' delimiter at character 9\)"):
        read_table(path, "jsonl", LABELLED)


def test_csv_with_a_ragged_row_is_a_data_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\na,x\nb,y,extra\n")
    with pytest.raises(DataError, match=r"t.csv: cannot be read as CSV: .*line 3"):
        read_table(path, "csv", LABELLED)


# ------------------------------------------------------------------ cleaning, labels, split
def test_clean_counts_each_rule():
    df = pd.DataFrame({"text": ["a good one", "a good one", "A  GOOD one", "", "no label", "conflict", "CONFLICT",
                                "fine"],
                       "label": ["x", "x", "x", "x", "", "x", "y", "y"]})
    out, counts = clean(df)
    assert out.to_dict("list") == {"text": ["a good one", "fine"], "label": ["x", "y"]}
    assert counts == {"empty": 2, "conflicting": 2, "exact_duplicates": 1, "near_duplicates": 1}


def test_vectorised_normalize_matches_the_scalar_one():
    texts = pd.Series(["  Hello\tWORLD \n", "a\u00a0b", "İstanbul  x", "ǅ", ""])
    assert normalized(texts).tolist() == [normalize(t) for t in texts]


def test_tiny_classes_reach_val_and_test_and_keep_a_training_row():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(45)], "label": [0] * 40 + [1] * 3 + [2] * 2})
    params = DataParams(seed=3)
    splits = stratified_split(df, params)
    per = {name: part["label"].value_counts().to_dict() for name, part in splits.items()}
    assert per["test"] == {0: 4, 1: 1, 2: 1}
    assert per["val"] == {0: 6, 1: 1}
    assert per["reference"] == {0: 2}
    assert per["train"] == {0: 28, 1: 1, 2: 1}
    again = stratified_split(df, params)
    for name in splits:
        pd.testing.assert_frame_equal(splits[name], again[name])
    check_contract(splits, ("a", "b", "c"))


def test_contract_accepts_n_classes_and_names_an_unknown_id():
    ok = {"train": pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]})}
    check_contract(ok, ("x", "y", "z"))
    with pytest.raises(DataContractError, match=r"unknown label\(s\) \[3\]; expected class ids 0 \(x\), 1 \(y\), 2 \(z\)"):
        check_contract({"train": pd.DataFrame({"text": ["a", "b"], "label": [0, 3]})}, ("x", "y", "z"))


def raw_project(tmp_path, rows, fmt="csv", **extra) -> tuple[FilesSource, Path]:
    """The user's rows as the fetch stage leaves them: data/raw/train.<fmt>."""
    raw = tmp_path / "raw"
    write_rows(raw / f"train.{fmt}", rows, fmt)
    return FilesSource(path=f"data/user/tickets.{fmt}", **extra), raw


def test_three_classes_prepare_identically_from_every_format(tmp_path):
    rows = three_class_rows(20)
    results = []
    for fmt in ("csv", "tsv", "parquet", "jsonl"):
        source, raw = raw_project(tmp_path / fmt, rows, fmt)
        results.append(prepare_files(source, raw, DataParams()))
    first = results[0]
    assert first.labels == ("billing", "feature", "outage")
    assert {k: len(v) for k, v in first.splits.items()} == {"train": 42, "val": 9, "test": 6, "reference": 3,
                                                            "shifted": 0}
    for name in ("train", "val", "test", "reference"):
        assert sorted(first.splits[name]["label"].value_counts().tolist()) == [
            {"train": 14, "val": 3, "test": 2, "reference": 1}[name]] * 3
        assert first.splits[name]["label"].dtype == "int64"
    for other in results[1:]:
        assert other.labels == first.labels
        for name in first.splits:
            pd.testing.assert_frame_equal(other.splits[name], first.splits[name])


def test_labels_are_stripped_sorted_and_integers_sort_numerically(tmp_path):
    rows = [(f"text {i}", [" 10", "2 ", "1"][i % 3]) for i in range(60)]
    source, raw = raw_project(tmp_path, rows)
    prepared = prepare_files(source, raw, DataParams())
    assert prepared.labels == ("1", "2", "10")
    every = pd.concat(prepared.splits.values())
    by_text = dict(zip(every["text"], every["label"]))
    assert [by_text[f"text {i}"] for i in range(3)] == [2, 1, 0] and prepared.warnings == ()


def test_labels_differing_only_by_case_are_a_warning(tmp_path):
    rows = [(f"text {i}", ["Billing", "billing", "outage"][i % 3]) for i in range(60)]
    source, raw = raw_project(tmp_path, rows)
    prepared = prepare_files(source, raw, DataParams())
    assert prepared.labels == ("Billing", "billing", "outage")
    assert len(prepared.warnings) == 1 and "'Billing', 'billing' differ only by case" in prepared.warnings[0]


def test_labels_the_same_on_screen_in_two_unicode_forms_are_a_warning(tmp_path):
    """A newcomer's finding: "facturé" composed (NFC) and decomposed (NFD)
    became two classes with no word, where case-only differences warned."""
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "facturé"), unicodedata.normalize("NFD", "facturé")
    assert nfc != nfd
    rows = [(f"text {i}", [nfc, nfd, "outage"][i % 3]) for i in range(60)]
    source, raw = raw_project(tmp_path, rows)
    prepared = prepare_files(source, raw, DataParams())
    assert len(prepared.labels) == 3
    assert len(prepared.warnings) == 1 and "differ only by case or Unicode form" in prepared.warnings[0]
    assert ascii(nfc) in prepared.warnings[0] and ascii(nfd) in prepared.warnings[0]   # told apart


def test_a_class_with_no_row_in_val_or_test_is_a_warning(tmp_path):
    """A newcomer's finding: a 1-row class (min_rows_per_class: 1) was
    deployed with recall None on val and test, and nothing said so."""
    rows = [(f"text {i}", ["billing", "outage"][i % 2]) for i in range(60)] + [("a lonely ticket", "lonely")]
    source, raw = raw_project(tmp_path, rows)
    prepared = prepare_files(source, raw, DataParams(min_rows_per_class=1))
    assert prepared.labels == ("billing", "lonely", "outage")
    said = [w for w in prepared.warnings if "holds no row of class(es) 'lonely'" in w]
    assert {w.split(" ")[0] for w in said} <= {"val", "test"} and len(said) >= 1
    full = prepare_files(source, raw, DataParams(min_rows_per_class=1)).warnings
    assert full == prepared.warnings                                # deterministic
    rows = [(f"text {i}", ["billing", "outage"][i % 2]) for i in range(60)]
    source, raw = raw_project(tmp_path / "b", rows)
    assert prepare_files(source, raw, DataParams()).warnings == ()


def test_fixed_test_set_confirms_and_training_copies_of_it_are_dropped(tmp_path):
    rows = three_class_rows(20)
    test_rows = three_class_rows(24)[60:]                      # 12 rows the training file lacks
    leaked = [(rows[0][0].upper(), rows[0][1]), rows[1], rows[2]]  # 3 training rows also in the test file
    source, raw = raw_project(tmp_path, rows, test_path="data/user/holdout.csv")
    write_rows(raw / "test.csv", test_rows + leaked, "csv")
    prepared = prepare_files(source, raw, DataParams())
    assert prepared.stats["train_rows_in_test"] == 3
    assert prepared.splits["test"]["text"].tolist() == [t for t, _ in test_rows + leaked]
    sizes = {k: len(v) for k, v in prepared.splits.items() if k != "shifted"}
    assert sizes == {"train": 45, "val": 9, "test": 15, "reference": 3}   # 57 random rows: no test fraction
    check_contract({k: v for k, v in prepared.splits.items() if k != "shifted"}, prepared.labels)
    assert not any("another label" in w for w in prepared.warnings)   # the copies agree
    # A newcomer's finding: training rows whose label the test file contradicts
    # were dropped without a word. Still dropped, and now said.
    other = {"billing": "outage", "outage": "billing", "sales": "billing"}
    write_rows(raw / "test.csv", test_rows + [(rows[1][0], other[rows[1][1]]), rows[2]], "csv")
    prepared = prepare_files(source, raw, DataParams())
    assert prepared.stats["train_rows_in_test"] == 2
    said = [w for w in prepared.warnings if "another label" in w]
    assert len(said) == 1 and said[0].startswith("1 training row(s) whose text is in data/user/holdout.csv carry "
                                                 f"another label there (e.g. {rows[1][0]!r}: "), said
    assert "dropped from training with the other 1 text(s)" in said[0]


def test_shifted_and_unlabelled_files(tmp_path):
    rows = three_class_rows(20)
    source, raw = raw_project(tmp_path, rows, shifted_path="data/user/other.jsonl",
                              unlabelled_path="data/user/prod.parquet")
    write_rows(raw / "shifted.jsonl", [("other domain outage", "outage"), ("other billing", "billing")], "jsonl")
    new = ["never seen one", "never seen two", "", "NEVER  seen one"]
    pd.DataFrame({"text": [t for t, _ in rows] + new}).to_parquet(raw / "unlabelled.parquet")
    prepared = prepare_files(source, raw, DataParams())
    assert prepared.splits["shifted"].to_dict("list") == {"text": ["other domain outage", "other billing"],
                                                          "label": [2, 0]}
    held = sum(len(prepared.splits[n]) for n in ("val", "test", "reference"))
    assert prepared.stats["unlabelled_rows_in_eval_splits"] == held == 18
    assert prepared.stats["cleaning"]["unlabelled"] == {"empty": 1, "conflicting": 0, "exact_duplicates": 0,
                                                        "near_duplicates": 1}
    assert sorted(prepared.unlabelled["text"]) == sorted(prepared.splits["train"]["text"].tolist()
                                                         + ["never seen one", "never seen two"])


def test_shifted_labels_the_training_data_lacks_are_refused(tmp_path):
    source, raw = raw_project(tmp_path, three_class_rows(20), shifted_path="data/user/other.csv")
    write_rows(raw / "shifted.csv", [("x", "outage"), ("y", "refunds")], "csv")
    with pytest.raises(DataError) as info:
        prepare_files(source, raw, DataParams())
    assert str(info.value).startswith("data/user/other.csv: label(s) ['refunds'] do not occur in the training data "
                                      "data/user/tickets.csv")


# ------------------------------------------------------------------ the stages, in a project
def make_project(root: Path, source: dict, **data) -> Path:
    """A project folder: params.yaml (with ``source``) and dvc.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params_doc(source, **data), sort_keys=False))
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "data" / "user").mkdir(parents=True, exist_ok=True)
    return root


def run(root: Path, stage: str, monkeypatch) -> int:
    from stages.common import run_stage
    from stages.data import data
    from stages.fetch import fetch

    # From another directory: a stage resolves every path against its root,
    # so nothing may land where it happens to be started.
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)
    code = run_stage(stage, {"fetch": fetch, "data": data}[stage], root)
    assert list(elsewhere.iterdir()) == []
    return code


def written(root: Path) -> list[str]:
    """Files the data stage may write, that exist."""
    return sorted(str(p.relative_to(root)) for d in ("data/prepared", "metrics") for p in (root / d).rglob("*"))


TICKETS = {"kind": "files", "path": "data/user/tickets.csv"}


def test_fetch_and_data_stages_on_the_users_files(tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "p", {**TICKETS, "test_path": "data/user/holdout.csv"})
    rows = three_class_rows(20)
    long_text = " ".join(["word"] * 100)
    test_rows = three_class_rows(22)[60:] + [(f"{long_text} {i}", "billing") for i in range(6)]
    write_rows(root / "data/user/tickets.csv", rows, "csv")
    write_rows(root / "data/user/holdout.csv", test_rows, "csv")
    assert run(root, "fetch", monkeypatch) == 0
    assert sorted(p.name for p in (root / "data/raw").iterdir()) == ["test.csv", "train.csv"]
    assert (root / "data/raw/train.csv").read_bytes() == (root / "data/user/tickets.csv").read_bytes()
    assert run(root, "data", monkeypatch) == 0
    from shrinkflow.labels import read_labels

    assert read_labels(root / "data/prepared/labels.json") == ("billing", "feature", "outage")
    metrics = json.loads((root / "metrics/data.json").read_text())
    assert metrics["rows_test"] == 12 and metrics["truncated_share_test"] == 0.5
    assert metrics["truncated_share_train"] == 0.0 and metrics["max_seq_len"] == 64
    assert metrics["class_counts"]["test"] == {"billing": 8, "feature": 2, "outage": 2}
    assert metrics["cleaning"]["train"] == {"empty": 0, "conflicting": 0, "exact_duplicates": 0,
                                            "near_duplicates": 0}
    assert pd.read_parquet(root / "data/prepared/unlabelled.parquet").columns.tolist() == ["text"]
    assert pd.read_parquet(root / "data/prepared/test.parquet")["label"].tolist()[:6] == [0, 2, 1, 0, 2, 1]
    out = capsys.readouterr().out
    assert "data: 3 classes" in out
    # no split is over the truncation sample's size, so the console does not mention it
    assert "truncated_share_sample_rows" not in out and "on a sample of" not in out


def test_the_data_stage_says_which_splits_truncation_was_sampled_on(tmp_path, monkeypatch, capsys):
    import shrinkflow.data

    root = make_project(tmp_path / "p", TICKETS)
    write_rows(root / "data/user/tickets.csv", three_class_rows(20), "csv")
    assert run(root, "fetch", monkeypatch) == 0
    monkeypatch.setattr(shrinkflow.data, "TRUNCATION_SAMPLE_ROWS", 10)
    assert run(root, "data", monkeypatch) == 0
    metrics = json.loads((root / "metrics/data.json").read_text())
    assert metrics["truncated_share_sample_rows"] == 10
    sampled = [s for s in ("train", "val", "test", "reference") if metrics.get(f"rows_{s}", 0) > 10]
    assert sampled and metrics["rows_test"] <= 10 < metrics["rows_train"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data: "))
    assert line.endswith(f"(truncated_share of {', '.join(sampled)} on a sample of 10 texts)"), line


def test_case_warning_is_printed_and_recorded(tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "p", TICKETS)
    write_rows(root / "data/user/tickets.csv", [(f"t {i}", ["Spam", "spam", "ham"][i % 3]) for i in range(60)], "csv")
    assert run(root, "fetch", monkeypatch) == 0 and run(root, "data", monkeypatch) == 0
    assert "warning: data: labels 'Spam', 'spam' differ only by case" in capsys.readouterr().err
    assert json.loads((root / "metrics/data.json").read_text())["label_warnings"][0].startswith("labels 'Spam'")


BAD = {
    "unknown column": ({**TICKETS, "label_column": "queue"}, {},
                       lambda p: write_rows(p, three_class_rows(20), "csv"),
                       "error: data: data/user/tickets.csv: no column 'queue' (data.source.label_column); "
                       "the file has columns ['text', 'label']"),
    "undecodable bytes": (TICKETS, {},
                          lambda p: p.write_bytes(b"text,label\n" + b"".join(
                              f"ok {i},{'ab'[i % 2]}\n".encode() for i in range(30)) + b"caf\xe9,a\n"),
                          "data/user/tickets.csv: bytes not valid utf-8 at byte offset 244 (line 32"),
    "a single class": (TICKETS, {}, lambda p: write_rows(p, [(f"t{i}", "billing") for i in range(30)], "csv"),
                       "data/user/tickets.csv: column 'label' holds a single class 'billing' after cleaning"),
    "a small class": (TICKETS, {},
                      lambda p: write_rows(p, three_class_rows(20)[:57] + [("x1", "rare"), ("x2", "rare")], "csv"),
                      "data/user/tickets.csv: class 'rare' has 2 row(s) after cleaning, fewer than "
                      "data.min_rows_per_class = 10"),
    "too few rows": (TICKETS, {"min_rows_per_class": 1},
                     lambda p: write_rows(p, [("a", "x"), ("b", "x"), ("c", "y"), ("d", "y")], "csv"),
                     "data/user/tickets.csv: 4 row(s) after cleaning are too few to fill the splits: val, reference "
                     "would be empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_exits_non_zero_names_the_file_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    source, data, write, message = BAD[case]
    root = make_project(tmp_path / "p", source, **data)
    write(root / "data/user/tickets.csv")
    assert run(root, "fetch", monkeypatch) == 0
    capsys.readouterr()
    assert run(root, "data", monkeypatch) == 1
    assert message in capsys.readouterr().err
    assert written(root) == []


def test_a_missing_file_fails_fetch_and_leaves_no_raw_data(tmp_path, monkeypatch, capsys):
    root = make_project(tmp_path / "p", {**TICKETS, "shifted_path": "data/user/other.csv"})
    write_rows(root / "data/user/tickets.csv", three_class_rows(20), "csv")
    assert run(root, "fetch", monkeypatch) == 1
    assert ("error: fetch: data/user/other.csv: no such file (data.source.shifted_path); put the export under "
            "data/user/") in capsys.readouterr().err
    assert sorted(p.name for p in (root / "data").iterdir()) == ["user"]
    assert run(root, "data", monkeypatch) == 1
    assert "data/user/tickets.csv: no such file; run the fetch stage first" in capsys.readouterr().err
    assert written(root) == []


def test_data_stage_command_exits_non_zero_in_a_subprocess(tmp_path, monkeypatch):
    root = make_project(tmp_path / "p", {**TICKETS, "text_column": "body"})
    write_rows(root / "data/user/tickets.csv", three_class_rows(20), "csv")
    assert run(root, "fetch", monkeypatch) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "stages.data"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "data/user/tickets.csv: no column 'body' (data.source.text_column)" in proc.stderr
    assert written(root) == []


# ------------------------------------------------------------------ DVC sees a new export
def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(root),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def ran(output: str) -> list[str]:
    return [stage for stage in ("fetch", "data") if f"Running stage '{stage}'" in output]


@pytest.mark.slow
def test_dvc_reruns_after_a_new_export_and_nothing_when_unchanged(tmp_path):
    """A real git + DVC repo with the project's fetch and data stages; the
    export is `dvc add`ed inside data/user/, the folder fetch depends on."""
    root = tmp_path / "repo"
    make_project(root, TICKETS)
    for pkg in ("shrinkflow", "stages"):
        shutil.copytree(PROJECT_ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    full = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: full["stages"][k] for k in ("fetch", "data")}}))
    shutil.copy(PROJECT_ROOT / "data/user/README.md", root / "data/user/README.md")
    (root / "data/feedback").mkdir(parents=True)
    (root / "data/feedback/labels.jsonl").write_text("")   # the production labels (none yet), a data dep
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    write_rows(root / "data/user/tickets.csv", three_class_rows(20), "csv")
    dvc(root, "add", "-q", "data/user/tickets.csv")
    assert (root / "data/user/tickets.csv.dvc").is_file()
    assert "/tickets.csv" in (root / "data/user/.gitignore").read_text()

    assert ran(dvc(root, "repro", "data")) == ["fetch", "data"]
    assert ran(dvc(root, "repro", "data")) == []
    # the same export again (rewritten, same bytes): nothing re-runs
    write_rows(root / "data/user/tickets.csv", three_class_rows(20), "csv")
    dvc(root, "add", "-q", "data/user/tickets.csv")
    assert ran(dvc(root, "repro", "data")) == []
    # a new export with a fourth class: fetch, then data
    write_rows(root / "data/user/tickets.csv", three_class_rows(20) + [(f"new {i}", "sales") for i in range(12)], "csv")
    dvc(root, "add", "-q", "data/user/tickets.csv")
    assert ran(dvc(root, "repro", "data")) == ["fetch", "data"]
    assert json.loads((root / "data/prepared/labels.json").read_text())["labels"] == [
        "billing", "feature", "outage", "sales"]
    # an edit elsewhere in data/user re-runs fetch, whose identical out stops there
    (root / "data/user/README.md").write_text("notes\n")
    assert ran(dvc(root, "repro", "data")) == ["fetch"]
    assert "up to date" in dvc(root, "status").lower()


def test_truncated_share_counts_special_tokens_and_samples_large_splits():
    from shrinkflow.config import PretrainedModel
    from shrinkflow.data import truncated_shares
    from shrinkflow.modeling import tokenizer_path

    tokenizer = tokenizer_path(PretrainedModel())
    # "word" is one token: n words + [CLS] + [SEP] = n + 2 tokens.
    texts = [" ".join(["word"] * n) for n in (61, 62, 63, 10)]
    frame = pd.DataFrame({"text": texts, "label": [0, 0, 0, 0]})
    assert truncated_shares({"a": frame, "empty": frame.iloc[:0]}, tokenizer, 64) == {"a": 0.25}
    assert truncated_shares({"a": frame}, tokenizer, 63) == {"a": 0.5}
    big = pd.DataFrame({"text": [texts[2]] * 30 + [texts[3]] * 70, "label": 0})
    sampled = truncated_shares({"b": big}, tokenizer, 64, sample_rows=50)
    assert sampled == truncated_shares({"b": big}, tokenizer, 64, sample_rows=50)   # the same sample every run
    assert 0.1 < sampled["b"] < 0.5 and round(sampled["b"] * 50, 9).is_integer()


def test_an_index_that_does_not_answer_exits_with_the_retry_code(tmp_path, monkeypatch, capsys):
    """The built-in archive's index refuses connections: the fetch stage
    exits with STAGE_EXIT_TRANSIENT (the lifecycle retries only that code) and
    says so in its one error line; a missing user file exits 1 (above)."""
    import socket

    from shrinkflow.errors import STAGE_EXIT_TRANSIENT

    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{closed}/simple")
    monkeypatch.setenv("SHRINKFLOW_CACHE_DIR", str(tmp_path / "empty-cache"))
    root = make_project(tmp_path / "p", {"kind": "pypi_sdist"})
    assert run(root, "fetch", monkeypatch) == STAGE_EXIT_TRANSIENT == 75
    err = capsys.readouterr().err
    assert err.startswith(f"error: fetch: cannot read the package index page http://127.0.0.1:{closed}/simple/"
                          "vadersentiment/: <urlopen error") and "a later try may succeed" in err, err
    assert sorted(p.name for p in (root / "data").iterdir()) == ["user"]


def test_fetch_replaces_the_raw_folder_whole(tmp_path):
    from shrinkflow.data import fetch_raw

    write_rows(tmp_path / "data/user/a.csv", [("x", "y")], "csv")
    write_rows(tmp_path / "data/user/b.parquet", [("x", "y")], "parquet")
    raw = tmp_path / "data/raw"
    fetch_raw(FilesSource(path="data/user/a.csv"), raw, root=tmp_path)
    assert [p.name for p in raw.iterdir()] == ["train.csv"]
    # the export became Parquet, with a test set: no stale train.csv stays behind
    files = fetch_raw(FilesSource(path="data/user/b.parquet", test_path="data/user/a.csv"), raw, root=tmp_path)
    assert [p.name for p in files] == ["test.csv", "train.parquet"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw", "user"]   # no temp folders left


def test_the_shared_three_class_fixture_is_a_clean_user_file(three_class_csv):
    df, counts = clean(read_table(three_class_csv, "csv", LABELLED))
    assert three_class_csv.parent.name == "user" and len(df) == 60
    assert df["label"].value_counts().to_dict() == {"billing": 20, "outage": 20, "feature": 20}
    assert counts == {"empty": 0, "conflicting": 0, "exact_duplicates": 0, "near_duplicates": 0}


def test_a_json_list_in_the_text_column_is_refused_not_trained_on(tmp_path):
    """A newcomer's finding: {"body": ["a", "list"]} in a .jsonl file was
    read as the text "['a', 'list']", silently."""
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = [json.dumps({"text": f"text {i}", "label": ["a", "b"][i % 2]}) for i in range(40)]
    lines[6] = json.dumps({"text": ["a", "list"], "label": "a"})
    (raw / "train.jsonl").write_text("\n".join(lines) + "\n")
    source = FilesSource(path="data/user/tickets.jsonl")
    with pytest.raises(DataError, match=r"column 'text' holds 1 value\(s\) that are a list or an object.*row 7"):
        prepare_files(source, raw, DataParams())
    lines[6] = json.dumps({"text": "a plain text", "label": "a"})
    (raw / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert prepare_files(source, raw, DataParams()).labels == ("a", "b")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("column, value", [("text", ["a", "list"]), ("text", {"an": "object"}), ("text", []),
                                           ("text", [["nested"]]), ("label", ["a"]), ("label", {"k": 1})])
def test_a_list_or_an_object_in_either_column_of_either_structured_format_is_refused(tmp_path, fmt, column, value):
    """The kind, as a table: JSON Lines and Parquet can hold lists and
    objects in the text or the label column; each is refused, naming the
    column and the row, where CSV and TSV only ever hold strings."""
    rows = [{"text": f"text {i}", "label": ["a", "b"][i % 2]} for i in range(40)]
    raw = tmp_path / "raw"
    raw.mkdir()
    path = raw / f"train.{fmt}"
    if fmt == "jsonl":   # one row of a file otherwise right
        rows[3] = {**rows[3], column: value}
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        n, first = 1, 4
    else:                # Parquet types a column: the whole column is lists or structs
        pd.DataFrame([{**r, column: value} for r in rows]).to_parquet(path, index=False)
        n, first = 40, 1
    with pytest.raises(DataError, match=rf"column '{column}' holds {n} value\(s\) that are a list or an object"
                                        rf".*row {first}\b"):
        prepare_files(FilesSource(path=f"data/user/tickets.{fmt}"), raw, DataParams())


def test_a_label_typed_another_way_is_shown_with_its_code_points(tmp_path):
    """'café' with its accent as a combining mark (NFD) is another class than
    'café' precomposed (NFC), and the two print alike: the error shows how
    each odd name was typed; a plain name prints as before."""
    from shrinkflow.labels import shown

    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert shown("billing") == "'billing'" and shown(nfc) == repr(nfc) and shown(3) == "3"
    assert shown(nfd) == f"{nfd!r} (as typed: 'cafe\\u0301')"
    assert shown("a\u200bb") == repr("a\u200bb") == "'a\\u200bb'"  # repr escapes a zero-width space itself
    rows = [(f"{w} text {i}", lab) for i in range(20) for w, lab in (("pay", "billing"), ("eat", nfc))]
    source, raw = raw_project(tmp_path, rows, shifted_path="data/user/other.csv")
    write_rows(raw / "shifted.csv", [("x", nfc), ("y", nfd)], "csv")
    with pytest.raises(DataError) as info:
        prepare_files(source, raw, DataParams())
    assert f"label(s) [{nfd!r} (as typed: 'cafe\\u0301')] do not occur" in str(info.value), str(info.value)
    assert f"(its classes: ['billing', {nfc!r}])" in str(info.value)


@pytest.mark.parametrize("name, odd", [
    ("cafe\u0301", True),        # e + combining acute: prints as 'café'
    ("\u1100\u1161", True),      # Hangul jamo: prints as the syllable '가'
    ("\u2126", True),            # OHM SIGN: NFC is GREEK CAPITAL OMEGA
    ("\u212b", True),            # ANGSTROM SIGN: NFC is Å
    ("A\u030a", True),           # A + combining ring
    ("caf\u00e9", False),        # precomposed: already NFC
    ("\uac00", False),           # the Hangul syllable itself
    ("billing", False), ("ラベル", False), ("", False),
    ("a\u200bb", False),         # zero-width space: repr escapes it already
    ("a\u00a0b", False),         # no-break space: repr escapes it already
])
def test_every_name_that_prints_like_another_shows_its_code_points(name, odd):
    """The kind behind the 'café' example: a name whose printed form could
    pass for another name's. A name that is not NFC-normalised shows its
    code points; one whose printed form is already unambiguous (NFC, or
    escaped by repr) prints as repr alone. Two names that print alike are
    told apart in the message."""
    import unicodedata

    from shrinkflow.labels import shown

    got = shown(name)
    assert got.startswith(repr(name))
    assert (got != repr(name)) is odd
    if odd:
        assert got == f"{name!r} (as typed: {ascii(name)})"
        assert shown(unicodedata.normalize("NFC", name)) != got
