"""Fine-tune the teacher: a transformer with a sequence-classification head.

Trained once, kept, and compressed many times. The settings that matter on a
2-core CPU (see params.yaml): max_seq_len 64, batch 32, AdamW 5e-5, 6% warm-up
then linear decay, clipping 1.0, 2 epochs, length-grouped batches.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shrinkflow.arch import check_checkpoint, family, logits_linear
from shrinkflow.config import LocalModel, TrainParams
from shrinkflow.errors import DataError, ModelError
from shrinkflow.labels import BUILTIN_LABELS
from shrinkflow.modeling import build_model, checkpoint_dir, load_checkpoint, load_tokenizer, model_labels, \
    tokenizer_path


@dataclass
class TrainResult:
    best_epoch: int
    best_val_accuracy: float
    val_accuracy_by_epoch: list[float] = field(default_factory=list)
    train_loss_by_epoch: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    num_parameters: int = 0
    # False: a checkpoint already fine-tuned for the task, only measured.
    fine_tuned: bool = True


def length_grouped_batches(lengths: list[int], batch_size: int, chunk_batches: int,
                           rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, sort by length within chunks of ``chunk_batches`` batches, then
    shuffle the batch order.

    Batches hold similar lengths (little padding), while the chunking and the
    final shuffle keep the order random enough for SGD.
    """
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort([lengths[i] for i in part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def random_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _pad(seqs: list[list[int]]):
    """Right-pad token id lists into (ids, mask) long tensors [batch, longest].

    Pads with id 0 whatever the family's pad id: the mask hides padded
    positions, and MPNet/RoBERTa count position ids from the left over
    non-pad tokens, so real tokens get the same positions and logits.
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    return ids, mask


def evaluate_accuracy(model, seqs: list[list[int]], labels: np.ndarray, batch_size: int = 64) -> float:
    import torch

    model.eval()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = _pad([seqs[i] for i in idx])
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
            correct += int((pred == labels[idx]).sum())
    return correct / max(1, len(seqs))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_label_ids(frames: dict[str, pd.DataFrame], labels) -> None:
    """Every split's ``label`` is a class id in [0, len(labels)); DataError naming the split if not."""
    for name, df in frames.items():
        y = df["label"].to_numpy()
        bad = sorted({int(v) for v in y if not 0 <= int(v) < len(labels)})
        if bad:
            raise DataError(f"{name} split: class ids {bad[:10]} outside 0..{len(labels) - 1} for the "
                            f"{len(labels)} labels {list(labels)}; re-run the data stage (dvc repro data)")


def check_model_spec(params: TrainParams) -> None:
    """A local checkpoint is checked (architecture, safetensors) before
    anything is built from it, tokenizer included: params validation checks it
    only when the directory was readable then."""
    if isinstance(params.model, LocalModel):
        check_checkpoint(checkpoint_dir(params.model))


def check_max_seq_len(model, max_seq_len: int) -> None:
    """Refuse a ``train.max_seq_len`` beyond the model's position table.

    MPNet and RoBERTa number positions from pad id + 1, so they hold
    ``max_position_embeddings - pad_token_id - 1`` tokens.
    """
    config = model.config
    limit = config.max_position_embeddings
    if family(model).model_type in ("mpnet", "roberta"):
        limit -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    if max_seq_len > limit:
        raise ModelError(f"train.max_seq_len {max_seq_len} is longer than this {config.model_type} model's "
                         f"{limit} positions; set train.max_seq_len <= {limit}")


def train_teacher(train_df: pd.DataFrame, val_df: pd.DataFrame, params: TrainParams,
                  progress: bool = True, labels=BUILTIN_LABELS):
    """Fine-tune and return (best model, tokenizer, TrainResult).

    ``labels``: the class names in id order (``read_labels(LABELS_JSON)``);
    the model gets one logit per label. The model returned is the epoch with
    the best val accuracy (ties: earliest).
    """
    import torch

    labels = tuple(labels)
    check_label_ids({"train": train_df, "val": val_df}, labels)
    check_model_spec(params)
    torch.set_num_threads(params.threads)
    seed_everything(params.seed)
    tok = load_tokenizer(tokenizer_path(params.model), params.max_seq_len)
    model = build_model(params.model, vocab_size=tok.get_vocab_size(), labels=labels)
    check_max_seq_len(model, params.max_seq_len)
    model, result = train_classifier(model, tok, train_df, val_df, params, progress)
    return model, tok, result


def split_accuracy(model, tok, df: pd.DataFrame) -> float:
    """Accuracy (a fraction) of torch ``model`` on ``df`` (text, label as
    class ids), tokenized with ``tok`` (left with its batch padding on)."""
    tok.no_padding()
    seqs = [e.ids for e in tok.encode_batch(df["text"].tolist())]
    load_tokenizer_padding(tok)
    return evaluate_accuracy(model, seqs, df["label"].to_numpy())


def average_retrained_teacher(model, tok, kept_dir, keep: float, val_df: pd.DataFrame,
                              val_accuracy_before: float) -> dict:
    """A retrain's new teacher ``model`` averaged in place with the kept
    teacher at ``kept_dir`` (a shrinkflow torch model directory:
    ``average_with_kept``, ``keep`` its share), measured on val after;
    ``val_accuracy_before``: the fine-tuned teacher's val accuracy
    (``TrainResult.best_val_accuracy``, measured by the training loop).
    Returns the ``KeptTeacherAverage`` fields. Raises ModelError as
    ``average_with_kept`` does, FileNotFoundError when ``kept_dir`` is not a
    model directory."""
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.modeling import load_torch_model

    tensors = average_with_kept(model, load_torch_model(kept_dir), keep)["tensors"]
    return {"keep_share": keep, "kept_teacher": content_hash(file_hashes(kept_dir)), "tensors": tensors,
            "val_accuracy_before": round(val_accuracy_before, 6), "val_accuracy_after": round(split_accuracy(model, tok, val_df), 6)}


def average_with_kept(model, kept, keep: float) -> dict:
    """Weight-space ensembling of a retrained teacher with the teacher it
    replaces (WiSE-FT: Wortsman et al., "Robust fine-tuning of zero-shot
    models", CVPR 2022): every floating-point tensor of ``model``'s state
    becomes ``(1 - keep) * model + keep * kept``, in place. Both must be
    fine-tuned from the same checkpoint (``train.model``): the same
    architecture, tensors and classes in the same order. ``keep`` 0 leaves
    ``model`` as it is. Returns ``{"tensors": n averaged}``. Raises
    ValueError for ``keep`` outside [0, 1), ModelError when the two have other
    classes or other tensors or shapes."""
    import torch

    if not 0.0 <= keep < 1.0:
        raise ValueError(f"keep must be in [0, 1), got {keep}")
    if model_labels(model) != model_labels(kept):
        raise ModelError(f"the kept teacher's classes {list(model_labels(kept))} are not the retrained "
                         f"teacher's {list(model_labels(model))}: their weights cannot be averaged")
    mine, theirs = model.state_dict(), kept.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ModelError("the kept teacher is not the retrained teacher's architecture (other tensors or "
                         "shapes): their weights cannot be averaged; set train.retrain_keep_share: 0")
    if keep == 0.0:
        return {"tensors": 0}
    n = 0
    with torch.no_grad():
        for k, t in mine.items():
            if t.is_floating_point():
                t.lerp_(theirs[k].to(t.dtype), keep)
                n += 1
    return {"tensors": n}


def align_to_labels(model, labels) -> None:
    """Make a fine-tuned classifier's logits follow ``labels`` (sorted class ids).

    Its ``config.id2label`` must name the same set (whitespace stripped); a
    different order is fixed by permuting the rows of the classifier's last
    Linear (weights and bias), so logit i is class i's. Raises DataError listing
    both sets when they differ.
    """
    import torch

    labels = tuple(labels)
    own = tuple(s.strip() for s in model_labels(model))
    if set(own) != set(labels) or len(own) != len(labels):
        raise DataError(f"the checkpoint's id2label names {sorted(own)} but the data's labels are "
                        f"{sorted(labels)}; with train.fine_tune: false they must be the same set "
                        "(or set fine_tune: true to train a new head)")
    if own != labels:
        order = torch.tensor([own.index(name) for name in labels], dtype=torch.long)
        head = logits_linear(model)
        with torch.no_grad():
            head.weight.copy_(head.weight[order].clone())
            if head.bias is not None:
                head.bias.copy_(head.bias[order].clone())
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}


def measure_teacher(val_df: pd.DataFrame, params: TrainParams, labels):
    """``train.fine_tune: false``: load the already fine-tuned local checkpoint,
    align its classes to ``labels`` (``align_to_labels``) and measure it on val.

    Returns (model, tokenizer, TrainResult with fine_tuned False, best_epoch 0).
    """
    import torch

    labels = tuple(labels)
    check_label_ids({"val": val_df}, labels)
    check_model_spec(params)
    torch.set_num_threads(params.threads)
    tok = load_tokenizer(tokenizer_path(params.model), params.max_seq_len)
    model = load_checkpoint(checkpoint_dir(params.model))
    check_max_seq_len(model, params.max_seq_len)
    align_to_labels(model, labels)
    t0 = time.perf_counter()
    acc = split_accuracy(model, tok, val_df)
    result = TrainResult(best_epoch=0, best_val_accuracy=acc, val_accuracy_by_epoch=[round(acc, 6)],
                         train_seconds=round(time.perf_counter() - t0, 2),
                         num_parameters=sum(p.numel() for p in model.parameters()), fine_tuned=False)
    return model, tok, result


def load_tokenizer_padding(tok) -> None:
    """Re-enable batch padding with the tokenizer's own pad token."""
    from shrinkflow.arch import pad_token

    pad, pad_id = pad_token(tok)
    tok.enable_padding(pad_id=pad_id, pad_token=pad)


def train_classifier(model, tok, train_df: pd.DataFrame, val_df: pd.DataFrame, params: TrainParams,
                     progress: bool = True, desc: str = "train"):
    """The fine-tuning loop shared by the teacher and the small-direct baseline.

    Returns (model at its best val-accuracy epoch, TrainResult). The caller
    seeds the RNGs before building the model (dropout draws continue from there).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    torch.set_num_threads(params.threads)
    # Tokenize once, unpadded; batches are padded to their own longest row.
    tok.no_padding()
    train_seqs = [e.ids for e in tok.encode_batch(train_df["text"].tolist())]
    val_seqs = [e.ids for e in tok.encode_batch(val_df["text"].tolist())]
    load_tokenizer_padding(tok)
    y_train = train_df["label"].to_numpy()
    y_val = val_df["label"].to_numpy()

    rng = np.random.default_rng(params.seed)
    steps_per_epoch = -(-len(train_seqs) // params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    # No weight decay on biases and LayerNorm weights (standard BERT recipe).
    # fused=True: one kernel for all params; the step drops from ~110 ms to
    # ~15 ms for MiniLM on 2 cores (~16% of a training step).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": params.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=params.learning_rate, fused=True)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(params.warmup_fraction * total_steps), total_steps)

    result = TrainResult(best_epoch=-1, best_val_accuracy=-1.0,
                         num_parameters=sum(p.numel() for p in model.parameters()))
    best_state = None
    t0 = time.perf_counter()
    # a bar every 2 s in a terminal; in a log (DVC's output piped, CI) every 30 s, a heartbeat
    # rather than a hundred lines per stage
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress,
               mininterval=2.0 if sys.stderr.isatty() else 30.0)
    for epoch in range(params.epochs):
        model.train()
        lengths = [len(s) for s in train_seqs]
        batches = (length_grouped_batches(lengths, params.batch_size, params.group_chunk_batches, rng)
                   if params.group_by_length else random_batches(len(train_seqs), params.batch_size, rng))
        losses = []
        for idx in batches:
            ids, mask = _pad([train_seqs[i] for i in idx])
            out = model(input_ids=ids, attention_mask=mask, labels=torch.from_numpy(y_train[idx]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
        val_acc = evaluate_accuracy(model, val_seqs, y_val)
        result.val_accuracy_by_epoch.append(round(val_acc, 6))
        result.train_loss_by_epoch.append(round(float(np.mean(losses)), 6))
        bar.write(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}  val accuracy {val_acc:.4f}")
        if val_acc > result.best_val_accuracy:
            result.best_val_accuracy, result.best_epoch = val_acc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    bar.close()
    result.train_seconds = round(time.perf_counter() - t0, 2)
    model.load_state_dict(best_state)
    model.eval()
    return model, result
