"""Unstructured magnitude pruning (one-shot, global)."""

from __future__ import annotations


def encoder_linears(model):
    import torch

    return [m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}."]


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
