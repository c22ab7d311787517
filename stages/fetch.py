"""fetch: the pinned source archive, sha256-checked before anything reads it."""

from __future__ import annotations

import sys

from stages.common import run_stage


def fetch(params) -> None:
    from shrinkflow.data import fetch_source
    from shrinkflow.paths import RAW, cache_dir

    path = fetch_source(params.data.source, RAW, cache_dir())
    print(f"fetch: {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 verified)")


if __name__ == "__main__":
    sys.exit(run_stage("fetch", fetch))
