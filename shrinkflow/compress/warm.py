"""Warm start: a distilled student kept beside its candidate, and a
re-distillation that starts from it instead of from the teacher's layers.

The served model is an int8 ONNX graph with a pruned vocabulary: nothing to
train from. So a distill step also saves its student as it leaves
distillation (fp32 torch weights, the teacher's full vocabulary, before
vocabulary pruning and quantization) in a *sidecar* directory::

    student.safetensors   the student's state dict (safetensors, never pickle)
    warm_start.json       candidate, layers, the teacher's content hash, labels

The compress stage writes one per distilled candidate under
``models/students/<candidate>``; deploy stores the selected one with the
registry version (``versions/vNNNN/warm_start/``); the re-compression flow
copies production's into ``data/unlabelled/warm_start/<candidate>``
(shrinkflow.warmstart), where the next build finds it (``matching_sidecar``).

A re-distillation that keeps what the student knew also keeps the original
training text in its mix: ``mix_rows`` draws, seeded, a number of training
rows proportional to the window.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

WEIGHTS = "student.safetensors"
META = "warm_start.json"
# Beside the staged sidecars (data/unlabelled/warm_start/): which registry
# version they came from (written by shrinkflow.warmstart).
SOURCE = "source.json"


def save_sidecar(model, dest: Path, *, candidate: str, layers, teacher_hash: str | None, labels) -> Path:
    """Write ``model``'s weights and what they are to ``dest`` (replaced
    whole: written beside it, then renamed). Returns ``dest``."""
    from safetensors.torch import save_model

    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS))
    meta = {"candidate": candidate, "layers": [int(i) for i in layers], "teacher_hash": teacher_hash,
            "labels": [str(x) for x in labels]}
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def read_meta(sidecar: Path) -> dict | None:
    """A sidecar's ``warm_start.json``, or None when ``sidecar`` is not a
    complete sidecar (no weights, no or unreadable metadata)."""
    sidecar = Path(sidecar)
    if not (sidecar / WEIGHTS).is_file():
        return None
    try:
        meta = json.loads((sidecar / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def matching_sidecar(warm_dir: Path, candidate: str, layers, teacher_hash: str,
                     across_teachers: bool = False) -> Path | None:
    """``warm_dir/<candidate>`` when it holds a sidecar of this candidate, with
    these ``layers``, distilled from this teacher (``teacher_hash``: the
    teacher directory's content hash); else None. A student of another
    teacher is a warm start only when ``across_teachers`` is set and the
    sidecar was staged for a retrain (``staged_for_retrain``): the retrained
    teacher's student then starts from the production student, so it keeps
    what production knew in domain, and learns the new teacher from there.
    Any other student of another teacher is not: the new teacher's student is
    distilled from its own layers."""
    path = Path(warm_dir) / candidate
    meta = read_meta(path)
    if meta is None:
        return None
    if (meta.get("candidate"), list(meta.get("layers") or [])) != (candidate, [int(i) for i in layers]):
        return None
    if meta.get("teacher_hash") != teacher_hash and not (across_teachers and staged_for_retrain(warm_dir)):
        return None
    return path


def staged_for_retrain(warm_dir: Path) -> bool:
    """Whether the sidecars in ``warm_dir`` were staged by a retrain
    (``SOURCE`` says ``"for_retrain": true``; shrinkflow.warmstart)."""
    try:
        return json.loads((Path(warm_dir) / SOURCE).read_text()).get("for_retrain") is True
    except (OSError, ValueError, AttributeError):
        return False


def recipe_record(candidate, warm: bool) -> list[dict]:
    """``candidate``'s recipe as its manifest and cache key record it: without
    a warm start, its distill step's warm-start params
    (``DistillStep.WARM_START_KEYS``) are left out, as they change nothing
    then (and an ordinary build's files and key stay what they were)."""
    from shrinkflow.config import DistillStep

    steps = [s.model_dump(mode="json") for s in candidate.recipe]
    if not warm:
        for step in steps:
            if step["method"] == "distill":
                for name in DistillStep.WARM_START_KEYS:
                    step.pop(name, None)
    return steps


def candidate_warm_start(warm_dir: Path, candidate, teacher_hash: str) -> Path | None:
    """The sidecar ``candidate``'s distill step starts from: a matching one in
    ``warm_dir`` (``matching_sidecar``, of another teacher too when the step's
    ``warm_start_across_teachers`` is on and a retrain staged it) when the
    recipe distils with ``warm_start`` on; else None (a cold distillation, or
    no distillation)."""
    step = next((s for s in candidate.recipe if s.method == "distill"), None)
    if step is None or not step.warm_start:
        return None
    return matching_sidecar(warm_dir, candidate.name, step.layers, teacher_hash,
                            across_teachers=step.warm_start_across_teachers)


def warm_source(sidecar: Path | None) -> str | None:
    """Where a staged sidecar came from, for the build record: the registry
    version named in ``SOURCE`` beside it, else its path; None for None."""
    if sidecar is None:
        return None
    try:
        version = json.loads((Path(sidecar).parent / SOURCE).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        version = None
    return str(version) if version else str(sidecar)


def warm_student(teacher, layers, sidecar: Path):
    """The student of ``teacher``'s ``layers`` (``distill.make_student``),
    its weights loaded from ``sidecar``. Raises RuntimeError when the weights
    do not fit that student exactly (missing, extra or reshaped tensors)."""
    from safetensors.torch import load_model

    from shrinkflow.compress.distill import make_student

    student = make_student(teacher, tuple(layers))
    load_model(student, str(Path(sidecar) / WEIGHTS), strict=True)
    return student


def interpolate(student, production, keep: float) -> dict:
    """Weight-space ensembling (WiSE-FT: Wortsman et al., "Robust fine-tuning
    of zero-shot models", CVPR 2022): every floating-point tensor of
    ``student``'s state becomes ``(1 - keep) * student + keep * production``,
    in place; ``production`` is the same architecture (the warm start's
    weights). ``keep`` 0 leaves ``student`` as it is. Returns
    ``{"tensors": n interpolated}``. Raises ValueError when the two states
    do not have the same tensors and shapes."""
    import torch

    if keep == 0:
        return {"tensors": 0}
    mine, theirs = student.state_dict(), production.state_dict()
    if not _same_tensors([mine, theirs]):
        raise ValueError("cannot interpolate: the re-distilled student and the production student differ in "
                         "their tensors")
    n = 0
    with torch.no_grad():
        for k, t in mine.items():
            if t.is_floating_point():
                t.mul_(1.0 - keep).add_(theirs[k].to(t.dtype), alpha=keep)
                n += 1
    return {"tensors": n}


def average_weights(students: list):
    """A uniform model soup (Wortsman et al., "Model soups: averaging
    weights of multiple fine-tuned models improves accuracy without
    increasing inference time", ICML 2022): the first of ``students`` (the
    same architecture, fine-tuned from the same weights), every
    floating-point tensor of its state replaced, in place, by the mean of
    that tensor over all of them; returned. Raises ValueError for an empty
    list or states that differ in their tensors or shapes."""
    import torch

    if not students:
        raise ValueError("average_weights needs at least one student")
    states = [m.state_dict() for m in students]
    first = states[0]
    if not _same_tensors(states):
        raise ValueError("cannot average: the students differ in their tensors")
    with torch.no_grad():
        for k, t in first.items():
            if t.is_floating_point():
                t.copy_(torch.stack([st[k].float() for st in states]).mean(dim=0).to(t.dtype))
    return students[0]


def _same_tensors(states: list[dict]) -> bool:
    """Whether every state dict has the first's tensor names and shapes."""
    first = states[0]
    return all(st.keys() == first.keys() and all(st[k].shape == first[k].shape for k in first) for st in states[1:])


def chooses_on_val(candidate) -> bool:
    """Whether a warm start of ``candidate`` reads the val split: a distill
    step whose ``warm_start_interpolation`` is a grid."""
    return any(getattr(step, "interpolation_grid", None) for step in candidate.recipe)


def choose_interpolation(student, production, grid: tuple[float, ...], max_drop_points: float,
                         accuracy, *, teacher_accuracy: float | None = None,
                         max_teacher_drop_points: float | None = None) -> dict:
    """Pick ``warm_start_interpolation`` from ``grid`` (shares of the
    production student's weights kept, increasing) for a re-distilled
    ``student``: the first share whose interpolated student's
    ``accuracy(model)`` (a fraction, on the val split) is at most
    ``max_drop_points`` accuracy points under ``production``'s and, when
    ``teacher_accuracy`` and ``max_teacher_drop_points`` are both given, at
    most ``max_teacher_drop_points`` under ``teacher_accuracy``; else the
    last share. ``student`` is left interpolated with the chosen share (in
    place); ``production`` is not changed.

    ``accuracy`` is called on ``production`` first, then on the student at
    each share tried, in grid order; the chosen share is always the last
    one scored, so a scorer that builds the model (steps.choose_built) can
    keep what it built last.

    Returns ``{"chosen": share, "production_val_accuracy": a,
    "max_drop_points": p, "tried": [{"keep": share, "val_accuracy": a}, ...],
    "met": bool}`` (a refused share's entry also has ``"missed_points"``:
    ``{"production" | "teacher": points under it}``), plus
    ``"teacher_val_accuracy"`` and
    ``"max_teacher_drop_points"`` when the teacher bound is checked (``met``
    False: no share met the bounds; the last was kept). Selection on val,
    as the candidates' own selection is; the deploy gates and the test
    split's confirmation come after. Raises ValueError (``interpolate``)
    when the architectures differ.
    """
    check_teacher = teacher_accuracy is not None and max_teacher_drop_points is not None
    base = {k: v.detach().clone() for k, v in student.state_dict().items()}
    target = accuracy(production)
    out = {"production_val_accuracy": round(target, 6), "max_drop_points": max_drop_points}
    if check_teacher:
        out["teacher_val_accuracy"] = round(teacher_accuracy, 6)
        out["max_teacher_drop_points"] = max_teacher_drop_points
    tried = []
    for i, keep in enumerate(grid):
        if i:
            student.load_state_dict(base)
        interpolate(student, production, keep)
        acc = accuracy(student)
        # the bounds this share misses, with the points it is under each
        missed = {}
        if (target - acc) * 100.0 > max_drop_points + 1e-9:
            missed["production"] = round((target - acc) * 100.0, 4)
        if check_teacher and (teacher_accuracy - acc) * 100.0 > max_teacher_drop_points + 1e-9:
            missed["teacher"] = round((teacher_accuracy - acc) * 100.0, 4)
        tried.append({"keep": keep, "val_accuracy": round(acc, 6), **({"missed_points": missed} if missed else {})})
        if not missed:
            return {"chosen": keep, **out, "tried": tried, "met": True}
    return {"chosen": grid[-1], **out, "tried": tried, "met": False}


def interpolation_line(candidate: str, chosen: dict, scored: str | None) -> str:
    """One console line for ``choose_interpolation``'s result ``chosen``: the
    share kept, the bounds, and each share tried with its val accuracy and,
    for a share refused, which bound it missed and by how many points.
    ``scored``: "built" when the accuracies are the built candidates', None
    for fp32."""
    bounds = f"at most {chosen['max_drop_points']:g} points under production's {chosen['production_val_accuracy']:.4f}"
    if "teacher_val_accuracy" in chosen:
        bounds += f" and {chosen['max_teacher_drop_points']:g} under the teacher's {chosen['teacher_val_accuracy']:.4f}"
    shares = []
    for t in chosen["tried"]:
        missed = ", ".join(f"{points:.2f} under {'the teacher' if bound == 'teacher' else bound}"
                           for bound, points in t.get("missed_points", {}).items())
        shares.append(f"{t['keep']:g} -> {t['val_accuracy']:.4f} ({f'refused: {missed}' if missed else 'within'})")
    end = "" if chosen["met"] else "; no share was within, so the last was kept"
    return (f"compress: {candidate}: kept {chosen['chosen']:g} of the production student's weights, the first "
            f"share {bounds} on {'built ' if scored else ''}val accuracy: {'; '.join(shares)}{end}")


def mix_rows(n_window: int, n_train: int, rows_per_window_text: float, seed: int) -> np.ndarray:
    """Indices of the training rows a warm re-distillation keeps in its mix:
    ``round(rows_per_window_text * n_window)`` of the ``n_train`` rows (all of
    them when that is more), drawn without replacement by ``seed``, sorted."""
    want = min(n_train, int(round(rows_per_window_text * n_window)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=want, replace=False))
