"""The "train large, then compress" frontier: does compressing a large model
beat training a small one directly, at the same latency or size?

Pure functions over metrics dicts, plus the I/O-free pieces of the robustness
study; tasks/stages.py does the loading and saving.
"""

from __future__ import annotations

import copy

import numpy as np

from shrinkflow.config import SmallDirectParams


def small_direct_model(teacher, spec: SmallDirectParams):
    """A BERT classifier shaped like the teacher but with ``num_layers`` layers.

    Random weights everywhere, except (init=teacher_embeddings) the embedding
    block, copied from the teacher.
    """
    from transformers import BertForSequenceClassification

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = spec.num_layers
    model = BertForSequenceClassification(config)
    if spec.init == "teacher_embeddings":
        model.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
    return model


def torch_accuracy(model, tok, texts: list[str], labels) -> float:
    from shrinkflow.train import evaluate_accuracy

    tok.no_padding()
    seqs = [e.ids for e in tok.encode_batch(list(texts))]
    return evaluate_accuracy(model, seqs, np.asarray(labels))


def robustness_row(model, tok, texts, labels, sparsities, int8_accuracy: float) -> dict:
    """Accuracy of ``model`` as is, int8, and magnitude-pruned at each sparsity."""
    from shrinkflow.compress.magnitude import magnitude_prune

    base = torch_accuracy(model, tok, texts, labels)
    row = {"fp32": base, "int8": int8_accuracy}
    for s in sparsities:
        row[f"magnitude_{int(round(s * 100))}"] = torch_accuracy(magnitude_prune(copy.deepcopy(model), s),
                                                                 tok, texts, labels)
    return {k: round(v, 6) for k, v in row.items()}


def matched(points: dict[str, dict], reference: dict, key: str, tolerance: float) -> dict[str, dict]:
    """Points whose ``key`` is at most (1 + tolerance) x the reference's: no
    more expensive than the baseline, within tolerance."""
    return {n: m for n, m in points.items() if m[key] <= reference[key] * (1 + tolerance)}


def verdict(candidates: dict[str, dict], baseline_name: str, baseline: dict, tolerance: float) -> list[dict]:
    """For each budget (p95 b1 latency, size): the most accurate compressed-large
    candidate within the small-direct baseline's budget, and the margins."""
    out = []
    for key, label in (("latency_ms_p95_b1", "batch-1 p95 latency"), ("size_mb", "size on disk")):
        pool = matched(candidates, baseline, key, tolerance)
        if not pool:
            out.append({"budget": label, "key": key, "winner": None, "baseline": baseline_name})
            continue
        best = max(pool, key=lambda n: (pool[n]["accuracy"], -pool[n][key]))
        m = pool[best]
        out.append({"budget": label, "key": key, "winner": best, "baseline": baseline_name,
                    "winner_value": m[key], "baseline_value": baseline[key],
                    "points_in_domain": round(100 * (m["accuracy"] - baseline["accuracy"]), 2),
                    "points_shifted": round(100 * (m["accuracy_shifted"] - baseline["accuracy_shifted"]), 2)})
    return out


def verdict_sentences(rows: list[dict], tolerance: float) -> list[str]:
    lines = []
    for r in rows:
        if r["winner"] is None:
            lines.append(f"- At the small-direct model's {r['budget']}, no compressed-large candidate fits "
                         f"the budget (+{tolerance:.0%}); no verdict.")
            continue
        beats = "beats" if r["points_in_domain"] > 0 else "does NOT beat"
        lines.append(
            f"- At equal {r['budget']} ({r['winner']}: {r['winner_value']:.3g} vs small-direct "
            f"{r['baseline_value']:.3g}), compressed-large **{beats}** small-direct by "
            f"**{r['points_in_domain']:+.2f} points** in domain and **{r['points_shifted']:+.2f} points** "
            "on the shifted domain (product reviews).")
    return lines


def plot(points: dict[str, dict], baseline_names: set[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (attribute access below)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "latency_ms_p95_b1", "batch-1 p95 latency (ms, log)"),
                           (axes[1], "size_mb", "size on disk (MB, log)")):
        for name, m in points.items():
            small = name in baseline_names
            ax.scatter(m[key], 100 * m["accuracy"], marker="s" if small else "o",
                       color="tab:red" if small else "tab:blue", s=40)
            ax.annotate(name, (m[key], 100 * m["accuracy"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Train large, then compress (blue) vs small-direct (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_markdown(teacher: dict, points: dict[str, dict], baseline_names: set[str], rows: list[dict],
                      robustness: dict[str, dict], spec: SmallDirectParams, tolerance: float) -> str:
    table = ["| model | kind | accuracy | shifted accuracy | p95 b1 ms | b32 ex/s | MB |",
             "|---|---|---|---|---|---|---|"]
    table.append(f"| teacher (fp32, torch) | large, uncompressed | {teacher['accuracy']:.4f} | "
                 f"{teacher['accuracy_shifted']:.4f} | {teacher['latency_ms_p95_b1']:.2f} | "
                 f"{teacher['throughput_eps_b32']:.0f} | {teacher['size_mb']:.1f} |")
    for name, m in sorted(points.items(), key=lambda kv: kv[1]["latency_ms_p95_b1"]):
        kind = "small-direct" if name in baseline_names else "compressed large"
        table.append(f"| {name} | {kind} | {m['accuracy']:.4f} | {m['accuracy_shifted']:.4f} | "
                     f"{m['latency_ms_p95_b1']:.2f} | {m['throughput_eps_b32']:.0f} | {m['size_mb']:.1f} |")
    cols = list(next(iter(robustness.values())))
    rob = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in robustness.items():
        rob.append(f"| {name} | " + " | ".join(
            f"{100 * row[c]:.1f}" + ("" if c == "fp32" else f" ({100 * (row[c] - row['fp32']):+.1f})")
            for c in cols) + " |")
    init = ("random weights except the embedding block, copied from the teacher"
            if spec.init == "teacher_embeddings" else "random weights")
    return "\n".join([
        "# Frontier: train large, then compress vs train small directly", "",
        f"Small-direct baseline: {spec.num_layers} transformer layers of the teacher's width, {init}; "
        f"trained directly on the same train split for {spec.epochs} epochs (lr {spec.learning_rate}), "
        "then vocabulary-pruned and int8-quantized like the compressed candidates, so that both run in "
        "the same runtime at the same shape. It is the fair comparison because it differs from the "
        "distilled student only in how it was obtained: trained small, versus trained large and compressed.",
        "", "## Verdict", "", *verdict_sentences(rows, tolerance), "",
        "## Every model (test split; shifted = product reviews)", "",
        "Every row but the teacher's was measured in this stage, side by side; the teacher's comes "
        "from the validate stage (another run, so compare its latency as a ratio only there).", "",
        *table, "",
        "![frontier](frontier.png)", "",
        "## Robustness to compression", "",
        "Test accuracy (%) of the large teacher and the small-direct model (both fp32, torch) after each "
        "compression, and the change in points. The paper's mechanism: large models lose less.", "", *rob, ""])
