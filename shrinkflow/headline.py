"""The figures `dvc metrics show` compares: a few per stage.

Each stage writes its full measurements (metrics/<stage>.json,
reports/gates.json: hundreds of keys that deploy, status and the reports
read) and, beside them, a headline file of a handful of flat numbers
(metrics/headline/<stage>.json). dvc.yaml declares only the headline files
as ``metrics``, so `dvc metrics show` is one short table and `dvc metrics
diff` lists what a person compares between two runs; the full files are
plain outs. Keys are shared across stages where they mean the same thing
(``val_accuracy`` of the teacher and of the small-direct baseline), so the
table stays narrow: tests/test_headline.py runs `dvc metrics show` on the
headline files of a real run and checks its width.

Accuracies are fractions; ``accuracy_drop`` is teacher minus candidate on
the same test texts (positive = the candidate is worse); margins are
points. Pure functions of the documents the stages already build (the
typed ones of ``shrinkflow.artifacts`` where there is one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shrinkflow.config import LATENCY_P95_B1

if TYPE_CHECKING:
    from shrinkflow.artifacts import ValidationReport


def data_headline(stats: dict) -> dict:
    """Rows in the train and test splits, from the data stage's statistics
    (``shrinkflow.data``'s ``prepared.stats``: ``rows_<split>`` keys)."""
    return {"rows_train": stats["rows_train"], "rows_test": stats["rows_test"]}


def train_headline(result: Any) -> dict:
    """The model's best val accuracy (a fraction), from anything with a
    ``best_val_accuracy`` (a ``shrinkflow.train.TrainResult``, a
    ``TrainMetrics``); used for the teacher and the small-direct baseline
    alike."""
    return {"val_accuracy": result.best_val_accuracy}


def validate_headline(report: "ValidationReport") -> dict:
    """The chosen candidate on the test split, from the validation report
    (metrics/validate.json): ``accuracy``, ``accuracy_drop`` (teacher -
    candidate, a fraction), ``latency_ms_p95_b1``, ``speedup_p95_b1``
    (teacher p95 / candidate p95, round by round) and ``size_mb``. Empty when
    no candidate was chosen: nothing deployable, nothing to compare."""
    confirmation = report.confirmation
    if confirmation is None or not confirmation.candidate:
        return {}
    measured = report.candidates[confirmation.candidate]
    test = confirmation.metrics
    return {"accuracy": test.accuracy, "accuracy_drop": test.accuracy_drop,
            LATENCY_P95_B1: measured.latency_ms_p95_b1, "speedup_p95_b1": measured.speedup_p95_b1,
            "size_mb": measured.size_mb}


def frontier_headline(verdict: list[dict]) -> dict:
    """Compressed-large minus small-direct test accuracy in domain, in
    points, at equal p95 batch-1 latency (``margin_latency``) and at equal
    size (``margin_size``), from the frontier's verdict rows
    (``shrinkflow.frontier.verdict``); a budget with no match is left out."""
    names = {LATENCY_P95_B1: "margin_latency", "size_mb": "margin_size"}
    return {names[row["key"]]: row["points_in_domain"] for row in verdict
            if row.get("key") in names and row.get("points_in_domain") is not None}


def write_all(root=".") -> list:
    """Rewrite every headline file from the full measurement files present
    under ``root`` (a stage not run yet is skipped), without running any
    stage: what each stage would have written. Returns the paths written.
    Raises KeyError or AttributeError when a full file lacks a figure a
    headline needs, pydantic.ValidationError when a typed document
    (metrics/train.json, metrics/validate.json) does not match its model."""
    from pathlib import Path
    from types import SimpleNamespace

    from shrinkflow import paths
    from shrinkflow.artifacts import TrainMetrics, ValidationReport
    from shrinkflow.files import read_json, write_json

    root = Path(root)
    sources = [(paths.METRICS_DATA, paths.HEADLINE_DATA, data_headline),
               (paths.METRICS_TRAIN, paths.HEADLINE_TRAIN, lambda doc: train_headline(TrainMetrics.model_validate(doc))),
               (paths.METRICS_VALIDATE, paths.HEADLINE_VALIDATE,
                lambda doc: validate_headline(ValidationReport.model_validate(doc))),
               # a TrainResult's fields, untyped on disk
               (paths.METRICS_SMALL_DIRECT, paths.HEADLINE_SMALL_DIRECT,
                lambda doc: train_headline(SimpleNamespace(**doc))),
               (paths.METRICS_FRONTIER, paths.HEADLINE_FRONTIER, lambda doc: frontier_headline(doc["verdict"]))]
    written = []
    for full, headline, build in sources:
        if (root / full).is_file():
            written.append(write_json(root / headline, build(read_json(root / full))))
    return written


if __name__ == "__main__":
    # After a checkout whose stages ran before the headline files existed:
    # `python -m shrinkflow.headline`, then `dvc commit` records them.
    for path in write_all():
        print(f"wrote {path}")
