"""Apply a candidate's recipe to the kept teacher and write the candidate dir.

Order: torch-level steps (distill, then vocab_prune / magnitude_prune in the
order given) -> export to ONNX -> ONNX-level steps (quantize). The config
schema enforces that distill comes first and quantize last.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from shrinkflow.arch import attention_heads, check_step, encoder_layers, family, ffn_linears, pad_token, \
    word_embeddings
from shrinkflow.compress.export import export_onnx, fuse_transformer_graph
from shrinkflow.compress.quantize import quantize_dynamic_onnx, quantize_static_onnx
from shrinkflow.config import Candidate
from shrinkflow.modeling import TOKENIZER, load_torch_model, read_manifest, write_manifest


def _encode_unpadded(tokenizer_json: str, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    return [e.ids for e in tok.encode_batch(list(texts))]


def zlib_size_bytes(path: Path, level: int = 6) -> int:
    """Compressed size: where unstructured sparsity's benefit shows up."""
    import zlib

    comp = zlib.compressobj(level)
    total = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            total += len(comp.compress(block))
    return total + len(comp.flush())


def window_texts(unlabelled_texts: list[str] | None) -> list[str]:
    """The non-blank unlabelled (production window) texts."""
    return [t for t in (unlabelled_texts or []) if t.strip()]


def calibration_texts(train_texts: list[str], unlabelled_texts: list[str] | None) -> list[str]:
    """Training texts, interleaved one for one with the unlabelled (production
    window) texts when there are any: activation ranges then cover the text the
    model will serve as well as the text it learned from. Without unlabelled
    text: the training texts unchanged."""
    extra = window_texts(unlabelled_texts)
    if not extra:
        return list(train_texts)
    mixed = [t for pair in zip(extra, train_texts) for t in pair]
    return mixed + extra[len(train_texts):] + list(train_texts[len(extra):])


def calibration_feeds(tokenizer_json: str, texts: list[str], n: int, max_seq_len: int,
                      batch_size: int = 16) -> list[dict]:
    """The first ``n`` texts (the split is already shuffled), as ORT feeds."""
    from tokenizers import Tokenizer

    from shrinkflow.modeling import encode

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length=max_seq_len)
    pad, pad_id = pad_token(tok)
    tok.enable_padding(pad_id=pad_id, pad_token=pad)
    feeds = []
    for start in range(0, min(n, len(texts)), batch_size):
        ids, mask = encode(tok, texts[start:min(n, start + batch_size)])
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def transform_torch(model, tokenizer_json: str, candidate: Candidate, train_texts: list[str] | None,
                    train_labels: np.ndarray | None, threads: int = 2, progress: bool = True,
                    unlabelled_texts: list[str] | None = None):
    """Run the recipe's torch-level steps. Returns (model, tokenizer_json, stats).

    Works on every family in shrinkflow.arch; a step a family cannot take
    (``arch.check_step``) raises UnsupportedArchitecture before any work.
    """
    from shrinkflow.compress.augment import augment_texts
    from shrinkflow.compress.distill import distill, hidden_targets, kd_train, soft_labels, teacher_outputs
    from shrinkflow.compress.magnitude import gradual_magnitude_prune, magnitude_prune, sparsity
    from shrinkflow.compress.structured import importance, structured_prune
    from shrinkflow.compress.vocab import kept_token_ids, nearest_kept, prune_embeddings, remap_tokenizer

    model_type = family(model).model_type
    for step in candidate.recipe:
        check_step(model_type, step.method)
    stats: dict = {}
    teacher_targets = None  # the original teacher's logits, computed at most once
    for step in candidate.recipe:
        needs_data = step.method in ("distill", "vocab_prune", "structured_prune")
        if needs_data and train_texts is None:
            raise ValueError(f"recipe step {step.method!r} needs the training texts")
        if step.method == "distill":
            seqs = _encode_unpadded(tokenizer_json, train_texts)
            wanted = hidden_targets(step.layers, model.config.num_hidden_layers) if step.hidden_weight > 0 else ()
            teacher_targets, d_hidden = teacher_outputs(model, seqs, wanted)
            d_seqs, d_targets, d_labels = seqs, teacher_targets, np.asarray(train_labels)
            extra = window_texts(unlabelled_texts) if step.use_unlabelled else []
            augmented = augment_texts(list(train_texts), step.augment_copies, step.seed,
                                      step.augment_replace_fraction)
            for more in (extra, augmented):
                if more:
                    # The teacher labels text that has no label (production
                    # window, augmented variants): soft labels, and its argmax
                    # as the hard label (pseudo-labelling).
                    u_seqs = _encode_unpadded(tokenizer_json, more)
                    u_targets, u_hidden = teacher_outputs(model, u_seqs, wanted)
                    d_seqs = d_seqs + u_seqs
                    d_hidden = d_hidden + u_hidden
                    d_targets = np.concatenate([d_targets, u_targets])
                    d_labels = np.concatenate([d_labels, u_targets.argmax(1)])
            model = distill(model, d_seqs, d_labels, step, threads=threads, progress=progress, targets=d_targets,
                            hidden=d_hidden or None)
            stats["layers"] = list(step.layers)
            stats["distill_unlabelled_rows"] = len(extra)
            stats["distill_augmented_rows"] = len(augmented)
        elif step.method == "structured_prune":
            seqs = _encode_unpadded(tokenizer_json, train_texts)
            if teacher_targets is None:  # no distill step: the model is still the teacher
                teacher_targets = soft_labels(model, seqs)
            heads, neurons = importance(model, seqs, train_labels, step.importance_batches, seed=step.seed)
            model = structured_prune(model, heads, neurons, step.heads_keep_fraction, step.ffn_keep_fraction)
            if step.recovery_epochs:
                kd_train(model, seqs, teacher_targets, train_labels, epochs=step.recovery_epochs,
                         learning_rate=step.learning_rate, temperature=step.temperature,
                         alpha_kl=step.alpha_kl, batch_size=32, warmup_fraction=0.06, seed=step.seed,
                         threads=threads, progress=progress, desc="recover")
            layer0 = encoder_layers(model)[0]
            stats["heads_per_layer"] = attention_heads(model, layer0)[0]
            stats["ffn_per_layer"] = ffn_linears(model, layer0)[0].out_features
        elif step.method == "vocab_prune":
            # Production-window text (re-compression) counts too: a vocabulary
            # pruned to the training split alone would map the drifted
            # domain's new words to [UNK]. Without a window: the split only.
            kept = kept_token_ids(tokenizer_json, list(train_texts) + window_texts(unlabelled_texts), step.min_count)
            nearest = (nearest_kept(word_embeddings(model).weight, kept)
                       if step.unseen_tokens == "nearest" else None)
            tokenizer_json = remap_tokenizer(tokenizer_json, kept, nearest)
            model = prune_embeddings(model, kept)
            stats["vocab_size"] = len(kept)
        elif step.method == "magnitude_prune":
            if step.schedule == "gradual":
                if train_texts is None:
                    raise ValueError("gradual magnitude pruning needs the training texts")
                seqs = _encode_unpadded(tokenizer_json, train_texts)
                if teacher_targets is None:
                    teacher_targets = soft_labels(model, seqs)
                model = gradual_magnitude_prune(model, seqs, teacher_targets, train_labels, step, threads, progress)
            else:
                model = magnitude_prune(model, step.target_sparsity)
            stats["encoder_sparsity"] = round(sparsity(model), 6)
    stats["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    return model, tokenizer_json, stats


FUSION_CHECK_TEXTS = ["A gripping, beautifully acted film.", "Dull.", "It is not bad at all, but the second half "
                      "drags and the jokes fall flat more often than they land.", "", "Worth it."]


def apply_recipe(teacher_dir: Path, candidate: Candidate, out_dir: Path, opset: int = 17,
                 train_texts: list[str] | None = None, train_labels=None, threads: int = 2,
                 progress: bool = True, unlabelled_texts: list[str] | None = None, fuse: bool = False) -> Path:
    """teacher -> [torch steps] -> ONNX -> [fuse] -> [quantize] -> ``out_dir``.

    ``fuse``: ONNX Runtime's transformer fusions on the fp32 graph, before
    quantization (``export.fuse_transformer_graph``), checked against the
    unfused graph's logits on padded batches.

    Built in a sibling temp dir and renamed, so ``out_dir`` is either the
    finished candidate or absent.
    """
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    manifest = read_manifest(teacher_dir)
    max_seq_len = manifest["max_seq_len"]
    work = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        model, tok_json, stats = transform_torch(
            load_torch_model(teacher_dir), (teacher_dir / TOKENIZER).read_text(), candidate,
            train_texts, train_labels, threads, progress, unlabelled_texts)
        onnx_path = export_onnx(model, work / "model.onnx", opset=opset)
        if fuse:
            check = calibration_feeds(tok_json, list(train_texts or [])[:48] + FUSION_CHECK_TEXTS, 64,
                                      max_seq_len)
            stats["fused_ops"] = fuse_transformer_graph(onnx_path, model.config.num_attention_heads,
                                                        model.config.hidden_size, check)
        for step in candidate.recipe:
            if step.method == "quantize":
                fp32 = onnx_path.with_name("model.fp32.onnx")
                onnx_path.replace(fp32)
                if step.mode == "static":
                    if train_texts is None:
                        raise ValueError("static quantization needs training texts to calibrate on")
                    quantize_static_onnx(fp32, onnx_path, step,
                                         calibration_feeds(tok_json, calibration_texts(train_texts, unlabelled_texts),
                                                           step.calibration_samples, max_seq_len))
                else:
                    quantize_dynamic_onnx(fp32, onnx_path, step)
                fp32.unlink()
        (work / TOKENIZER).write_text(tok_json)
        stats["size_mb_zlib"] = round(zlib_size_bytes(onnx_path) / 1e6, 4)
        write_manifest(work, "onnx", max_seq_len,
                       recipe=[s.model_dump(mode="json") for s in candidate.recipe],
                       extra={"candidate": candidate.name, "stats": stats}, labels=manifest["labels"])
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)
    return out_dir
