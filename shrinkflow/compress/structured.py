"""Structured pruning: drop whole attention heads and FFN neurons.

Unlike magnitude pruning, the result is physically smaller dense matrices,
so it is faster on any CPU kernel. Importance is first-order Taylor
(Molchanov et al., 2019): for a group of weights (a head's Q/K/V rows and
output columns, or an FFN neuron's row and column), the squared sum of
gradient x weight over a few batches estimates the loss change if the group
were removed.
"""

from __future__ import annotations

import numpy as np

from shrinkflow.arch import attention_heads, attn_out_linear, encoder_layers, ffn_linears, qkv_linears, \
    set_layer_linears
from shrinkflow.stopping import raise_if_stopped


def importance(model, seqs: list[list[int]], labels: np.ndarray, batches: int, batch_size: int = 32,
               seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(head scores per layer, neuron scores per layer); higher = keep."""
    import torch

    from shrinkflow.train import _pad

    layers = encoder_layers(model)
    heads = [np.zeros(qkv_linears(model, l)[0].out_features // attention_heads(model, l)[1]) for l in layers]
    neurons = [np.zeros(ffn_linears(model, l)[0].out_features) for l in layers]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(seqs))
    model.eval()  # no dropout: the scores should not depend on which units dropout hit
    for b in range(min(batches, -(-len(seqs) // batch_size))):
        raise_if_stopped("pruning's importance scores")
        idx = order[b * batch_size:(b + 1) * batch_size]
        ids, mask = _pad([seqs[i] for i in idx])
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=torch.from_numpy(np.asarray(labels)[idx]))
        out.loss.backward()
        for li, layer in enumerate(layers):
            h = attention_heads(model, layer)[1]
            gw = sum((m.weight.grad * m.weight).sum(1) + m.bias.grad * m.bias for m in qkv_linears(model, layer))
            o = attn_out_linear(model, layer)
            gw = gw + (o.weight.grad * o.weight).sum(0)
            heads[li] += gw.detach().view(-1, h).sum(1).pow(2).numpy()
            i, d = ffn_linears(model, layer)
            gn = (i.weight.grad * i.weight).sum(1) + i.bias.grad * i.bias + (d.weight.grad * d.weight).sum(0)
            neurons[li] += gn.detach().pow(2).numpy()
    model.zero_grad(set_to_none=True)
    return heads, neurons


def _slice_linear(linear, keep, dim: int):
    import torch

    keep_t = torch.as_tensor(keep, dtype=torch.long)
    w = linear.weight.detach().index_select(dim, keep_t).clone()
    b = linear.bias.detach().clone() if dim == 1 else linear.bias.detach().index_select(0, keep_t).clone()
    new = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    return new


def prune_layer(model, layer, keep_heads: list[int], keep_neurons: list[int]) -> None:
    """Physically remove the heads and FFN neurons not listed from one of
    ``model``'s encoder layers, in place."""
    h = attention_heads(model, layer)[1]
    rows = [hd * h + j for hd in sorted(keep_heads) for j in range(h)]
    q, k, v = (_slice_linear(m, rows, 0) for m in qkv_linears(model, layer))
    out = _slice_linear(attn_out_linear(model, layer), rows, 1)
    keep_neurons = sorted(keep_neurons)
    f_in, f_out = ffn_linears(model, layer)
    set_layer_linears(model, layer, q, k, v, out, _slice_linear(f_in, keep_neurons, 0),
                      _slice_linear(f_out, keep_neurons, 1), num_heads=len(keep_heads))


def structured_prune(model, head_scores, neuron_scores, heads_keep_fraction: float,
                     ffn_keep_fraction: float):
    """Keep the top fraction of heads and neurons in every layer (at least one)."""
    for layer, hs, ns in zip(encoder_layers(model), head_scores, neuron_scores):
        n_heads = max(1, int(round(heads_keep_fraction * len(hs))))
        n_neurons = max(1, int(round(ffn_keep_fraction * len(ns))))
        prune_layer(model, layer, list(np.argsort(-hs, kind="stable")[:n_heads]),
                    list(np.argsort(-ns, kind="stable")[:n_neurons]))
    return model
