"""small_direct: the baseline the frontier compares against, trained small."""

from __future__ import annotations


from pathlib import Path

from stages.common import main, read_split


def small_direct(params, root: Path) -> None:
    from shrinkflow.config import TrainParams
    from shrinkflow.baseline import small_direct_model
    from shrinkflow.files import write_json
    from shrinkflow.labels import read_labels
    from shrinkflow.modeling import (TOKENIZER, load_tokenizer, load_torch_model, read_manifest,
                                     save_torch_model_atomically)
    from shrinkflow.headline import train_headline
    from shrinkflow.paths import HEADLINE_SMALL_DIRECT, LABELS_JSON, METRICS_SMALL_DIRECT, SMALL_DIRECT, TEACHER
    from shrinkflow.train import seed_everything, train_classifier
    from shrinkflow.validation import check_model_labels

    # The baseline takes the teacher's classifier shape (one logit per class):
    # the teacher must output the data's classes, in their order.
    teacher, small = root / TEACHER, root / SMALL_DIRECT
    classes = read_labels(root / LABELS_JSON)
    check_model_labels(classes, {str(TEACHER): read_manifest(teacher).get("labels")})
    spec = params.frontier.small_direct
    tp = params.train
    tok = load_tokenizer(teacher / TOKENIZER, tp.max_seq_len)
    seed_everything(spec.seed)
    model = small_direct_model(load_torch_model(teacher), spec)
    # The teacher's own training settings, except what the baseline sets.

    train_params = TrainParams(max_seq_len=tp.max_seq_len, batch_size=tp.batch_size, threads=tp.threads,
                               weight_decay=tp.weight_decay, warmup_fraction=tp.warmup_fraction,
                               grad_clip_norm=tp.grad_clip_norm, group_by_length=tp.group_by_length,
                               group_chunk_batches=tp.group_chunk_batches,
                               epochs=spec.epochs, learning_rate=spec.learning_rate, seed=spec.seed)
    model, result = train_classifier(model, tok, read_split("train", root), read_split("val", root), train_params,
                                     desc="small-direct")
    save_torch_model_atomically(model, tok, small, tp.max_seq_len, labels=classes)
    check_model_labels(classes, {str(SMALL_DIRECT): read_manifest(small).get("labels")})
    write_json(root / METRICS_SMALL_DIRECT, result.__dict__)
    write_json(root / HEADLINE_SMALL_DIRECT, train_headline(result))
    print(f"small_direct: best val accuracy {result.best_val_accuracy:.4f} in {result.train_seconds:.0f}s")


if __name__ == "__main__":
    main("small_direct", small_direct)
