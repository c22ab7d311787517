"""What each kind of recipe step does, registered by its ``method`` name.

A step's parameters are its schema in shrinkflow.config (``DistillStep``,
``QuantizeStep``, ...); what is specific to it lives here, in one class per
method: whether it reads text (the training split or the unlabelled window:
the recipe refuses to run it without, and the candidate cache keys it on
that text), at which level it runs, and how it applies itself. A new method
is a new class with ``@register``; nothing else branches on method names.

Levels: ``torch`` steps rewrite the torch model, in recipe order, before the
ONNX export; ``onnx`` steps rewrite the exported graph after it (and after
fusion). The schema keeps distill first and quantize last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import numpy as np

from shrinkflow.compress.texts import calibration_feeds, calibration_texts, encode_unpadded, window_texts


def int8_of(recipe) -> dict | None:
    """What the recipe's quantize step rounds, as ``distill`` trains against
    it: ``{"per_channel": ..., "tables": "tensor" | "row" | None}`` (None:
    the tables stay fp32); None without a quantize step."""
    step = next((s for s in recipe if s.method == "quantize"), None)
    if step is None:
        return None
    return {"per_channel": step.per_channel, "tables": step.embedding_scales if step.quantize_embeddings else None}


@dataclass
class Build:
    """What a candidate's steps share while it is built.

    ``model`` (a torch model) and ``tokenizer_json`` are what torch steps
    rewrite; ``onnx_path`` is the exported graph onnx steps rewrite in place
    (None until the export). ``stats`` collects what each step reports for
    the candidate's manifest and metrics/compress.json.
    """

    model: Any
    tokenizer_json: str
    train_texts: list[str] | None = None
    train_labels: np.ndarray | None = None
    unlabelled_texts: list[str] | None = None
    # The val split (texts, label ids): read only by a re-distillation that
    # chooses its interpolation on val (DistillStep.interpolation_grid).
    val_texts: list[str] | None = None
    val_labels: np.ndarray | None = None
    threads: int = 2
    progress: bool = True
    max_seq_len: int | None = None
    onnx_path: Path | None = None
    stats: dict = field(default_factory=dict)
    # How this build went, for metrics/compress.json only (not the model's
    # manifest: a model built from cached teacher outputs is the same model).
    run_stats: dict = field(default_factory=dict)
    # The original teacher's logits on the training split: computed at most
    # once, by the first step that needs them, while the model still is the
    # teacher (distill before it replaces the model, or a later step's lazy
    # call when no step before it changed what the model computes).
    teacher_targets: np.ndarray | None = None
    # What the candidate cache and the warm start need to know of the build
    # (set by shrinkflow.compress.build; None in a bare transform_torch):
    # the candidate's name, the teacher directory's content hash, the cache
    # of teacher outputs, a matching warm-start sidecar (compress.warm) and
    # where a distill step saves its student's sidecar.
    candidate: str | None = None
    teacher_hash: str | None = None
    teacher_cache: Any = None
    warm_start: Path | None = None
    student_dir: Path | None = None
    # The int8 the recipe's quantize step builds, for a quantization-aware
    # distill step (``int8_of``): {"per_channel": bool, "tables": "tensor" | "row" | None}.
    int8: dict | None = None
    # The prediction cache validate reads (shrinkflow.prediction_cache), or
    # None: a grid's built shares' val labels are read from and stored in it.
    prediction_cache: Any = None
    # Set by shrinkflow.compress.recipe.apply_recipe when steps follow the
    # distill step: ``finish(model)`` takes a copy of this build with
    # ``model`` as its model through the rest of the recipe (later torch
    # steps, export, fusion, onnx steps) into a directory of its own and
    # returns that copy (a complete ONNX model directory at
    # ``onnx_path.parent``). ``built``: the copy a grid chose
    # (``choose_built``), which apply_recipe adopts instead of building the
    # later steps again. Both None in a bare transform_torch.
    finish: Callable[[Any], "Build"] | None = None
    built: "Build | None" = None

    def train_seqs(self) -> list[list[int]]:
        """The training texts as token ids under the current tokenizer."""
        return encode_unpadded(self.tokenizer_json, self.train_texts)

    def teacher_logits(self, seqs: list[list[int]]) -> np.ndarray:
        """``teacher_targets``, computed from the current model on ``seqs``
        if no step computed them yet. [n_train, n_classes] float32."""
        if self.teacher_targets is None:
            self.teacher_targets, _ = self.teacher_outputs(seqs, ())
        return self.teacher_targets

    def teacher_outputs(self, seqs: list[list[int]], layers: tuple[int, ...]):
        """``distill.teacher_outputs`` of the current model (the teacher:
        call it before a step replaces the model) on the training ``seqs``,
        through the teacher-output cache when the build has one. Records in
        ``stats`` whether they came from it."""
        from shrinkflow.compress.teacher_cache import cached_teacher_outputs

        logits, hidden, hit = cached_teacher_outputs(self.teacher_cache, self.teacher_hash, self.model, seqs,
                                                     layers, self.tokenizer_json)
        if self.teacher_cache is not None:
            self.run_stats["teacher_outputs_cached"] = hit
        return logits, hidden


class Method:
    """One kind of recipe step. Subclasses set ``name`` (the step's
    ``method``) and ``level``, and override ``apply``."""

    name: ClassVar[str]
    level: ClassVar[Literal["torch", "onnx"]] = "torch"

    def reads_text(self, step) -> bool:
        """Whether ``step`` learns from text (training split or window)."""
        return False

    def apply(self, step, build: Build) -> None:
        """Apply ``step`` to ``build`` in place."""
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the method for steps named ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"recipe method {cls.name!r} registered twice")
    METHODS[cls.name] = cls()
    return cls


def method_of(step) -> Method:
    """The registered method for ``step`` (by ``step.method``). Raises
    KeyError for a method nothing registered."""
    try:
        return METHODS[step.method]
    except KeyError:
        raise KeyError(f"no recipe method {step.method!r} is registered "
                       f"(shrinkflow.compress.steps: {sorted(METHODS)})") from None


def reads_text(candidate) -> bool:
    """Whether any step of ``candidate``'s recipe learns from text."""
    return any(method_of(step).reads_text(step) for step in candidate.recipe)


def _val_split(build: Build) -> tuple[list[str], np.ndarray]:
    """The build's val split (texts, label ids). Raises ValueError when it
    has none."""
    if not build.val_texts or build.val_labels is None:
        raise ValueError("warm_start_interpolation is a list (chosen on val) but the build has no val split")
    return list(build.val_texts), np.asarray(build.val_labels)


def _choice_stats(build: Build, chosen: dict, scored: str | None) -> dict:
    """Say which share ``choose_interpolation`` kept (``chosen``), and
    return the run stats it adds; ``scored``: "built", or None for fp32."""
    from shrinkflow.compress.warm import interpolation_line

    print(interpolation_line(build.candidate, chosen, scored))
    choice = {k: v for k, v in chosen.items() if k != "chosen"}
    return {"warm_start_interpolation": chosen["chosen"],
            "warm_start_interpolation_choice": {"scored": scored, **choice} if scored else choice}


def choose_on_val(build: Build, production, grid: tuple[float, ...], max_drop_points: float) -> dict:
    """``warm.choose_interpolation`` for the re-distilled ``build.model``
    on the build's val split; returns the run stats it adds
    (``warm_start_interpolation``: the share chosen, and what was tried).
    Raises ValueError when the build has no val split."""
    from shrinkflow.compress.distill import teacher_outputs
    from shrinkflow.compress.warm import choose_interpolation

    texts, labels = _val_split(build)
    seqs = encode_unpadded(build.tokenizer_json, texts)

    def accuracy(model) -> float:
        model.eval()
        logits, _ = teacher_outputs(model, seqs, ())
        return float((logits.argmax(1) == labels).mean())

    return _choice_stats(build, choose_interpolation(build.model, production, grid, max_drop_points, accuracy),
                         None)


def built_accuracy(model_dir: Path, texts: list[str], labels: np.ndarray, threads: int, cache=None,
                   name: str | None = None) -> float:
    """Accuracy (a fraction) of the model directory ``model_dir`` on
    ``texts`` as validate measures it: through its predictor
    (shrinkflow.predictors; ONNX Runtime for a built candidate), one text per
    call when the graph is batch-dependent (dynamic int8: how validate and
    the server then run it), else in length-sorted batches of 32.

    ``cache`` (a ``prediction_cache.PredictionCache``, or None): the labels
    are read from it, or predicted and stored, under the key validate uses
    for the same model files, texts, per-row setting and threads, so a share
    scored here is not predicted on val again by validate (and a model
    validated before, rebuilt byte for byte, is read back: production's
    student when its pruned vocabulary, which also counts the window's
    texts, comes out the same). The accuracy is the same either way; a hit is said on
    stdout, naming the model ``name`` (default: the directory's name)."""
    from shrinkflow.prediction_cache import model_hash
    from shrinkflow.predictors import load_predictor, predict_labels, predict_served

    predictor = load_predictor(model_dir, threads=threads)
    per_row = bool(predictor.batch_dependent)

    def predict() -> list[int]:
        if per_row:
            return predict_served(predictor, texts, per_row=True).logits.argmax(axis=1).tolist()
        return predict_labels(predictor, texts).tolist()

    if cache is None:
        pred = predict()
    else:
        key = cache.key(model_hash(model_dir), "labels", list(texts), per_row=per_row, threads=threads)
        pred = cache.get(key)
        if pred is None or len(pred) != len(texts):
            pred = predict()
            cache.put(key, pred)
        else:
            print(f"compress: {name or Path(model_dir).name}: val labels read from the prediction cache")
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def choose_built(build: Build, teacher, production, step) -> dict:
    """``warm.choose_interpolation`` for the re-distilled ``build.model``
    with each share scored *as built*: the interpolated student (and the
    production student, once) taken through the rest of the recipe
    (``build.finish``) and scored on the val split as validate scores it
    (``built_accuracy``); with ``step.warm_start_max_teacher_val_drop_points``
    set, also against the teacher's val accuracy (``teacher``: the teacher
    model, its val logits through the teacher-output cache). Leaves the
    chosen share's built copy in ``build.built`` (the others' directories
    are removed). Returns the run stats it adds (``warm_start_interpolation``
    and ``warm_start_interpolation_choice``, with ``"scored": "built"``).
    Raises ValueError when the build has no val split."""
    import copy
    import shutil

    from shrinkflow.compress.teacher_cache import cached_teacher_outputs
    from shrinkflow.compress.warm import choose_interpolation

    texts, labels = _val_split(build)
    teacher_acc = None
    if step.warm_start_max_teacher_val_drop_points is not None:
        seqs = encode_unpadded(build.tokenizer_json, texts)
        logits, _, _ = cached_teacher_outputs(build.teacher_cache, build.teacher_hash, teacher, seqs, (),
                                              build.tokenizer_json)
        teacher_acc = float((logits.argmax(1) == labels).mean())
    last: list[Build] = []
    scored: list[str] = []

    def accuracy(model) -> float:
        # A copy: the later steps rewrite the model (vocab_prune replaces its
        # embedding), and the grid goes on from this one's weights.
        done = build.finish(copy.deepcopy(model))
        for old in last:
            shutil.rmtree(old.onnx_path.parent, ignore_errors=True)
        last[:] = [done]
        # choose_interpolation scores production's student first, then the shares
        scored.append("production's student" if not scored else f"grid share {len(scored)} tried")
        return built_accuracy(done.onnx_path.parent, texts, labels, build.threads, build.prediction_cache,
                              name=f"{build.candidate} ({scored[-1]})")

    try:
        chosen = choose_interpolation(build.model, production, step.interpolation_grid,
                                      step.warm_start_max_val_drop_points, accuracy, teacher_accuracy=teacher_acc,
                                      max_teacher_drop_points=step.warm_start_max_teacher_val_drop_points)
    except BaseException:
        for old in last:
            shutil.rmtree(old.onnx_path.parent, ignore_errors=True)
        raise
    # choose_interpolation scores the chosen share last: what was built last is the candidate.
    build.built = last[0]
    return _choice_stats(build, chosen, "built")


@register
class Distill(Method):
    """A student of the teacher's listed layers, distilled on the training
    split, on teacher-labelled window text (``use_unlabelled``) and on
    teacher-labelled augmented copies of the split."""

    name = "distill"

    def reads_text(self, step) -> bool:
        return True

    def apply(self, step, build: Build) -> None:
        from shrinkflow.compress.distill import hidden_targets, teacher_outputs, warm_alpha_kl, warm_learning_rate
        from shrinkflow.compress.warm import average_weights, interpolate, save_sidecar, warm_source, warm_student

        model, tokenizer_json = build.model, build.tokenizer_json
        seqs = build.train_seqs()
        wanted = hidden_targets(step.layers, model.config.num_hidden_layers) if step.hidden_weight > 0 else ()
        # The whole split's outputs even for a warm start's sample: later
        # steps (build.teacher_logits) read them, and the cache holds them.
        build.teacher_targets, s_hidden = build.teacher_outputs(seqs, wanted)
        extra = window_texts(build.unlabelled_texts) if step.use_unlabelled else []
        warm = build.warm_start if step.warm_start else None
        # The teacher's outputs on the window, once for every member of a soup.
        window_out = None
        if extra:
            w_seqs = encode_unpadded(tokenizer_json, extra)
            window_out = (w_seqs, *teacher_outputs(model, w_seqs, wanted))
        soup = step.warm_start_soup if warm is not None else 1
        members = [self._distill_one(build, step.model_copy(update={"seed": step.seed + m}) if m else step, model,
                                     tokenizer_json, seqs, s_hidden, wanted, extra, window_out, warm, soup)
                   for m in range(soup)]
        build.model = members[0].student if soup == 1 else average_weights([m.student for m in members])
        if warm is not None:
            build.run_stats["warm_start_train_rows"] = sum(m.train_rows for m in members)
            if members[0].window_variants:
                build.run_stats["warm_start_window_augmented_rows"] = members[0].window_variants
        if soup > 1:
            build.run_stats["warm_start_soup"] = soup
        if warm is not None and step.warm_start_average_last:
            build.run_stats["warm_start_average_last"] = step.warm_start_average_last
        grid = step.interpolation_grid
        if warm is not None and grid is not None and build.finish is not None:
            # Steps follow: each share is scored as the candidate it becomes.
            build.run_stats.update(choose_built(build, model, warm_student(model, step.layers, warm), step))
        elif warm is not None and grid is not None:
            build.run_stats.update(choose_on_val(build, warm_student(model, step.layers, warm), grid,
                                                 step.warm_start_max_val_drop_points))
        elif warm is not None and step.warm_start_interpolation > 0:
            interpolate(build.model, warm_student(model, step.layers, warm), step.warm_start_interpolation)
            build.run_stats["warm_start_interpolation"] = step.warm_start_interpolation
        if build.student_dir is not None:
            from shrinkflow.modeling import model_labels

            save_sidecar(build.model, build.student_dir, candidate=build.candidate, layers=step.layers,
                         teacher_hash=build.teacher_hash, labels=model_labels(build.model))
        build.stats["layers"] = list(step.layers)
        build.run_stats.update({"warm_start_from": warm_source(warm), "distill_rows": sum(m.rows for m in members),
                                "distill_epochs": step.warm_start_epochs if warm is not None else step.epochs,
                                "distill_learning_rate": warm_learning_rate(step) if warm is not None
                                else step.learning_rate,
                                "distill_alpha_kl": warm_alpha_kl(step) if warm is not None else step.alpha_kl})
        build.stats["distill_unlabelled_rows"] = len(extra)
        build.stats["distill_augmented_rows"] = members[0].augmented

    @staticmethod
    def _distill_one(build: Build, step, model, tokenizer_json, seqs, s_hidden, wanted, extra, window_out, warm,
                     soup: int) -> "_Member":
        """One distilled student (one member of a soup of ``soup``, with its
        own ``step.seed``): the training split, or on a warm start its seeded
        sample at warm_start_train_rows_per_window_text / soup rows per
        window text, plus the window (the teacher's outputs ``window_out``:
        seqs, logits, layer outputs; repeated as asked) and the
        teacher-labelled augmented text."""
        from shrinkflow.compress.augment import augment_texts
        from shrinkflow.compress.distill import distill, teacher_outputs
        from shrinkflow.compress.warm import mix_rows, warm_student

        d_seqs, d_targets, d_labels = seqs, build.teacher_targets, np.asarray(build.train_labels)
        d_hidden = s_hidden
        train_texts = list(build.train_texts)
        if warm is not None:
            # Re-distillation from the production student: the window, and
            # the training text at the asked ratio so the student keeps what
            # it knew in domain.
            rows = mix_rows(len(extra), len(seqs), step.warm_start_train_rows_per_window_text / soup, step.seed)
            d_seqs, d_targets, d_labels = [seqs[i] for i in rows], d_targets[rows], d_labels[rows]
            d_hidden = [d_hidden[i] for i in rows] if d_hidden else d_hidden
            train_texts = [train_texts[i] for i in rows]
        augmented = augment_texts(train_texts, step.augment_copies, step.seed, step.augment_replace_fraction)
        if warm is not None and step.warm_start_window_augment_copies:
            # variants of the window's own texts, words drawn from the window
            # (another seed than the split's copies)
            window_variants = augment_texts(extra, step.warm_start_window_augment_copies, step.seed + 1,
                                            step.augment_replace_fraction)
            augmented = augmented + window_variants
        for more in (extra, augmented):
            if more:
                # The teacher labels text that has no label (production
                # window, augmented variants): soft labels, and its argmax
                # as the hard label (pseudo-labelling).
                if more is extra:
                    u_seqs, u_targets, u_hidden = window_out
                else:
                    u_seqs = encode_unpadded(tokenizer_json, more)
                    u_targets, u_hidden = teacher_outputs(model, u_seqs, wanted)
                if more is extra and warm is not None and step.warm_start_window_repeats > 1:
                    # the window weighed up against the training rows: the
                    # same texts and teacher outputs, seen that many times
                    k = step.warm_start_window_repeats
                    u_seqs, u_hidden, u_targets = u_seqs * k, list(u_hidden) * k, np.tile(u_targets, (k, 1))
                d_seqs = d_seqs + u_seqs
                d_hidden = d_hidden + u_hidden
                d_targets = np.concatenate([d_targets, u_targets])
                d_labels = np.concatenate([d_labels, u_targets.argmax(1)])
        student = warm_student(model, step.layers, warm) if warm is not None else None
        student = distill(model, d_seqs, d_labels, step, threads=build.threads, progress=build.progress,
                          targets=d_targets, hidden=d_hidden or None, student=student, int8=build.int8)
        return _Member(student, len(d_seqs), len(rows) if warm is not None else 0, len(augmented),
                       len(window_variants) if warm is not None and step.warm_start_window_augment_copies else 0)


class _Member(NamedTuple):
    """One distilled student of a soup and its rows: all, the training rows
    sampled (a warm start), augmented, and the window's own variants."""

    student: Any
    rows: int
    train_rows: int
    augmented: int
    window_variants: int


@register
class StructuredPrune(Method):
    """Whole heads and FFN neurons removed by importance on the training
    split, then recovery by distillation from the original teacher."""

    name = "structured_prune"

    def reads_text(self, step) -> bool:
        return True

    def apply(self, step, build: Build) -> None:
        from shrinkflow.arch import attention_heads, encoder_layers, ffn_linears
        from shrinkflow.compress.distill import kd_train
        from shrinkflow.compress.structured import importance, structured_prune

        seqs = build.train_seqs()
        targets = build.teacher_logits(seqs)
        heads, neurons = importance(build.model, seqs, build.train_labels, step.importance_batches, seed=step.seed)
        build.model = model = structured_prune(build.model, heads, neurons, step.heads_keep_fraction,
                                               step.ffn_keep_fraction)
        if step.recovery_epochs:
            kd_train(model, seqs, targets, build.train_labels, epochs=step.recovery_epochs,
                     learning_rate=step.learning_rate, temperature=step.temperature,
                     alpha_kl=step.alpha_kl, batch_size=32, warmup_fraction=0.06, seed=step.seed,
                     threads=build.threads, progress=build.progress, desc="recover")
        layer0 = encoder_layers(model)[0]
        build.stats["heads_per_layer"] = attention_heads(model, layer0)[0]
        build.stats["ffn_per_layer"] = ffn_linears(model, layer0)[0].out_features


@register
class VocabPrune(Method):
    """Only the embedding rows of tokens the training split (and the
    production window) use; the tokenizer remapped to match."""

    name = "vocab_prune"

    def reads_text(self, step) -> bool:
        return True

    def apply(self, step, build: Build) -> None:
        from shrinkflow.arch import word_embeddings
        from shrinkflow.compress.vocab import kept_token_ids, nearest_kept, prune_embeddings, remap_tokenizer

        # Production-window text (re-compression) counts too: a vocabulary
        # pruned to the training split alone would map the drifted domain's
        # new words to [UNK]. Without a window: the split only.
        texts = list(build.train_texts) + window_texts(build.unlabelled_texts)
        kept = kept_token_ids(build.tokenizer_json, texts, step.min_count)
        nearest = (nearest_kept(word_embeddings(build.model).weight, kept)
                   if step.unseen_tokens == "nearest" else None)
        build.tokenizer_json = remap_tokenizer(build.tokenizer_json, kept, nearest)
        build.model = prune_embeddings(build.model, kept)
        build.stats["vocab_size"] = len(kept)


@register
class MagnitudePrune(Method):
    """Global magnitude pruning of the encoder's Linear weights: one shot
    (no data), or gradual with distillation on the training split between
    steps."""

    name = "magnitude_prune"

    def reads_text(self, step) -> bool:
        return step.schedule == "gradual"

    def apply(self, step, build: Build) -> None:
        from shrinkflow.compress.magnitude import gradual_magnitude_prune, magnitude_prune, sparsity

        if step.schedule == "gradual":
            seqs = build.train_seqs()
            targets = build.teacher_logits(seqs)
            build.model = gradual_magnitude_prune(build.model, seqs, targets, build.train_labels, step,
                                                  build.threads, build.progress)
        else:
            build.model = magnitude_prune(build.model, step.target_sparsity)
        build.stats["encoder_sparsity"] = round(sparsity(build.model), 6)


@register
class Quantize(Method):
    """int8 quantization of the exported graph in ONNX Runtime: dynamic (no
    data), or static, calibrated on training and window text."""

    name = "quantize"
    level = "onnx"

    def reads_text(self, step) -> bool:
        return step.mode == "static"

    def apply(self, step, build: Build) -> None:
        from shrinkflow.compress.quantize import quantize_dynamic_onnx, quantize_static_onnx

        onnx_path = build.onnx_path
        fp32 = onnx_path.with_name("model.fp32.onnx")
        onnx_path.replace(fp32)
        try:
            if step.mode == "static":
                texts = calibration_texts(build.train_texts, build.unlabelled_texts)
                quantize_static_onnx(fp32, onnx_path, step, calibration_feeds(
                    build.tokenizer_json, texts, step.calibration_samples, build.max_seq_len))
            else:
                quantize_dynamic_onnx(fp32, onnx_path, step)
        except BaseException:
            fp32.replace(onnx_path)  # a refusal leaves the graph it was given, whole
            raise
        fp32.unlink()
