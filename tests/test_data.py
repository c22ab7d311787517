"""Data: parsing, labelling, dedup, stratified split, and the contract."""

from __future__ import annotations

import pandas as pd
import pytest

from shrinkflow.config import DataParams
from shrinkflow.data import (DataContractError, check_contract, deduplicate, label_by_rating,
                             parse_snippets, stratified_split)


def test_parse_and_label_three_rows():
    raw = "1\t2.5\tA fine film.\r\n2\t0\tIt exists.\r\n3\t-1.2\tDull and long.\r\n"
    df = label_by_rating(parse_snippets(raw))
    assert df.to_dict("records") == [{"text": "A fine film.", "label": 1}, {"text": "Dull and long.", "label": 0}]


def test_deduplicate_keeps_one_copy_and_drops_conflicts():
    df = pd.DataFrame({"text": ["Great!", "great! ", "Bad.", "Meh", "meh"], "label": [1, 1, 0, 1, 0]})
    out, removed = deduplicate(df)
    assert out["text"].tolist() == ["Great!", "Bad."]
    assert removed == 3


def test_contract_accepts_disjoint_splits():
    ok = {"train": pd.DataFrame({"text": ["a b", "c d", "e"], "label": [0, 1, 1]}),
          "test": pd.DataFrame({"text": ["f g"], "label": [0]})}
    check_contract(ok)


@pytest.mark.parametrize("splits, message", [
    ({"train": pd.DataFrame({"text": ["a", "  "], "label": [0, 1]})}, "empty text"),
    ({"train": pd.DataFrame({"text": ["a", "b"], "label": [0, 2]})}, "unknown label"),
    ({"train": pd.DataFrame({"text": ["Same text", "b"], "label": [0, 1]}),
      "test": pd.DataFrame({"text": ["same  TEXT"], "label": [0]})}, "leakage: 1 text(s) in both test and train"),
    ({"train": pd.DataFrame({"text": [], "label": []})}, "no rows"),
    ({"train": pd.DataFrame({"sentence": ["a"], "label": [0]})}, "columns"),
])
def test_contract_violations_are_named(splits, message):
    with pytest.raises(DataContractError) as info:
        check_contract(splits)
    assert message in str(info.value)


def test_real_slice_is_stratified_disjoint_and_deterministic(raw_archive, small_splits):
    from shrinkflow.data import prepare

    sizes = {k: len(v) for k, v in small_splits.items()}
    assert sizes["train"] + sizes["val"] + sizes["test"] + sizes["reference"] == 400
    assert sizes["test"] == pytest.approx(40, abs=2) and sizes["shifted"] == 60
    for name in ("train", "val", "test", "reference"):
        assert 0.35 < small_splits[name]["label"].mean() < 0.65
    check_contract({k: v for k, v in small_splits.items() if k != "shifted"})
    again, _ = prepare(raw_archive, DataParams(max_rows=400, max_shifted_rows=60))
    pd.testing.assert_frame_equal(again["test"], small_splits["test"])


def test_split_changes_with_seed():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    a = stratified_split(df, DataParams(seed=0))
    b = stratified_split(df, DataParams(seed=1))
    assert set(a["test"]["text"]) != set(b["test"]["text"])
    assert a["test"]["label"].sum() == 5 and len(a["test"]) == 10


def test_builtin_task_prepares_the_locked_splits_byte_for_byte(raw_archive, tmp_path):
    """The default task must not regress: the data stage's work on the pinned
    archive gives exactly the split files dvc.lock recorded, the label set
    (negative, positive), and no unlabelled text."""
    import hashlib
    import shutil

    import yaml

    from shrinkflow.config import load_params
    from shrinkflow.data import prepare_raw
    from shrinkflow.modeling import tokenizer_path
    from shrinkflow.paths import PREPARED, SPLITS, split_path
    from tests.conftest import PROJECT_ROOT

    params = load_params(PROJECT_ROOT / "params.yaml")
    (tmp_path / "raw").mkdir()
    shutil.copy(raw_archive, tmp_path / "raw" / "source.tar.gz")
    prepared = prepare_raw(tmp_path / "raw", params.data, tokenizer_path(params.train.model), params.train.max_seq_len)
    lock = yaml.safe_load((PROJECT_ROOT / "dvc.lock").read_text())["stages"]["data"]["outs"]
    locked = {o["path"]: o["md5"] for o in lock if o["path"].startswith(str(PREPARED))}
    assert {str(split_path(name)) for name in SPLITS} <= set(locked)
    for name in SPLITS:
        got = hashlib.md5(prepared.splits[name].to_parquet(index=False)).hexdigest()
        assert got == locked[str(split_path(name))], name
    assert prepared.labels == ("negative", "positive") and len(prepared.unlabelled) == 0
    assert prepared.stats["truncated_share_train"] == round(5 / 7397, 6)   # 5 sentences over 64 tokens
    assert prepared.stats["class_counts"]["test"] == {"negative": 532, "positive": 524}


def test_vectorised_dedup_matches_the_scalar_rule_on_the_real_data(raw_archive):
    from shrinkflow.data import MOVIE_FILE, normalize, normalized, read_snippets

    texts = read_snippets(raw_archive, MOVIE_FILE)["text"]
    assert normalized(texts).tolist() == [normalize(t) for t in texts]
