"""The retrain flow: the window's production labels are appended to the
DVC-versioned feedback dataset, the data stage splits them (fine-tune /
held out), the old teacher is measured before it is replaced, then the
lifecycle runs through DVC with train included (the feedback dep makes data
and train stale): the teacher is fine-tuned on the train split plus the
production labels (its weights averaged with the kept teacher's when
train.retrain_keep_share is set), compressed, validated (the retrained teacher gated
against the old one, the candidates against the teacher, against the
production model's recorded val accuracy and, on an earlier re-compression's
held-out window, against production's agreement with the new teacher) and
deployed as usual. A teacher that fails its gates
deploys nothing and is not kept: the project is put back as it was before
the retrain (shrinkflow.retrain.restore_state). Wiring only."""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import lifecycle
from shrinkflow.projectlock import project_lock
from shrinkflow.retrain import teacher_rejection
from shrinkflow.tracked_params import load_project_params
from tasks.dvc import repro_stage_with_retries
from tasks.monitor import clear_production, load_flow_input
from shrinkflow.warmstart import warm_start_summary
from tasks.retrain import (append_feedback, archive_feedback, production_version, record_previous_teacher,
                           restore_after_interruption, restore_state, retrain_outcome, save_state,
                           stage_kept_teacher, stage_production_baseline)
from tasks.warmstart import stage_warm_start


@flow(name="shrinkflow-retrain", log_prints=True)
def retrain(project_dir: str, pairs: list[tuple[str, str]] | None = None, trigger: dict | None = None,
            pairs_file: str | None = None) -> dict:
    """``pairs``: the window's (text, label name) feedback, oldest first, or
    ``pairs_file``: a JSON file holding them (what the monitor passes: Prefect
    refuses flow-run parameters over 512 KiB); ``trigger``: what asked for it
    (the monitor run, the window's hash and the rules that fired), recorded
    in data/feedback/retrain.json and from there in the new version's
    lineage. Raises ValueError when neither or both are given."""
    if (pairs is None) == (pairs_file is None):
        raise ValueError("retrain: give the feedback pairs or pairs_file, one of them")
    if pairs_file is not None:
        pairs = [tuple(p) for p in load_flow_input(pairs_file, "retrain pairs_file", pairs=True)]
    trigger = trigger or {}
    # Validated once, before anything changes (a params.yaml DVC would refuse
    # leaves the feedback dataset as it was).
    params = load_project_params(project_dir)
    with project_lock(project_dir, "the shrinkflow-retrain flow"):
        return _retrain_held(project_dir, pairs, trigger, params)


def _retrain_held(project_dir: str, pairs: list[tuple[str, str]], trigger: dict, params) -> dict:
    # A rejected teacher must not stay the kept teacher: what DVC's cache
    # cannot restore is saved before anything changes.
    save_state(project_dir)
    before = production_version(project_dir, params.deploy.registry_dir)
    try:
        return _retrain(project_dir, pairs, trigger, params)
    except BaseException as exc:
        now = production_version(project_dir, params.deploy.registry_dir)
        if now != before:   # it deployed before it failed: the project is that version's, keep it
            print(f"retrain: {type(exc).__name__} after production moved {before} -> {now}: the project is "
                  "left as that deploy made it")
            raise
        # Interrupted (Ctrl-C, SIGTERM) or crashed part way: the project is
        # put back as it was before the retrain, the kept teacher included,
        # then the exception goes on (a newcomer's finding: Ctrl-C during
        # train left models/teacher deleted, the feedback dataset and
        # dvc.lock changed, and a staged kept teacher that made the next
        # plain run retrain).
        why = f"interrupted: {type(exc).__name__}" + (f": {exc}" if str(exc) else "")
        try:
            restored = restore_after_interruption(project_dir, {"reason": why, "requested_by": trigger},
                                                  ("data", "train", "compress", "validate"))
            print(f"retrain: {why}; the project is back as it was before the retrain (teacher "
                  f"{restored['teacher']})")
        except Exception as restore_exc:  # noqa: BLE001 - said, and the first exception goes on
            print(f"retrain: {why}; putting the project back failed too: {restore_exc} (the state saved before "
                  "the retrain is in .shrinkflow/retrain/before/)")
        raise


def _retrain(project_dir: str, pairs: list[tuple[str, str]], trigger: dict, params) -> dict:
    feedback = append_feedback(project_dir, pairs)
    if not feedback["added"] and not feedback["relabelled"]:
        print(f"retrain: the window's {len(pairs)} labels are all in the feedback dataset already; nothing to "
              "retrain on")
        return {**retrain_outcome(None, None, feedback), "stages": {}}
    push_warning = archive_feedback(project_dir)  # None, or why the push failed (the retrain goes on)
    repro_stage_with_retries("data")("data", project_dir)
    registry_dir = params.deploy.registry_dir
    # The kept teacher, for train to average the new one with
    # (train.retrain_keep_share; none staged at 0): DVC removes models/teacher
    # before train runs.
    kept = stage_kept_teacher(project_dir, params.train.retrain_keep_share)
    if kept:
        print(f"retrain: the new teacher will be averaged with the kept one ({kept[:12]}, share "
              f"{params.train.retrain_keep_share:g})")
    # The production student, for the retrained teacher's students to
    # warm-start from; recorded in retrain.json, so the lineage names it.
    warm_start = stage_warm_start(project_dir, registry_dir, for_retrain=True)
    record = record_previous_teacher(project_dir, {**trigger, "warm_start": warm_start}, feedback, registry_dir)
    print(warm_start_summary((record.get("production") or {}).get("version"), warm_start))
    # Production, measured beside the candidates (not one of them) as the
    # baseline of their window gain, when a re-compression's held-out window
    # texts gate them (docs/monitoring.md, "Retrain").
    baseline = stage_production_baseline(project_dir, registry_dir)
    if baseline:
        print(f"retrain: production {baseline} is measured beside the candidates, as the baseline of their "
              "agreement with the retrained teacher on the held-out window")
    result = lifecycle(project_dir, keep_production_copy=True)
    rejected = teacher_rejection(result["gates"])
    restored = None
    if rejected:
        restored = restore_state(project_dir, {"feedback_md5": feedback["md5"], "reason": rejected,
                                               "requested_by": trigger,
                                               "teacher_gates": result["gates"]["teacher_gates"]})
        clear_production(project_dir)    # the baseline copy: no retrained teacher left to compare with
        print(f"retrain: the retrained teacher was rejected; the project is back as it was before the retrain "
              f"(teacher {restored['teacher']}), the rejection recorded in data/feedback/rejected.jsonl")
    print(f"retrain: {'deployed ' + result['deployed_version'] if result['deployed_version'] else 'nothing deployed'}"
          f" (feedback {feedback['md5']}: {feedback['rows']} labels, {feedback['added']} added, "
          f"{feedback['relabelled']} relabelled)")
    # outcome, versions, reason, feedback, the old teacher, every teacher gate
    # and each candidate's failed gates: what decision.json records
    outcome = retrain_outcome(result["gates"], result["deployed_version"], feedback, record["previous_teacher"],
                              production=record.get("production"))
    return {**outcome, "stages": result["stages"], "restored": restored, "push_warning": push_warning,
            "publish_warning": result.get("publish_warning")}
