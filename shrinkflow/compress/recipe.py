"""Apply a candidate's recipe to the kept teacher and write the candidate dir.

Order: torch-level steps (distill, then vocab_prune / structured_prune /
magnitude_prune in the order given) -> export to ONNX -> [fuse] -> ONNX-level
steps (quantize). The config schema enforces that distill comes first and
quantize last; what each step does is its method's (shrinkflow.compress.steps).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from shrinkflow.arch import check_step, family
from shrinkflow.compress.export import export_onnx, fuse_transformer_graph
from shrinkflow.compress.steps import Build, int8_of, method_of
from shrinkflow.compress.warm import recipe_record
# Public here too: callers calibrate and compare on the same texts a build does.
from shrinkflow.compress.texts import calibration_feeds, calibration_texts, window_texts  # noqa: F401
from shrinkflow.config import Candidate
from shrinkflow.modeling import TOKENIZER, load_torch_model, read_manifest, write_manifest


def zlib_size_bytes(path: Path, level: int = 6) -> int:
    """Compressed size: where unstructured sparsity's benefit shows up."""
    import zlib

    comp = zlib.compressobj(level)
    total = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            total += len(comp.compress(block))
    return total + len(comp.flush())


def check_recipe(model_type: str, candidate: Candidate, has_texts: bool) -> None:
    """Refuse a recipe before any work: a step the model family cannot take
    (``arch.check_step`` raises UnsupportedArchitecture), or a step that reads
    text when there are no training texts (ValueError)."""
    for step in candidate.recipe:
        check_step(model_type, step.method)
    for step in candidate.recipe:
        if not has_texts and method_of(step).reads_text(step):
            raise ValueError(f"recipe step {step.method!r} needs the training texts")


def _torch_steps(build: Build, candidate: Candidate) -> None:
    check_recipe(family(build.model).model_type, candidate, build.train_texts is not None)
    for step in candidate.recipe:
        method = method_of(step)
        if method.level == "torch":
            method.apply(step, build)
    build.stats["num_parameters"] = int(sum(p.numel() for p in build.model.parameters()))


def transform_torch(model, tokenizer_json: str, candidate: Candidate, train_texts: list[str] | None,
                    train_labels: np.ndarray | None, threads: int = 2, progress: bool = True,
                    unlabelled_texts: list[str] | None = None):
    """Run the recipe's torch-level steps. Returns (model, tokenizer_json, stats).

    Works on every family in shrinkflow.arch; a step a family cannot take
    (``arch.check_step``) raises UnsupportedArchitecture, and a step that
    reads text without ``train_texts`` ValueError, before any work.
    """
    build = Build(model, tokenizer_json, train_texts=train_texts, train_labels=train_labels,
                  unlabelled_texts=unlabelled_texts, threads=threads, progress=progress,
                  int8=int8_of(candidate.recipe))
    _torch_steps(build, candidate)
    return build.model, build.tokenizer_json, build.stats


FUSION_CHECK_TEXTS = ["A gripping, beautifully acted film.", "Dull.", "It is not bad at all, but the second half "
                      "drags and the jokes fall flat more often than they land.", "", "Worth it."]


def _later_steps(build: Build, candidate: Candidate, start: int, work: Path, opset: int, fuse: bool,
                 train_texts: list[str] | None, labels, warm: bool) -> None:
    """The recipe from step ``start`` on into the directory ``work``: its
    torch steps, the export to ONNX, [fusion], its onnx steps, then the
    tokenizer and the manifest: ``work`` is then a complete model directory."""
    for step in candidate.recipe[start:]:
        method = method_of(step)
        if method.level == "torch":
            method.apply(step, build)
    model, stats = build.model, build.stats
    stats["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    build.onnx_path = onnx_path = export_onnx(model, work / "model.onnx", opset=opset)
    if fuse:
        check = calibration_feeds(build.tokenizer_json, list(train_texts or [])[:48] + FUSION_CHECK_TEXTS, 64,
                                  build.max_seq_len)
        stats["fused_ops"] = fuse_transformer_graph(onnx_path, model.config.num_attention_heads,
                                                    model.config.hidden_size, check)
    for step in candidate.recipe:
        method = method_of(step)
        if method.level == "onnx":
            method.apply(step, build)
    (work / TOKENIZER).write_text(build.tokenizer_json)
    _write_manifest(build, candidate, work, labels, warm)


def _write_manifest(build: Build, candidate: Candidate, work: Path, labels, warm: bool) -> None:
    build.stats["size_mb_zlib"] = round(zlib_size_bytes(build.onnx_path) / 1e6, 4)
    write_manifest(work, "onnx", build.max_seq_len, recipe=recipe_record(candidate, warm),
                   extra={"candidate": candidate.name, "stats": build.stats}, labels=labels)


def _adopt(build: Build, built: Build, work: Path) -> None:
    """Make ``built`` (the copy of ``build`` a grid chose, steps.choose_built)
    the build: its directory becomes ``work``; what its later steps recorded
    joins ``build``'s stats and run stats."""
    shutil.rmtree(work, ignore_errors=True)
    built.onnx_path.parent.rename(work)
    build.model, build.tokenizer_json = built.model, built.tokenizer_json
    build.onnx_path = work / built.onnx_path.name
    build.stats.update({k: v for k, v in built.stats.items() if k not in build.stats})
    build.run_stats.update({k: v for k, v in built.run_stats.items() if k not in build.run_stats})


def apply_recipe(teacher_dir: Path, candidate: Candidate, out_dir: Path, opset: int = 17,
                 train_texts: list[str] | None = None, train_labels=None, threads: int = 2,
                 progress: bool = True, unlabelled_texts: list[str] | None = None, fuse: bool = False, *,
                 teacher_hash: str | None = None, teacher_cache=None, warm_start: Path | None = None,
                 student_dir: Path | None = None, run_stats: dict | None = None,
                 val_texts: list[str] | None = None, val_labels=None, prediction_cache=None) -> Path:
    """teacher -> [torch steps] -> ONNX -> [fuse] -> [onnx steps] -> ``out_dir``.

    ``fuse``: ONNX Runtime's transformer fusions on the fp32 graph, before
    quantization (``export.fuse_transformer_graph``), checked against the
    unfused graph's logits on padded batches.

    ``teacher_hash`` and ``teacher_cache`` (a TeacherOutputCache): read the
    teacher's outputs on the training split from the cache. ``warm_start``:
    a matching sidecar (compress.warm.matching_sidecar) a distill step starts
    from. ``student_dir``: where a distill step saves its student's sidecar
    (replaced, or removed when the recipe does not distil). ``run_stats``
    (a dict) receives how the build went (``Build.run_stats``).
    ``val_texts``/``val_labels``: the val split, which a re-distillation
    with an interpolation grid chooses on: each share built through the
    steps after distill (steps.choose_built; the chosen share's build is
    the candidate, not built again), or in fp32 when no step follows
    (steps.choose_on_val). ``prediction_cache`` (a
    prediction_cache.PredictionCache, or None): where the built shares'
    val labels are read from and stored (steps.built_accuracy).

    Built in a sibling temp dir and renamed, so ``out_dir`` is either the
    finished candidate or absent.
    """
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    manifest = read_manifest(teacher_dir)
    max_seq_len, labels, warm = manifest["max_seq_len"], manifest["labels"], warm_start is not None
    work = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if student_dir is not None:
        shutil.rmtree(student_dir, ignore_errors=True)
    tries = []

    def finish(build: Build, model) -> Build:
        # One share's candidate, built beside the candidate's temp dir.
        dest = work.with_name(f"{work.name}.try{len(tries)}")
        tries.append(dest)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        trial = replace(build, model=model, stats=dict(build.stats), run_stats={}, onnx_path=None, finish=None,
                        built=None)
        _later_steps(trial, candidate, 1, dest, opset, fuse, train_texts, labels, warm)
        return trial

    try:
        build = Build(load_torch_model(teacher_dir), (teacher_dir / TOKENIZER).read_text(),
                      train_texts=train_texts, train_labels=train_labels, unlabelled_texts=unlabelled_texts,
                      threads=threads, progress=progress, max_seq_len=max_seq_len, candidate=candidate.name,
                      teacher_hash=teacher_hash, teacher_cache=teacher_cache, warm_start=warm_start,
                      student_dir=student_dir, val_texts=val_texts, val_labels=val_labels,
                      prediction_cache=prediction_cache, int8=int8_of(candidate.recipe))
        check_recipe(family(build.model).model_type, candidate, build.train_texts is not None)
        start = 0
        if len(candidate.recipe) > 1 and candidate.recipe[0].method == "distill":
            # A grid's choice builds the steps after distill for each share (Build.finish).
            build.finish = lambda model: finish(build, model)
            method_of(candidate.recipe[0]).apply(candidate.recipe[0], build)
            start = 1
        if build.built is not None:
            _adopt(build, build.built, work)
            _write_manifest(build, candidate, work, labels, warm)
        else:
            _later_steps(build, candidate, start, work, opset, fuse, train_texts, labels, warm)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if student_dir is not None:
            shutil.rmtree(student_dir, ignore_errors=True)
        raise
    finally:
        for dest in tries:
            shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)
    if run_stats is not None:
        run_stats.update(build.run_stats)
    return out_dir
