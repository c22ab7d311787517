"""data: parse, label, dedup, split, check the contract."""

from __future__ import annotations

import sys

from stages.common import run_stage


def data(params) -> None:
    from shrinkflow.data import prepare
    from shrinkflow.io import atomic_write_bytes, write_json
    from shrinkflow.paths import METRICS_DATA, RAW, SPLITS, split_path

    splits, stats = prepare(RAW, params.data)
    for name in SPLITS:
        atomic_write_bytes(split_path(name), splits[name].to_parquet(index=False))
    write_json(METRICS_DATA, stats)
    print("data: " + ", ".join(f"{k}={v}" for k, v in stats.items() if k.startswith("rows_")))


if __name__ == "__main__":
    sys.exit(run_stage("data", data))
