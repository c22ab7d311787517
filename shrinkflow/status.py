"""What `shrinkflow status` and the server's /metadata show of a version,
and what `shrinkflow versions` lists, as typed objects (``StatusReport``,
``registry.VersionSummary``), each rendered to text by one function here
(``status_text``, ``versions_text``) and to JSON by its ``to_json_dict``;
and the label names a version answers with (``model_labels``: the server
and the monitor read them).

The JSON keeps the shape the commands printed before these were typed
(tests/test_registry_outputs.py): a key is the field of a model, here or in
``shrinkflow.artifacts``, and spelled nowhere else."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from shrinkflow.artifacts import (Artifact, CandidateMeasurements, Confirmation, CostReturn, GateResult, ServingMode,
                                  TeacherMeasurements, VersionManifest)
from shrinkflow.config import LATENCY_P95_B1
from shrinkflow.errors import IntegrityError, RegistryError
from shrinkflow.files import read_json
from shrinkflow.registry import PRODUCTION, Registry, VersionSummary

if TYPE_CHECKING:
    from shrinkflow.shared_registry import SharedRegistry

NOTHING_DEPLOYED = "nothing is deployed yet: run `shrinkflow run`"
TEACHER_DESCRIPTION = "fp32 teacher, torch eager, as trained; same test texts"
# The figures `status` prints beside the teacher's, in this order: fields of
# both CandidateMeasurements and TeacherMeasurements (tests check it), by
# name because the name is what it prints. macro-F1 is absent from versions
# deployed before it was recorded; f1 (of class 1) exists for two classes only.
FIGURES_BESIDE_TEACHER = ("accuracy", "macro_f1", "f1", LATENCY_P95_B1, "size_mb", "peak_rss_mb")


class DeployedVersion(Artifact):
    """A version as `status` shows it: its manifest's record (see
    ``artifacts.VersionManifest``: test figures, val figures it was selected
    on, gates, confirmation, lineage, cost and return), where it lies
    (``path``), whether its files match their hashes (``integrity``:
    ``verified`` or ``FAILED: ...``), and its ``labels`` (class names in
    class-id order; None when neither its manifest nor its model says).
    ``serving``: how validate said to serve it (empty: not recorded)."""

    version: str
    candidate: str
    recipe: list[dict[str, Any]]
    created_at: str
    path: str
    integrity: str
    same_model_as: str | None
    labels: list[str] | None
    metrics: CandidateMeasurements
    selection_metrics: CandidateMeasurements
    gates: dict[str, GateResult]
    confirmation: Confirmation
    lineage: dict[str, Any]
    # cost and return of compressing (None: deployed before it was recorded)
    roi: CostReturn | None
    serving: ServingMode


class TeacherBaseline(Artifact):
    """The teacher's figures on the same test texts, and what it is."""

    metrics: TeacherMeasurements
    description: str


class StatusReport(Artifact):
    """What `shrinkflow status --json` prints: the ``deployed`` version, the
    ``teacher`` baseline and every version's name; or, when nothing is
    deployed, ``deployed`` None and a ``message`` (and no other key). Dump
    it with ``to_json_dict`` (keys that were set: that is its shape)."""

    deployed: DeployedVersion | None
    message: str | None = None
    teacher: TeacherBaseline | None = None
    versions: list[str] | None = None


def version_labels(registry: Registry, version: str, manifest: VersionManifest) -> list[str] | None:
    """A version's class names in class-id order: its manifest's ``labels``,
    or, for a version stored before the registry recorded them, its model's
    own manifest. None when neither says."""
    if manifest.labels:
        return list(manifest.labels)
    path = registry.path(version) / "model" / "shrinkflow_model.json"
    return (read_json(path).get("labels") or None) if path.is_file() else None


def model_labels(model_dir: Path, version: str = "") -> tuple[str, ...]:
    """The label names of a model directory, in class-id order, from its
    manifest (``shrinkflow_model.json``, hash-verified by Registry.load).
    Raises RegistryError when the manifest has no usable ``labels`` (a list
    of two or more distinct non-empty names): there is no default."""
    from shrinkflow.modeling import MANIFEST, read_manifest

    labels = read_manifest(Path(model_dir)).get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or len(set(labels)) != len(labels) or \
            not all(isinstance(x, str) and x for x in labels):
        raise RegistryError(f"{'version ' + version + ' ' if version else ''}({Path(model_dir) / MANIFEST}): the "
                            f"manifest has no usable `labels` (a list of two or more distinct label names in "
                            f"class-id order; it has {labels!r}): re-deploy it with this shrinkflow")
    return tuple(labels)


def status_report(registry: Registry, version: str | None = None, integrity: str | None = None) -> StatusReport:
    """``version`` (default: production) with its label set, test figures
    (accuracy, macro-F1, per-class recall, the paired drops), gates,
    confirmation, lineage and recipe, the teacher baseline, and whether its
    files still match their hashes.

    ``integrity``: that verdict when the caller already has it (the server
    verified the version when it loaded it into memory); None hashes every
    file of the version now. Raises RegistryError when the aliases file is
    unusable or the manifest is not a version manifest (naming its first
    problems)."""
    version = version or registry.alias()
    if version is None:
        return StatusReport(deployed=None, message=NOTHING_DEPLOYED)
    try:
        m = registry.version_manifest(version)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise RegistryError(f"version {version} ({registry.path(version) / 'manifest.json'}) is not a version "
                            f"manifest ({exc.error_count()} problems: {problems})") from exc
    if integrity is None:
        try:
            registry.verify(version)
            integrity = "verified"
        except IntegrityError as exc:
            integrity = f"FAILED: {exc}"
    # Every field given, None included: what is set is what is printed.
    deployed = DeployedVersion(
        version=version, candidate=m.candidate, recipe=m.recipe, created_at=m.created_at,
        path=str(registry.path(version)), integrity=integrity, same_model_as=m.same_model_as,
        labels=version_labels(registry, version, m), metrics=m.metrics, selection_metrics=m.selection_metrics,
        gates=m.gates, confirmation=m.confirmation, lineage=m.lineage, roi=m.roi,
        # how the server runs it: per_row when validate found it not batch-invariant
        serving=m.serving or ServingMode())
    return StatusReport(deployed=deployed, teacher=TeacherBaseline(metrics=m.teacher_metrics,
                                                                   description=TEACHER_DESCRIPTION),
                        versions=registry.versions())


class SharedRegistryStatus(Artifact):
    """A serving host's view of the shared registry it follows
    (``serve.registry: shared``): the version the shared ``production`` alias
    names (None: nothing published, or it could not be read), and the one
    this host's verified cache (``cache_dir``) holds as production
    (``cached``; None: empty). ``state``:

    - ``in_sync``: the cache holds the shared production;
    - ``lags``: the cache holds another version (a running server copies the
      new one within ``serve.reload_poll_s``, or refused it);
    - ``not_synced``: the cache is empty (no `shrinkflow serve` ran here yet);
    - ``nothing_published``: neither has a production;
    - ``lost_production``: the shared registry has none but the cache has
      (publishing never removes it: an unmounted share, a wrong URL);
    - ``unusable``: the shared registry cannot be reached or read.

    ``warning``: what a person should know (None when in sync, or when the
    report's ``message`` says it all)."""

    url: str
    production: str | None
    cache_dir: str
    cached: str | None
    state: Literal["in_sync", "lags", "not_synced", "nothing_published", "lost_production", "unusable"]
    warning: str | None


class ServingHostStatus(StatusReport):
    """`shrinkflow status` on a serving host: the ``StatusReport`` of the
    version this host's cache holds as production (its files verified, as
    status verifies the local registry's), or a ``message`` saying why there
    is none, and ``shared``, the shared registry against the cache."""

    shared: SharedRegistryStatus


def serving_host_status(cache: Registry, shared: "SharedRegistry") -> ServingHostStatus:
    """Compare the production alias of ``shared`` (the shared registry a
    serving host follows) with ``cache`` (that host's verified copy), and
    report the cached production as ``status_report`` does (hashing its
    files). Reads only: nothing is copied into the cache. A shared registry
    that cannot be used is reported (state ``unusable``), never raised;
    raises RegistryError when the cache itself is unusable (its aliases
    file), as ``status_report`` does."""
    from shrinkflow.shared_registry import SharedRegistryError

    try:
        production, error = shared.aliases().get(PRODUCTION), None
    except (SharedRegistryError, OSError) as exc:
        production, error = None, str(exc)
    finally:
        shared.close()
    local = status_report(cache)
    cached = local.deployed.version if local.deployed is not None else None
    where = str(cache.root)
    message = None
    if error is not None:
        state = "unusable"
        warning = f"{error}; showing this host's cache, which may lag the shared production"
        if cached is None:
            message, warning = f"{error}; and this host's cache ({where}) holds nothing: nothing to show", None
    elif production is None:
        state = "nothing_published" if cached is None else "lost_production"
        warning = None if cached is None else (
            f"the shared registry {shared.url} has nothing in production (no aliases.json there: is the storage "
            f"mounted, is the URL right?); {cached} from this host's cache keeps serving")
        if cached is None:
            message = (f"nothing is in production in the shared registry {shared.url}: is the storage mounted, is "
                       "the URL right? (Else `shrinkflow publish` (or `shrinkflow run`) on the host that deploys "
                       "sends production there)")
    elif cached is None:
        state, warning = "not_synced", None
        message = (f"this host has not copied production yet: the shared registry's production is {production}; "
                   f"`shrinkflow serve` copies it into {where}, verifies its hashes and serves it")
    elif cached != production:
        state = "lags"
        warning = (f"this host's cache lags the shared registry: it holds {cached}, the shared production is "
                   f"{production}. A running `shrinkflow serve` copies and verifies {production} within "
                   "serve.reload_poll_s; if the cache stays behind, the server's /health says why (`refused`)")
    else:
        state, warning = "in_sync", None
    info = SharedRegistryStatus(url=shared.url, production=production, cache_dir=where, cached=cached,
                                state=state, warning=warning)
    if local.deployed is None:
        return ServingHostStatus(deployed=None, message=message, shared=info)
    return ServingHostStatus(deployed=local.deployed, teacher=local.teacher, versions=local.versions, shared=info)


def serving_host_text(report: ServingHostStatus) -> str:
    """`shrinkflow status` on a serving host as text: the shared production
    and the cache's, a warning when they disagree or the shared registry
    cannot be used, then ``status_text`` of the cached production (or the
    report's message)."""
    sh = report.shared
    shared = sh.production or ("unknown (it cannot be used)" if sh.state == "unusable" else "none")
    cached = sh.cached or "empty"
    if sh.state == "in_sync":
        cached += " (the shared production)"
    out = [f"serving host: follows the shared registry {sh.url} (serve.registry: shared)",
           f"  shared production: {shared}",
           f"  this host's cache ({sh.cache_dir}): {cached}"]
    if sh.warning:
        out.append(f"warning: {sh.warning}")
    return "\n".join(out + [status_text(report)])


def status_text(report: StatusReport) -> str:
    """`shrinkflow status` as text: the deployed version's figures beside the
    teacher's, the paired drops with their intervals, recall by class, gates
    (and why a gate not met was not enforced), the cost and return, and the
    production window of a re-compression; or the message when nothing is
    deployed."""
    from shrinkflow.cost import roi_lines

    d = report.deployed
    if d is None:
        return report.message or NOTHING_DEPLOYED
    m, t = d.metrics, report.teacher.metrics
    out = [f"production: {d.version} ({d.candidate}), deployed {d.created_at}; files {d.integrity}",
           f"  labels ({len(d.labels)}): {', '.join(d.labels)}" if d.labels else "  labels: not recorded",
           f"  figures on the {m.split} split ({m.n} texts; the candidate was selected on "
           f"{d.selection_metrics.split}):"]
    for name in FIGURES_BESIDE_TEACHER:
        if getattr(m, name) is not None:
            out.append(f"  {name:<20} {getattr(m, name):>10.4g}   teacher {getattr(t, name):>10.4g}")
    out.append(f"  accuracy drop        {m.accuracy_drop:>+10.4f}   {m.confidence:.0%} interval "
               f"[{m.accuracy_drop_ci_low:+.4f}, {m.accuracy_drop_ci_high:+.4f}], McNemar p={m.mcnemar_p:.3g}")
    if m.macro_f1_drop is not None:
        out.append(f"  macro-F1 drop        {m.macro_f1_drop:>+10.4f}   {m.confidence:.0%} bootstrap "
                   f"interval [{m.macro_f1_drop_ci_low:+.4f}, {m.macro_f1_drop_ci_high:+.4f}]")
    if m.per_class_recall:
        tr = t.per_class_recall or {}
        out.append("  recall by class (test): " + "; ".join(
            f"{c} {r:.3f}" + (f" (teacher {tr[c]:.3f})" if tr.get(c) is not None else "")
            for c, r in m.per_class_recall.items() if r is not None))
    out.append(f"  teacher agreement    {m.agreement['test']:>10.4f}")
    out.append("  gates: " + ", ".join(f"{n}={'pass' if g.passed else ('FAIL' if g.enforced else 'not met')}"
                                       for n, g in d.gates.items()))
    out += [f"    {n}: {g.value:.4g} (threshold {g.threshold:.4g}): {g.note}"
            for n, g in d.gates.items() if not g.passed and not g.enforced]
    if d.roi is not None:
        out.append("  cost and return of compressing:")
        out += [f"    {line}" for line in roi_lines(d.roi.to_json_dict())]
    window = d.lineage.get("window")
    if window:  # a re-compression: which production window, asked for by which monitor run
        out.append(f"  re-compressed on a production window: {window.get('rows_distill')} texts distilled, "
                   f"{window.get('rows_heldout')} held out (md5 {window.get('texts_md5')}); monitor run "
                   f"{window.get('monitor_flow_run')}, triggers {', '.join(window.get('triggers') or [])}")
    return "\n".join(out)


def versions_text(rows: list[VersionSummary]) -> str:
    """`shrinkflow versions` as text: one line per version (``*`` marks
    production) with its test accuracy, p95 latency at batch 1 (ms), size
    (MB) and when it was live."""
    if not rows:
        return "no versions yet: run `shrinkflow run`"

    def num(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    out = [f"{'':2}{'version':<8} {'candidate':<22} {'test acc':>8} {'p95 b1 ms':>9} {'MB':>6}  live"]
    for r in rows:
        m = r.metrics
        live = "; ".join(f"{p.from_} .. {p.to or 'now'}" for p in r.live) or "never"
        out.append(f"{'*' if r.production else ' ':2}{r.version:<8} {str(r.candidate):<22} "
                   f"{num(m.accuracy, '8.4f')} {num(m.latency_ms_p95_b1, '9.2f')} {num(m.size_mb, '6.1f')}  "
                   f"{live}" + (f"  (same files as {r.same_model_as})" if r.same_model_as else ""))
    return "\n".join(out)
