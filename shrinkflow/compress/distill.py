"""Distillation into a student built from a subset of the teacher's layers."""

from __future__ import annotations

import copy
import time

import numpy as np

from shrinkflow.config import DistillStep


def make_student(teacher, layers: tuple[int, ...]):
    """A deep copy of the teacher keeping only ``layers`` of its encoder."""
    import torch

    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if i >= n]
    if bad:
        raise ValueError(f"distill.layers {bad} out of range for a {n}-layer teacher")
    student = copy.deepcopy(teacher)
    student.bert.encoder.layer = torch.nn.ModuleList(student.bert.encoder.layer[i] for i in layers)
    student.config.num_hidden_layers = len(layers)
    return student


def soft_labels(model, seqs: list[list[int]], batch_size: int = 64) -> np.ndarray:
    """The model's logits for pre-tokenized sequences (length-sorted batches)."""
    import torch

    from shrinkflow.train import _pad

    model.eval()
    out = np.zeros((len(seqs), model.config.num_labels), dtype=np.float32)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = _pad([seqs[i] for i in idx])
            out[idx] = model(input_ids=ids, attention_mask=mask).logits.float().numpy()
    return out


def distill_loss(student_logits, teacher_logits, labels, temperature: float, alpha_kl: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels).

    The T^2 factor keeps the soft-label gradients on the same scale as the
    hard-label ones whatever the temperature (Hinton et al., 2015).
    """
    import torch.nn.functional as F

    kl = F.kl_div(F.log_softmax(student_logits / temperature, -1),
                  F.log_softmax(teacher_logits / temperature, -1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits, labels)
    return alpha_kl * temperature ** 2 * kl + (1 - alpha_kl) * ce


def hidden_loss(student_hidden, teacher_hidden, layer_map, mask):
    """Mean over matched layers of the MSE between hidden states, real tokens only.

    hidden_states[0] is the embedding output, so student layer k is at k + 1
    and teacher layer layer_map[k] at layer_map[k] + 1.
    """
    m = mask.unsqueeze(-1).to(student_hidden[0].dtype)
    total = 0.0
    for k, t in enumerate(layer_map):
        diff = (student_hidden[k + 1] - teacher_hidden[t + 1]) * m
        total = total + diff.pow(2).sum() / (m.sum() * diff.shape[-1])
    return total / len(layer_map)


def kd_train(student, seqs: list[list[int]], targets, labels: np.ndarray, *, epochs: int,
             learning_rate: float, temperature: float, alpha_kl: float, batch_size: int,
             warmup_fraction: float, seed: int, threads: int = 2, progress: bool = True,
             log: list | None = None, desc: str = "distill", after_step=None,
             teacher=None, layer_map: tuple[int, ...] = (), hidden_weight: float = 0.0):
    """Train ``student`` on the teacher's logits ``targets`` (and hard labels).

    Shared by distillation and by structured pruning's recovery phase.
    ``log`` (if given) receives the loss of every step. With ``hidden_weight``
    > 0, student layer k also matches teacher layer ``layer_map[k]``.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from shrinkflow.train import _pad, length_grouped_batches

    torch.set_num_threads(threads)
    targets = torch.as_tensor(targets)
    student.train()
    rng = np.random.default_rng(seed)
    total = -(-len(seqs) // batch_size) * epochs
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=learning_rate, fused=True)
    sched = get_linear_schedule_with_warmup(opt, int(warmup_fraction * total), total)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    lengths = [len(s) for s in seqs]
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, mininterval=2.0)
    for _ in range(epochs):
        for idx in length_grouped_batches(lengths, batch_size, 50, rng):
            ids, mask = _pad([seqs[i] for i in idx])
            match = hidden_weight > 0 and teacher is not None
            out = student(input_ids=ids, attention_mask=mask, output_hidden_states=match)
            loss = distill_loss(out.logits, targets[idx], y[idx], temperature, alpha_kl)
            if match:
                with torch.no_grad():
                    t_hidden = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                loss = loss + hidden_weight * hidden_loss(out.hidden_states, t_hidden, layer_map, mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:  # e.g. re-apply pruning masks
                after_step()
            if log is not None:
                log.append(loss.item())
            bar.update(1)
    bar.close()
    student.eval()
    return student


def distill(teacher, seqs: list[list[int]], labels: np.ndarray, step: DistillStep, threads: int = 2,
            progress: bool = True, log: list | None = None, targets: np.ndarray | None = None):
    """Return a student distilled from ``teacher`` on pre-tokenized ``seqs``.

    Teacher logits are computed once up front (offline soft labels): the
    teacher is frozen, so recomputing them every epoch would only cost time.
    """
    import torch

    from shrinkflow.train import seed_everything

    torch.set_num_threads(threads)
    seed_everything(step.seed)
    t0 = time.perf_counter()
    if targets is None:
        targets = soft_labels(teacher, seqs)
    student = make_student(teacher, step.layers)
    teacher.eval()
    kd_train(student, seqs, targets, labels, epochs=step.epochs, learning_rate=step.learning_rate,
             temperature=step.temperature, alpha_kl=step.alpha_kl, batch_size=step.batch_size,
             warmup_fraction=step.warmup_fraction, seed=step.seed, threads=threads, progress=progress,
             log=log, desc=f"distill {list(step.layers)}", teacher=teacher, layer_map=tuple(step.layers),
             hidden_weight=step.hidden_weight)
    print(f"distill: {len(step.layers)}-layer student in {time.perf_counter() - t0:.0f}s")
    return student
