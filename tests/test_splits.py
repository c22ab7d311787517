"""The prepared-input readers, and the one Parquet reader.

Reading Parquet with Arrow's thread pool can abort the process at exit
(``terminate called without an active exception``, SIGABRT:
apache/arrow#34314). It failed this project's CI once, in a
``simulate-traffic`` subprocess that had done all its work, and it would
fail a DVC stage the same way. So every product module reads Parquet
through ``shrinkflow.splits.read_parquet`` (no thread pool), and a direct
call anywhere else fails here.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest

from shrinkflow.errors import MissingInput
from shrinkflow.splits import read_parquet, read_split
from tests.conftest import PROJECT_ROOT

PRODUCT = ("shrinkflow", "stages", "tasks", "flows", "monitoring", "bench", "scripts")
DIRECT = re.compile(r"\bpd\.read_parquet\(|\bpq\.read_table\(|\bpq\.ParquetFile\(")


def test_read_parquet_gives_the_frame_pandas_gives(tmp_path):
    df = pd.DataFrame({"text": ["a", "b c", ""], "label": [0, 1, 2], "extra": [1.5, 2.5, 3.5]})
    df.to_parquet(tmp_path / "x.parquet", index=False)
    pd.testing.assert_frame_equal(read_parquet(tmp_path / "x.parquet"), df)
    pd.testing.assert_frame_equal(read_parquet(tmp_path / "x.parquet", columns=["text", "label"]),
                                  df[["text", "label"]])


def test_read_parquet_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_parquet(tmp_path / "absent.parquet")


def test_read_split_names_the_data_stage_when_the_split_is_missing(tmp_path):
    with pytest.raises(MissingInput, match="run the data stage first"):
        read_split("train", tmp_path)


def test_no_product_module_reads_parquet_with_arrows_thread_pool():
    """Every Parquet read in the product goes through read_parquet."""
    offenders = []
    for pkg in PRODUCT:
        for path in sorted((PROJECT_ROOT / pkg).rglob("*.py")):
            # bench/work: the benchmarks' scratch copies of the project (git-ignored)
            if path == PROJECT_ROOT / "shrinkflow" / "splits.py" or (PROJECT_ROOT / "bench" / "work") in path.parents:
                continue
            for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if DIRECT.search(line):
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{no}: {line.strip()}")
    assert offenders == []


def test_the_check_sees_a_direct_read():
    """The pattern itself can fail: the forms it must catch."""
    assert DIRECT.search("df = pd.read_parquet(path)")
    assert DIRECT.search("t = pq.read_table(path)")
    assert not DIRECT.search("df = read_parquet(path)")
