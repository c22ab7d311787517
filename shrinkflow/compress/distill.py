"""Distillation into a student built from a subset of the teacher's layers."""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time

import numpy as np

from shrinkflow.arch import encoder_layers, set_encoder_layers
from shrinkflow.config import DistillStep
from shrinkflow.stopping import raise_if_stopped


def make_student(teacher, layers: tuple[int, ...]):
    """A deep copy of the teacher keeping only ``layers`` of its encoder
    (any family in shrinkflow.arch). Raises ValueError for a layer index
    the teacher does not have."""
    import torch

    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if i >= n]
    if bad:
        raise ValueError(f"distill.layers {bad} out of range for a {n}-layer teacher")
    student = copy.deepcopy(teacher)
    kept = encoder_layers(student)
    set_encoder_layers(student, torch.nn.ModuleList(kept[i] for i in layers))
    return student


def hidden_targets(layers: tuple[int, ...], num_teacher_layers: int) -> tuple[int, ...]:
    """The teacher layer whose output student layer k learns to reproduce.

    Student layer k is initialised from teacher layer ``layers[k]`` and stands
    in for the teacher's block ``layers[k] .. layers[k+1] - 1``: it should
    output what the *end* of that block outputs, and the last student layer
    what the teacher's last layer outputs (the classifier reads it). For
    [0, 2, 4] of 6 that is [1, 3, 5] (patient-KD "skip" matching); matching
    [0, 2, 4] instead would pull the last layer away from what the logits need.
    """
    return tuple(nxt - 1 for nxt in layers[1:]) + (num_teacher_layers - 1,)


def teacher_outputs(model, seqs: list[list[int]], hidden_layers: tuple[int, ...] = (), batch_size: int = 64):
    """The model's logits for pre-tokenized sequences (length-sorted batches)
    and, for ``hidden_layers``, each sequence's layer outputs on its real
    tokens: a list of fp16 [len, len(hidden_layers), hidden] tensors.

    One forward pass gives both, so hidden-state matching costs one teacher
    pass per distillation, not one per step. fp16 halves the cache (~0.5 GB
    for the movie split and three layers); its rounding (~1e-3 relative) is
    far below the MSE being minimised.
    """
    import torch

    from shrinkflow.train import _pad

    model.eval()
    out = np.zeros((len(seqs), model.config.num_labels), dtype=np.float32)
    hidden: list = [None] * len(seqs) if hidden_layers else []
    order = np.argsort([len(s) for s in seqs], kind="stable")
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            raise_if_stopped("the teacher's pass")
            idx = order[start:start + batch_size]
            ids, mask = _pad([seqs[i] for i in idx])
            res = model(input_ids=ids, attention_mask=mask, output_hidden_states=bool(hidden_layers))
            out[idx] = res.logits.float().numpy()
            if hidden_layers:
                # hidden_states[0] is the embedding output: layer t is at t + 1.
                stacked = torch.stack([res.hidden_states[t + 1] for t in hidden_layers], dim=2).half()
                for row, i in enumerate(idx):
                    hidden[i] = stacked[row, :len(seqs[i])].clone()
    return out, hidden


def soft_labels(model, seqs: list[list[int]], batch_size: int = 64) -> np.ndarray:
    """The model's logits for pre-tokenized sequences (length-sorted batches)."""
    return teacher_outputs(model, seqs, (), batch_size)[0]


def _pad_hidden(cache: list, idx, width: int):
    """Cached teacher layer outputs of the rows ``idx``, zero-padded to ``width``."""
    import torch

    first = cache[idx[0]]
    out = torch.zeros((len(idx), width) + tuple(first.shape[1:]), dtype=torch.float32)
    for row, i in enumerate(idx):
        out[row, :cache[i].shape[0]] = cache[i]
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


def hidden_loss(student_hidden, teacher_hidden, mask):
    """Mean over student layers of the MSE between each one's output and its
    teacher target, real tokens only.

    ``student_hidden`` is the student's ``hidden_states`` (index 0 is the
    embedding output, so student layer k is at k + 1); ``teacher_hidden`` is
    [batch, seq, n_student_layers, hidden]: target k for student layer k.
    """
    m = mask.unsqueeze(-1).to(student_hidden[0].dtype)
    n = teacher_hidden.shape[2]
    total = 0.0
    for k in range(n):
        diff = (student_hidden[k + 1] - teacher_hidden[:, :, k]) * m
        total = total + diff.pow(2).sum() / (m.sum() * diff.shape[-1])
    return total / n


def int8_fake_quant(weight, per_row: bool, asymmetric: bool = False):
    """``weight`` (a torch tensor: a Linear's ``(out, in)`` weight or an
    embedding table ``(rows, dim)``) rounded to the 8-bit grid ONNX Runtime's
    dynamic quantization stores it on, and back to float.

    Symmetric (a MatMul's weight; a table under ``embedding_scales: row``):
    int8 in [-127, 127] times one scale ``max|w| / 127`` for the whole
    tensor, or per row (a Linear's output channel, ORT's ``per_channel``; a
    table's row). ``asymmetric`` (a table under ``embedding_scales:
    tensor``: ORT quantizes a Gather's table as uint8 with a zero point, a
    helper's finding): ``q = clip(round(w / s) + z, 0, 255)``, ``s = (max(w,
    0) - min(w, 0)) / 255``, ``z = round(-min(w, 0) / s)``, back as ``(q -
    z) * s`` (``onnxruntime.quantization.quant_utils.compute_scale_zp``). A
    zero scale (an all-zero tensor or row) leaves it as it is."""
    import torch

    with torch.no_grad():
        if asymmetric:
            low = torch.clamp(weight.min(), max=0.0).double()
            high = torch.clamp(weight.max(), min=0.0).double()
            scale = ((high - low) / 255.0).float()
            if scale <= 0:
                return weight.clone()
            zero = torch.round(-low.float() / scale)
            q = torch.clamp(torch.round(weight / scale) + zero, 0, 255)
            return (q - zero) * scale
        top = weight.abs().amax(dim=1, keepdim=True) if per_row else weight.abs().max()
        scale = torch.where(top > 0, top / 127.0, torch.ones_like(top))
        return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def int8_targets(student, per_channel: bool, tables: str | None) -> list[tuple[object, bool, bool]]:
    """The student's weights a dynamic int8 build quantizes, each with
    ``int8_fake_quant``'s ``per_row`` and ``asymmetric``: every ``Linear``'s
    weight (ONNX MatMul/Gemm; symmetric, per output channel with
    ``per_channel``), and with ``tables`` every ``Embedding`` table ("tensor":
    asymmetric uint8, one scale, as ORT's Gather quantization; "row":
    symmetric, per row; None: the tables stay fp32). A tensor shared by two
    modules (tied weights) is listed once, by its first module."""
    import torch

    out, seen = [], set()
    for module in student.modules():
        if isinstance(module, torch.nn.Linear):
            spec = (module.weight, per_channel, False)
        elif isinstance(module, torch.nn.Embedding) and tables is not None:
            spec = (module.weight, tables == "row", tables == "tensor")
        else:
            continue
        if id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append(spec)
    return out


class QuantizedForward:
    """Quantization-aware training of the weights: each step's forward and
    backward run on the rounded weights (``int8_fake_quant``) while the
    optimizer updates the float weights they came from, the gradient taken
    through the rounding as if it were the identity (the straight-through
    estimator: Bengio et al., 2013; Jacob et al., "Quantization and Training
    of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR
    2018). Only the weights: ONNX Runtime's dynamic int8 also rounds each
    MatMul's input per call, which this does not simulate.

    Use ``with quantized.rounded():`` around the forward and backward, before
    the optimizer step: the float weights are back when it exits, however
    it exits. ``targets``: ``int8_targets``."""

    def __init__(self, targets: list[tuple[object, bool, bool]]):
        self.targets = targets

    @contextlib.contextmanager
    def rounded(self):
        saved = [w.data for w, _, _ in self.targets]
        try:
            for w, per_row, asymmetric in self.targets:
                w.data = int8_fake_quant(w.data, per_row, asymmetric)
            yield
        finally:
            for (w, _, _), data in zip(self.targets, saved):
                w.data = data


def kd_train(student, seqs: list[list[int]], targets, labels: np.ndarray, *, epochs: int,
             learning_rate: float, temperature: float, alpha_kl: float, batch_size: int,
             warmup_fraction: float, seed: int, threads: int = 2, progress: bool = True,
             log: list | None = None, desc: str = "distill", after_step=None,
             hidden: list | None = None, hidden_weight: float = 0.0, average_last: float = 0.0,
             quantized: QuantizedForward | None = None):
    """Train ``student`` on the teacher's logits ``targets`` (and hard labels).

    Shared by distillation and by structured pruning's recovery phase.
    ``log`` (if given) receives the loss of every step. With ``hidden_weight``
    > 0, student layer k also matches ``hidden[i][:, k]``, the cached teacher
    layer outputs of sequence i (``teacher_outputs``).

    ``average_last`` (a fraction of the steps, 0 <= x < 1): the student ends
    with the mean of its weights after each of the last ``average_last`` of
    the steps instead of the last step's (stochastic weight averaging:
    Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
    Generalization", UAI 2018); 0: the last step's. Raises ValueError with
    ``after_step`` (the mean of masked weights is not masked) or outside [0, 1).

    ``quantized``: each step's forward and backward on the int8-rounded
    weights (``QuantizedForward``); the student ends with its float weights.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from shrinkflow.train import _pad, length_grouped_batches

    if not 0.0 <= average_last < 1.0:
        raise ValueError(f"average_last must be in [0, 1), got {average_last}")
    if average_last and after_step is not None:
        raise ValueError("average_last with after_step: the mean of masked weights is not masked")
    torch.set_num_threads(threads)
    targets = torch.as_tensor(targets)
    student.train()
    rng = np.random.default_rng(seed)
    total = -(-len(seqs) // batch_size) * epochs
    # the steps whose weights are averaged: the last ceil(average_last * total)
    first_averaged = total - math.ceil(average_last * total) if average_last else total
    mean, averaged, done = None, 0, 0
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=learning_rate, fused=True)
    sched = get_linear_schedule_with_warmup(opt, int(warmup_fraction * total), total)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    lengths = [len(s) for s in seqs]
    # a bar every 2 s in a terminal; in a log (DVC's output piped, CI) every 30 s, a heartbeat
    # rather than a hundred lines per stage
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress,
               mininterval=2.0 if sys.stderr.isatty() else 30.0)
    for _ in range(epochs):
        for idx in length_grouped_batches(lengths, batch_size, 50, rng):
            raise_if_stopped(desc)   # the stage was asked to stop: end within one step
            ids, mask = _pad([seqs[i] for i in idx])
            match = hidden_weight > 0 and bool(hidden)
            with quantized.rounded() if quantized is not None else contextlib.nullcontext():
                out = student(input_ids=ids, attention_mask=mask, output_hidden_states=match)
                loss = distill_loss(out.logits, targets[idx], y[idx], temperature, alpha_kl)
                if match:
                    loss = loss + hidden_weight * hidden_loss(out.hidden_states,
                                                              _pad_hidden(hidden, idx, ids.shape[1]), mask)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:  # e.g. re-apply pruning masks
                after_step()
            if log is not None:
                log.append(loss.item())
            done += 1
            if done > first_averaged:
                with torch.no_grad():
                    if mean is None:
                        mean = {k: v.detach().clone().float() for k, v in student.state_dict().items()
                                if v.is_floating_point()}
                    else:
                        state = student.state_dict()
                        for k, m in mean.items():
                            m.add_(state[k].float() - m, alpha=1.0 / (averaged + 1))
                averaged += 1
            bar.update(1)
    bar.close()
    if mean is not None and averaged > 1:
        state = student.state_dict()
        student.load_state_dict({k: mean[k].to(v.dtype) if k in mean else v for k, v in state.items()})
    student.eval()
    return student


def warm_learning_rate(step: DistillStep) -> float:
    """The peak learning rate of a warm re-distillation:
    ``step.warm_start_learning_rate``, or the step's ``learning_rate`` when it is None."""
    return step.learning_rate if step.warm_start_learning_rate is None else step.warm_start_learning_rate


def warm_alpha_kl(step: DistillStep) -> float:
    """The soft-label share of a warm re-distillation's loss:
    ``step.warm_start_alpha_kl``, or the step's ``alpha_kl`` when it is None."""
    return step.alpha_kl if step.warm_start_alpha_kl is None else step.warm_start_alpha_kl


def distill(teacher, seqs: list[list[int]], labels: np.ndarray, step: DistillStep, threads: int = 2,
            progress: bool = True, log: list | None = None, targets: np.ndarray | None = None,
            hidden: list | None = None, student=None, int8: dict | None = None):
    """Return a student distilled from ``teacher`` on pre-tokenized ``seqs``.

    Teacher outputs (logits, and the layer outputs hidden-state matching
    needs) are computed once up front: the teacher is frozen, so recomputing
    them every step or epoch would only cost time. Pass ``targets`` and
    ``hidden`` to reuse outputs computed by the caller.

    ``student``: a warm start (shrinkflow.compress.warm.warm_student), trained
    for ``step.warm_start_epochs`` instead of a new student of
    ``step.layers`` trained for ``step.epochs``.

    ``int8``: with a warm start and ``step.warm_start_quantization_aware``,
    the int8 the recipe's quantize step builds (``{"per_channel": bool,
    "tables": "tensor" | "row" | None}``): the re-distillation trains on
    weights rounded that way (``QuantizedForward``). Raises ValueError when
    the step asks for it and ``int8`` is None.
    """
    import torch

    from shrinkflow.train import seed_everything

    torch.set_num_threads(threads)
    seed_everything(step.seed)
    t0 = time.perf_counter()
    wanted = hidden_targets(step.layers, teacher.config.num_hidden_layers) if step.hidden_weight > 0 else ()
    if targets is None or (wanted and hidden is None):
        targets, hidden = teacher_outputs(teacher, seqs, wanted)
    warm = student is not None
    if not warm:
        student = make_student(teacher, step.layers)
    teacher.eval()
    quantized = None
    if warm and step.warm_start_quantization_aware:
        if int8 is None:
            raise ValueError("warm_start_quantization_aware: the recipe has no quantize step to train against")
        quantized = QuantizedForward(int8_targets(student, int8["per_channel"], int8["tables"]))
    kd_train(student, seqs, targets, labels, epochs=step.warm_start_epochs if warm else step.epochs,
             learning_rate=warm_learning_rate(step) if warm else step.learning_rate,
             temperature=step.temperature, alpha_kl=warm_alpha_kl(step) if warm else step.alpha_kl,
             batch_size=step.batch_size,
             warmup_fraction=step.warmup_fraction, seed=step.seed, threads=threads, progress=progress,
             log=log, desc=f"distill {list(step.layers)}", hidden=hidden, hidden_weight=step.hidden_weight,
             average_last=step.warm_start_average_last if warm else 0.0, quantized=quantized)
    print(f"distill: {len(step.layers)}-layer student{' (warm start)' if warm else ''} in "
          f"{time.perf_counter() - t0:.0f}s")
    return student
