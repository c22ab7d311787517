"""Unstructured magnitude pruning (one-shot, global)."""

from __future__ import annotations


def encoder_linears(model):
    """Every Linear of the encoder layers, in module order (shrinkflow.arch)."""
    from shrinkflow.arch import encoder_linear_modules

    return encoder_linear_modules(model)


def magnitude_prune(model, target_sparsity: float):
    """Zero the smallest-|w| fraction of all encoder Linear weights, globally.

    Exactly ``round(target_sparsity * n)`` weights end up zero (ties broken by
    position), so the reported sparsity is the requested one.
    """
    import torch

    layers = encoder_linears(model)
    flat = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    k = int(round(target_sparsity * flat.numel()))
    if k == 0:
        return model
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    drop[torch.argsort(flat, stable=True)[:k]] = True
    start = 0
    with torch.no_grad():
        for m in layers:
            n = m.weight.numel()
            m.weight[drop[start:start + n].view_as(m.weight)] = 0.0
            start += n
    return model


def sparsity(model) -> float:
    layers = encoder_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / sum(m.weight.numel() for m in layers)


def cubic_schedule(target: float, steps: int) -> list[float]:
    """Sparsity after each of ``steps`` steps (Zhu & Gupta, 2017): fast early,
    slow near the target, ending exactly at it."""
    return [target * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def gradual_magnitude_prune(model, seqs, targets, labels, step, threads: int = 2, progress: bool = True):
    """Prune along the cubic schedule, distilling between steps; zeros stay zero."""
    import numpy as np
    import torch

    from shrinkflow.compress.distill import kd_train

    chunks = np.array_split(np.random.default_rng(step.seed).permutation(len(seqs)), step.gradual_steps)
    labels = np.asarray(labels)
    for sparsity_t, chunk in zip(cubic_schedule(step.target_sparsity, step.gradual_steps), chunks):
        magnitude_prune(model, sparsity_t)
        masks = [(m, m.weight != 0) for m in encoder_linears(model)]

        def keep_zeros():
            with torch.no_grad():
                for m, mask in masks:
                    m.weight.mul_(mask)

        kd_train(model, [seqs[i] for i in chunk], np.asarray(targets)[chunk], labels[chunk],
                 epochs=step.recovery_epochs, learning_rate=step.learning_rate, temperature=2.0, alpha_kl=0.5,
                 batch_size=32, warmup_fraction=0.06, seed=step.seed, threads=threads, progress=progress,
                 desc=f"prune {sparsity_t:.0%}", after_step=keep_zeros)
    return model
