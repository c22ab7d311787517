"""What fine-tuning a larger teacher costs here: MiniLM-L6 (22M) against
all-mpnet-base-v2 (MPNet, 110M) through ``train.model.kind: local``.

Both teachers are built exactly as the train stage builds them
(``shrinkflow.modeling.build_model``, the data's label set) and take training
steps on the same length-grouped batches of real training sentences,
alternating model by model in rounds (so machine drift hits both alike), at
``train.max_seq_len`` and ``train.batch_size`` from params.yaml. The measured
seconds per step times the steps of a full fine-tune (``train.epochs`` epochs
of the training split) projects the wall time of the train stage; batch-1
forward latency (p50/p95) is measured the same way. Writes
``bench/results/larger_teacher.md`` and ``.json``.

Run in a project whose data stage has run (``data/prepared``):
    python scripts/mpnet_teacher.py
    python bench/larger_teacher.py [--mpnet DIR] [--steps 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mpnet", type=Path, default=Path.home() / ".cache/shrinkflow/teachers/all-mpnet-base-v2")
    ap.add_argument("--steps", type=int, default=12, help="training steps per model per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-iters", type=int, default=40)
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from shrinkflow.config import LocalModel, PretrainedModel, load_params
    from shrinkflow.labels import read_labels
    from shrinkflow.modeling import build_model, load_tokenizer, tokenizer_path
    from shrinkflow.paths import LABELS_JSON, split_path
    from shrinkflow.train import length_grouped_batches

    params = load_params("params.yaml").train
    torch.set_num_threads(params.threads)
    labels = read_labels(LABELS_JSON)
    train = pd.read_parquet(split_path("train"))
    texts, y = train["text"].tolist(), train["label"].to_numpy()
    specs = {"MiniLM-L6 (packaged, 22M)": PretrainedModel(),
             "all-mpnet-base-v2 (kind: local, 110M)": LocalModel(path=str(args.mpnet))}
    models = {}
    for name, spec in specs.items():
        tok = load_tokenizer(tokenizer_path(spec), params.max_seq_len)
        torch.manual_seed(0)
        model = build_model(spec, tok.get_vocab_size(), labels)
        opt = torch.optim.AdamW(model.parameters(), lr=params.learning_rate, fused=True)
        tok.no_padding()
        seqs = [e.ids for e in tok.encode_batch(texts)]
        pad = tok.token_to_id(tok.padding["pad_token"]) if tok.padding else 0
        models[name] = dict(model=model, opt=opt, seqs=seqs, pad=pad or 0,
                            params=sum(p.numel() for p in model.parameters()), step_s=[], lat_ms=[])
    rng = np.random.default_rng(0)
    lengths = [len(s) for s in next(iter(models.values()))["seqs"]]
    batches = list(length_grouped_batches(lengths, params.batch_size, params.group_chunk_batches, rng))

    def pad_batch(seqs, pad):
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        return ids, mask

    b = 0
    for r in range(args.rounds):
        for name, m in models.items():
            m["model"].train()
            for k in range(args.steps):
                idx = batches[(b + k) % len(batches)]
                ids, mask = pad_batch([m["seqs"][i] for i in idx], m["pad"])
                t0 = time.perf_counter()
                out = m["model"](input_ids=ids, attention_mask=mask, labels=torch.from_numpy(y[idx]))
                out.loss.backward()
                m["opt"].step()
                m["opt"].zero_grad(set_to_none=True)
                m["step_s"].append(time.perf_counter() - t0)
            m["model"].eval()
            with torch.inference_mode():
                for i in range(args.latency_iters // args.rounds):
                    ids, mask = pad_batch([m["seqs"][(r * 97 + i * 31) % len(texts)]], m["pad"])
                    t0 = time.perf_counter()
                    m["model"](input_ids=ids, attention_mask=mask)
                    m["lat_ms"].append(1000 * (time.perf_counter() - t0))
        b += args.steps
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n.split(' ')[0]} {np.median(m['step_s']):.2f} s/step" for n, m in models.items()), flush=True)

    steps_full = -(-len(texts) // params.batch_size) * params.epochs
    rows = {}
    for name, m in models.items():
        per = float(np.median(m["step_s"][args.steps // 2:]))  # first steps of round 1 warm up
        rows[name] = {"parameters": m["params"], "median_s_per_step": round(per, 3),
                      "projected_fine_tune_min": round(per * steps_full / 60, 1),
                      "latency_ms_p50_b1": round(float(np.percentile(m["lat_ms"], 50)), 2),
                      "latency_ms_p95_b1": round(float(np.percentile(m["lat_ms"], 95)), 2)}
    small, large = rows.values()
    doc = {"cpu": cpu_model(), "threads": params.threads, "max_seq_len": params.max_seq_len,
           "batch_size": params.batch_size, "epochs": params.epochs, "train_rows": len(texts),
           "steps_full_fine_tune": steps_full, "steps_measured_per_model": args.steps * args.rounds,
           "models": rows, "step_ratio": round(large["median_s_per_step"] / small["median_s_per_step"], 2)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "larger_teacher.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# A larger teacher: what fine-tuning it costs here", "",
             f"`python bench/larger_teacher.py` on {doc['cpu']}, {doc['threads']} threads; the default task "
             f"({len(texts):,} training sentences, {len(labels)} classes), max_seq_len {params.max_seq_len}, "
             f"batch {params.batch_size}, {params.epochs} epochs = {steps_full} steps. "
             f"{args.steps} steps per model per round, {args.rounds} rounds, models alternating.", "",
             "| teacher | parameters | s per training step (median) | projected fine-tune | p50 / p95 batch-1 ms (torch) |",
             "|---|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['median_s_per_step']:.2f} | "
                     f"{r['projected_fine_tune_min']:.0f} min | {r['latency_ms_p50_b1']:.1f} / {r['latency_ms_p95_b1']:.1f} |")
    lines += ["", f"A training step of the larger teacher costs {doc['step_ratio']}x the default teacher's."]
    (RESULTS / "larger_teacher.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
