"""deploy: promote the validated, selected candidate into the registry."""

from __future__ import annotations

from pathlib import Path

from stages.common import main

# The stages whose outputs (and params) make up a deployed model.
CHAIN = ("fetch", "data", "train", "compress", "validate")


def warm_start_sidecar(root: Path, candidate: str) -> Path | None:
    """The distilled student the compress stage kept for ``candidate``
    (models/students/<candidate>), which the registry stores with the
    version for the next re-compression to start from; None when it has
    none (a recipe without distillation)."""
    from shrinkflow.paths import STUDENTS

    path = root / STUDENTS / candidate
    return path if path.is_dir() else None


def deploy(params, root: Path) -> None:
    from shrinkflow.artifacts import CostReturn, DeploymentRecord, VersionManifest
    from shrinkflow.catalog import COMPRESS_METRICS, DEPLOYMENT, GATES, TRAIN_METRICS, VALIDATION, load, save
    from shrinkflow.cost import roi, roi_lines
    from shrinkflow.errors import PromotionRefused
    from shrinkflow.gates import serves_per_row
    from shrinkflow.files import read_json
    from shrinkflow.catalog import load_retrain_record
    from shrinkflow.lineage import collect_lineage, feedback_lineage
    from shrinkflow.paths import CANDIDATES, SPLITS, TEACHER, UNLABELLED, WINDOW_META, split_path
    from shrinkflow.registry import Registry
    from shrinkflow.validation import deployed_figures

    gates = load(GATES, root)
    metrics = load(VALIDATION, root)
    chosen = gates.selected
    if chosen is None:
        raise PromotionRefused(f"refusing to deploy: {gates.reason}")
    if gates.production_selected:
        return keep_production(params, root, gates)
    report = gates.candidates[chosen].to_report()
    measured = metrics.candidates[chosen]
    cand = next(c for c in params.compress.candidates if c.name == chosen)
    figures = deployed_figures(metrics, chosen)
    # Cost and return: what training large and the compression search cost,
    # against what each prediction saves (CPU per prediction, measured by
    # validate on the same minutes as the teacher).
    compute = load(TRAIN_METRICS, root).compute
    builds = load(COMPRESS_METRICS, root).candidates
    cost = CostReturn.model_validate(
        roi(compute.to_json_dict() if compute else {}, {n: b.build_cpu_seconds for n, b in builds.items()},
            figures.teacher_metrics.to_json_dict(), figures.metrics.to_json_dict(),
            params.cost.price_per_core_hour_usd))
    # How the server must run it: one text per call when validate found its
    # outputs depend on the batch (the gate report says so).
    inv = measured.batch_invariance
    serving = {"per_row": serves_per_row(report), "max_batch_prob_diff": inv.max_prob_diff,
               "label_flips": inv.label_flips} if inv else {}
    if metrics.labels is None or measured.files is None or measured.content_hash is None:
        # Keys every validate.json of this shrinkflow has (the models keep them
        # optional so older files still load).
        raise PromotionRefused(f"refusing to deploy: {VALIDATION.path} records no labels or no file hashes "
                               f"for {chosen!r} (written by an older shrinkflow); re-run validate")
    record = {
        "candidate": chosen,
        # the class names in class-id order, as validated (the registry checks
        # the model's own manifest says the same)
        "labels": metrics.labels,
        "serving": serving,
        "recipe": [s.model_dump(mode="json") for s in cand.recipe],
        **figures.to_json_dict(),
        "confirmation": metrics.confirmation.to_json_dict(),
        "selection": gates.reason,
        "roi": cost.to_json_dict(),
        "lineage": collect_lineage(root, CHAIN, {s: str(split_path(s)) for s in SPLITS},
                                   str(TEACHER), str(UNLABELLED),
                                   # which production window (if any) it was re-compressed on,
                                   # and the monitor run that asked for it
                                   extra={"window": read_json(root / WINDOW_META) or None,
                                          # the production labels the teacher was fine-tuned on, and
                                          # which retrain (monitor run) asked for it
                                          "feedback": feedback_lineage(root, load_retrain_record(root))}),
    }
    VersionManifest.check_record(record, gates.candidates[chosen], measured.files, measured.content_hash)
    registry = Registry(root / params.deploy.registry_dir)
    now = already_deployed(registry, measured.content_hash, record)
    if now:
        # A run stopped after this very deploy moved production and before
        # DVC recorded the stage: the same files and the same record,
        # validated by the same stages (the lineage holds their dvc.lock
        # entries). Deploying again would only store a copy as a new version.
        manifest = registry.version_manifest(now)
        save(DEPLOYMENT, DeploymentRecord(version=now, previous=registry.previous_production(),
                                          same_model_as=manifest.same_model_as, candidate=chosen,
                                          registry=params.deploy.registry_dir, content_hash=manifest.content_hash,
                                          roi=cost), root)
        print(f"deploy: {chosen} is production as {now} already (the same files and the same record: an earlier "
              "run deployed it and stopped before DVC recorded the stage); nothing promoted again")
        return
    promo = registry.promote(root / CANDIDATES / chosen, report, record, expected_files=measured.files,
                             warm_start=warm_start_sidecar(root, chosen))
    # Read back through its model: what was stored is a valid version manifest.
    manifest = registry.version_manifest(promo.version)
    save(DEPLOYMENT, DeploymentRecord(version=promo.version, previous=promo.previous,
                                      same_model_as=promo.same_model_as, candidate=chosen,
                                      registry=params.deploy.registry_dir, content_hash=manifest.content_hash,
                                      roi=cost), root)
    print(f"deploy: {chosen} is production as {promo.version}"
          + (f" (same model files as {promo.same_model_as})" if promo.same_model_as else ""))
    for line in roi_lines(cost.to_json_dict()):
        print(f"deploy: {line}")


def already_deployed(registry, content_hash: str, record: dict) -> str | None:
    """The registry's production version when it is this very deploy, else
    None: the
    same model files (``content_hash``) and, key by key, the same ``record``
    (compared as JSON): the lineage (git commit, params, data, teacher and
    the chain's dvc.lock entries, the validate stage's outputs among them),
    the figures, the selection and the cost and return (so a change only
    deploy reads, such as ``cost.price_per_core_hour_usd``, is a new
    version)."""
    import json

    now = registry.alias()
    if now is None:
        return None
    manifest = registry.manifest(now)
    same = manifest.get("content_hash") == content_hash and all(
        manifest.get(k) == v for k, v in json.loads(json.dumps(record)).items())
    return now if same else None


def keep_production(params, root: Path, gates) -> None:
    """A re-compression selected the production model itself
    (``gates.production_selected``: the ``production`` candidate, or the
    rebuilt one with its very files): promote nothing, and say in
    deploy/deployment.json that ``gates.production`` was kept, and why.
    Raises PromotionRefused when the registry's production is no longer
    that version (it moved since the re-compression copied it)."""
    from shrinkflow.artifacts import DeploymentRecord
    from shrinkflow.catalog import DEPLOYMENT, save
    from shrinkflow.errors import PromotionRefused
    from shrinkflow.registry import Registry

    registry = Registry(root / params.deploy.registry_dir)
    now = registry.alias()
    if gates.production is None or now != gates.production:
        raise PromotionRefused(f"refusing to keep production: validate measured production {gates.production} but "
                               f"the registry serves {now}; re-run the re-compression")
    manifest = registry.version_manifest(now)
    rebuilt = (f" (rebuilt as {gates.selected!r} with the very same files)"
               if gates.selected == gates.production_as else "")
    reason = (f"production {now} was kept{rebuilt}: it passed every gate and won the selection "
              f"({gates.reason}); nothing was promoted")
    save(DEPLOYMENT, DeploymentRecord(version=now, previous=now, same_model_as=None, candidate=manifest.candidate,
                                      registry=params.deploy.registry_dir, content_hash=manifest.content_hash,
                                      kept=True, reason=reason), root)
    print(f"deploy: {reason}")


if __name__ == "__main__":
    main("deploy", deploy)
