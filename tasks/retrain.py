"""Prefect tasks of the retrain flow: each calls one library function
(shrinkflow/, monitoring/) and returns plain data."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from shrinkflow.paths import FEEDBACK_ARCHIVE


@task(name="window-feedback", cache_policy=NO_CACHE)
def window_feedback(window, labels: list[str]) -> list[tuple[str, str]]:
    from monitoring.run import window_feedback as _pairs

    return _pairs(window, labels)


@task(name="append-feedback", cache_policy=NO_CACHE)
def append_feedback(project_dir: str, pairs: list[tuple[str, str]]) -> dict:
    from shrinkflow.feedback import append_feedback as _append

    return _append(Path(project_dir), pairs)


@task(name="dvc-add-feedback-archive", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def archive_feedback(project_dir: str) -> str | None:
    """``dvc add data/feedback/archive`` (and push when a default remote is
    set): every version of the feedback dataset, restorable by its md5.
    Returns None, or why the push failed (the retrain goes on; ``dvc push``
    later)."""
    from shrinkflow.remote import archive

    warning = archive(FEEDBACK_ARCHIVE, project_dir)
    if warning:
        print(f"warning: {warning}")
    return warning


@task(name="record-previous-teacher", cache_policy=NO_CACHE)
def record_previous_teacher(project_dir: str, trigger: dict, feedback: dict, registry_dir: str) -> dict:
    """Measure the kept teacher before train replaces it, read production's
    recorded val accuracy from the registry at ``registry_dir``, and write
    data/feedback/retrain.json."""
    from shrinkflow.retrain import measure_teacher, record_retrain, recorded_production

    root = Path(project_dir)
    return record_retrain(root, trigger, feedback, measure_teacher(root),
                          recorded_production(root / registry_dir)).to_json_dict()


@task(name="copy-production-baseline", cache_policy=NO_CACHE)
def stage_production_baseline(project_dir: str, registry_dir: str) -> str | None:
    """The production model, verified, into data/unlabelled/production as the
    baseline of the retrain's window gate, when an earlier re-compression
    left held-out window texts (else any copy is removed). Returns the
    version staged, or None."""
    from shrinkflow.recompression import stage_production_baseline as _stage

    return _stage(Path(project_dir), registry_dir)


@task(name="stage-kept-teacher", cache_policy=NO_CACHE)
def stage_kept_teacher(project_dir: str, keep_share: float) -> str | None:
    """The kept teacher copied where train averages the retrained one with it
    (``train.retrain_keep_share`` > 0), or any copy removed (0): its content
    hash, or None (shrinkflow.retrain.stage_kept_teacher)."""
    from shrinkflow.retrain import stage_kept_teacher as _stage

    return _stage(Path(project_dir), keep_share)


@task(name="save-pre-retrain-state", cache_policy=NO_CACHE)
def save_state(project_dir: str) -> list[str]:
    """What the retrain changes that DVC's cache cannot give back, saved
    (shrinkflow.retrain.save_state)."""
    from shrinkflow.retrain import save_state as _save

    return _save(Path(project_dir))


@task(name="restore-pre-retrain-state", cache_policy=NO_CACHE)
def restore_state(project_dir: str, rejection: dict) -> dict:
    """The project back as it was before a retrain whose teacher failed its
    gates (shrinkflow.retrain.restore_state)."""
    from shrinkflow.retrain import restore_state as _restore

    return _restore(Path(project_dir), rejection)


def restore_after_interruption(project_dir: str, rejection: dict, stages: tuple[str, ...]) -> dict:
    """The project back as it was before a retrain that was interrupted or
    crashed (shrinkflow.retrain.restore_state, the outs an interrupted stage
    removed included). A plain function, not a task: it runs while the
    flow is being torn down (Ctrl-C), where a task run may not start."""
    from shrinkflow.retrain import restore_state as _restore

    return _restore(Path(project_dir), rejection, also_missing=stages)


@task(name="retrain-outcome", cache_policy=NO_CACHE)
def retrain_outcome(gates: dict | None, deployed_version: str | None, feedback: dict,
                    previous_teacher: dict | None = None, reason: str | None = None,
                    production: dict | None = None) -> dict:
    """``gates``: the lifecycle's selection (reports/gates.json as a dict),
    None when nothing ran; ``production``: retrain.json's recorded production;
    shrinkflow.retrain.retrain_outcome's dict."""
    from shrinkflow.artifacts import GatesReport, PreviousTeacher, RecordedProduction
    from shrinkflow.retrain import retrain_outcome as _outcome

    return _outcome(None if gates is None else GatesReport.model_validate(gates), deployed_version, feedback,
                    None if previous_teacher is None else PreviousTeacher.model_validate(previous_teacher), reason,
                    None if production is None else RecordedProduction.model_validate(production))


def production_version(project_dir: str, registry_dir: str) -> str | None:
    """The version in production now (None: nothing, or no registry). A
    plain function: the retrain's interruption path reads it too."""
    from shrinkflow.registry import Registry

    root = Path(project_dir) / registry_dir
    try:
        return Registry(root).alias() if root.is_dir() else None
    except Exception:  # noqa: BLE001 - an unreadable alias: compared as unknown
        return "unreadable"
