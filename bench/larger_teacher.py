"""A larger teacher, measured: MiniLM-L6 (22M, the default) against
all-mpnet-base-v2 (MPNet, 110M) through ``train.model.kind: local``.

``cost``: what fine-tuning each costs here (below). ``compare``: whether the
larger teacher compresses to a better student at equal batch-1 latency, the
central claim of Li et al., "Train Big, Then Compress" (ICML 2020).

Both teachers are built exactly as the train stage builds them
(``shrinkflow.modeling.build_model``, the data's label set) and take training
steps on the same length-grouped batches of real training sentences,
alternating model by model in rounds (so machine drift hits both alike), at
``train.max_seq_len`` and ``train.batch_size`` from params.yaml. The measured
seconds per step times the steps of a full fine-tune (``train.epochs`` epochs
of the training split) projects the wall time of the train stage; batch-1
forward latency (p50/p95) is measured the same way. Writes
``bench/results/larger_teacher.md`` and ``.json``.

``compare`` reads two projects on the same data: the default one (its
teacher, its students, its small-direct baseline) and one run with
``params/mpnet.yaml`` (the MPNet teacher, with students of one and two of its
twelve 768-wide layers: a 768-wide layer costs about four 384-wide ones).
Every model is measured here, side by side: predictions on val, test and the
shifted domain, then batch-1 and batch-32 latency in interleaved rounds
(``shrinkflow.evaluate.measure_interleaved``, the validate stage's own
measurement). The verdict follows the frontier's rule: among the larger
teacher's students whose p95 batch-1 latency is within ``frontier.match_tolerance``
of the default student's, the one most accurate on *val*; its paired accuracy
difference with the default student on test and shifted (95% interval).
Writes ``bench/results/larger_teacher_compare.json``; ``cost`` writes
``larger_teacher_cost.json``; both re-render ``larger_teacher.md``.

Run in a project whose data stage has run (``data/prepared``):
    python scripts/mpnet_teacher.py
    python bench/larger_teacher.py cost [--mpnet DIR] [--steps 12] [--rounds 3]
    # in a clone: shrinkflow run --params params/mpnet.yaml && dvc repro frontier
    python bench/larger_teacher.py compare --default . --large ../clone
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
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cost", help="seconds per fine-tuning step and batch-1 latency of both teachers")
    c.add_argument("--mpnet", type=Path, default=Path.home() / ".cache/shrinkflow/teachers/all-mpnet-base-v2")
    c.add_argument("--steps", type=int, default=12, help="training steps per model per round")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--latency-iters", type=int, default=40)
    m = sub.add_parser("compare", help="students of both teachers at equal latency")
    m.add_argument("--default", type=Path, default=Path("."), help="project run with the default teacher")
    m.add_argument("--large", type=Path, required=True, help="project run with params/mpnet.yaml")
    args = ap.parse_args(argv)
    if args.command == "compare":
        return compare(args.default.resolve(), args.large.resolve())
    return cost(args)


def cost(args) -> int:
    from shrinkflow.splits import read_parquet
    import torch

    from shrinkflow.config import LocalModel, PretrainedModel, load_params
    from shrinkflow.labels import read_labels
    from shrinkflow.modeling import build_model, load_tokenizer, tokenizer_path
    from shrinkflow.paths import LABELS_JSON, split_path
    from shrinkflow.train import length_grouped_batches

    params = load_params("params.yaml").train
    torch.set_num_threads(params.threads)
    labels = read_labels(LABELS_JSON)
    train = read_parquet(split_path("train"))
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
    return save("larger_teacher_cost.json", doc)


def cost_markdown(doc: dict) -> list[str]:
    rows = doc["models"]
    lines = ["## What fine-tuning it costs here", "",
             f"`python bench/larger_teacher.py cost` on {doc['cpu']}, {doc['threads']} threads; the default task "
             f"({doc['train_rows']:,} training sentences), max_seq_len {doc['max_seq_len']}, "
             f"batch {doc['batch_size']}, {doc['epochs']} epochs = {doc['steps_full_fine_tune']} steps. "
             f"{doc['steps_measured_per_model']} steps per model, in rounds, models alternating.", "",
             "| teacher | parameters | s per training step (median) | projected fine-tune | p50 / p95 batch-1 ms (torch) |",
             "|---|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['parameters'] / 1e6:.1f}M | {r['median_s_per_step']:.2f} | "
                     f"{r['projected_fine_tune_min']:.0f} min | {r['latency_ms_p50_b1']:.1f} / {r['latency_ms_p95_b1']:.1f} |")
    lines += ["", f"A training step of the larger teacher costs {doc['step_ratio']}x the default teacher's."]
    return lines


def _students(project: Path, params) -> list[str]:
    """The project's candidates whose recipe distils a student."""
    return [c.name for c in params.compress.candidates
            if any(step.method == "distill" for step in c.recipe) and (project / "models/candidates" / c.name).is_dir()]


def compare(default: Path, large: Path) -> int:
    """Both teachers, their students and the default small-direct baseline,
    measured side by side here; see the module docstring."""
    import tempfile

    from shrinkflow.splits import read_parquet

    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import Candidate, QuantizeStep, VocabPruneStep, load_params
    from shrinkflow.evaluate import measure_interleaved
    from shrinkflow.files import sha256_file
    from shrinkflow.labels import read_labels
    from shrinkflow.stats import paired_accuracy_drop, quality

    pd_, pl = load_params(default / "params.yaml"), load_params(large / "params.yaml")
    splits = ("train", "val", "test", "shifted")
    for name in [f"data/prepared/{s}.parquet" for s in splits] + ["data/prepared/labels.json"]:
        if sha256_file(default / name) != sha256_file(large / name):
            raise SystemExit(f"{name} differs between {default} and {large}: the two runs must share the data")
    classes = read_labels(default / "data/prepared/labels.json")
    frames = {s: read_parquet(default / f"data/prepared/{s}.parquet") for s in splits}
    texts = {s: frames[s]["text"].tolist() for s in ("val", "test", "shifted")}
    labels = {s: frames[s]["label"].to_numpy() for s in ("val", "test", "shifted")}
    small_students, large_students = _students(default, pd_), _students(large, pl)
    if not small_students or not large_students:
        raise SystemExit("each project needs at least one built student (models/candidates/<name>)")
    ref = small_students[0]
    train_m = {p: json.loads((p / "metrics/train.json").read_text()) for p in (default, large)}
    compress_m = {p: json.loads((p / "metrics/compress.json").read_text())["candidates"] for p in (default, large)}
    with tempfile.TemporaryDirectory(prefix="shrinkflow-larger-") as tmp:
        sd = None
        if (default / "models/small_direct").is_dir():
            sd = apply_recipe(default / "models/small_direct",
                              Candidate(name="sd", recipe=(VocabPruneStep(), QuantizeStep())), Path(tmp) / "sd",
                              train_texts=frames["train"]["text"].tolist(),
                              train_labels=frames["train"]["label"].to_numpy(), threads=pd_.train.threads,
                              progress=False)
        models = {"MiniLM-L6 teacher": (default / "models/teacher", "teacher", default),
                  **{f"MiniLM {n}": (default / "models/candidates" / n, "student", default) for n in small_students},
                  "MPNet teacher": (large / "models/teacher", "teacher", large),
                  **{f"MPNet {n}": (large / "models/candidates" / n, "student", large) for n in large_students}}
        if sd is not None:
            models["small-direct-vocab-int8 (MiniLM-shaped, no teacher)"] = (sd, "baseline", default)
        runs = measure_interleaved({k: v[0] for k, v in models.items()}, texts, texts["val"],
                                   pd_.validate_.latency, log=lambda m: print(f"compare: {m}", flush=True))
    rows = {}
    for name, (path, role, project) in models.items():
        pred = {s: np.asarray(runs[name]["predictions"][s]) for s in texts}
        q = {s: quality(labels[s], pred[s], classes) for s in texts}
        perf = runs[name]["performance"]
        row = {"role": role, "project": str(project), "path": str(path),
               **{f"accuracy_{s}": round(q[s]["accuracy"], 6) for s in texts},
               **{f"macro_f1_{s}": round(q[s]["macro_f1"], 6) for s in texts},
               "latency_ms_p95_b1": perf["latency_ms_p95_b1"], "latency_ms_p50_b1": perf["latency_ms_p50_b1"],
               "size_mb": perf["size_mb"], "predictions": {s: pred[s].tolist() for s in texts}}
        cand = compress_m[project].get(Path(path).name) if role == "student" else None
        if cand:
            row["build_seconds"] = cand.get("build_seconds")
        if role == "teacher":
            row["train_seconds"] = train_m[project].get("train_seconds")
            row["num_parameters"] = train_m[project].get("num_parameters")
        rows[name] = row
    ref_row = rows[f"MiniLM {ref}"]
    tol = pd_.frontier.match_tolerance
    pool = {n: r for n, r in rows.items() if n.startswith("MPNet ") and r["role"] == "student"
            and r["latency_ms_p95_b1"] <= ref_row["latency_ms_p95_b1"] * (1 + tol)}
    verdict = {"reference": f"MiniLM {ref}", "tolerance": tol, "winner": None}
    if pool:
        best = max(pool, key=lambda n: (pool[n]["accuracy_val"], -pool[n]["latency_ms_p95_b1"], n))
        verdict["winner"] = best
        for s in ("test", "shifted"):
            # "drop" of the MPNet student against the MiniLM one: positive = the larger teacher's student is worse
            verdict[s] = paired_accuracy_drop(labels[s], ref_row["predictions"][s], rows[best]["predictions"][s])
    for r in rows.values():
        r.pop("predictions")
    doc = {"cpu": cpu_model(), "threads": pd_.validate_.latency.threads, "classes": list(classes),
           "n": {s: len(texts[s]) for s in texts}, "models": rows, "verdict": verdict}
    return save("larger_teacher_compare.json", doc)


def compare_markdown(doc: dict) -> list[str]:
    n = doc["n"]
    lines = ["## Does the larger teacher give a better student at equal latency?", "",
             f"`python bench/larger_teacher.py compare` on {doc['cpu']}, {doc['threads']} threads. Every model "
             f"measured here side by side (latency in interleaved rounds); val {n['val']:,}, test {n['test']:,}, "
             f"shifted (product reviews) {n['shifted']:,} sentences. Accuracies in %.", "",
             "| model | p95 / p50 batch-1 ms | size MB | val | test | shifted | macro-F1 test | macro-F1 shifted "
             "| train / build |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in doc["models"].items():
        secs = r.get("train_seconds") if r["role"] == "teacher" else r.get("build_seconds")
        cost = "" if secs is None else (f"train {secs / 60:.1f} min" if r["role"] == "teacher"
                                        else f"build {secs / 60:.1f} min")
        lines.append(f"| {name} | {r['latency_ms_p95_b1']:.2f} / {r['latency_ms_p50_b1']:.2f} | {r['size_mb']:.1f} | "
                     f"{100 * r['accuracy_val']:.2f} | {100 * r['accuracy_test']:.2f} | "
                     f"{100 * r['accuracy_shifted']:.2f} | {100 * r['macro_f1_test']:.2f} | "
                     f"{100 * r['macro_f1_shifted']:.2f} | {cost} |")
    v = doc["verdict"]
    ref = doc["models"][v["reference"]]
    lines.append("")
    if v["winner"] is None:
        lines.append(f"No student of the larger teacher is within {100 * v['tolerance']:.0f}% of {v['reference']}'s "
                     f"p95 batch-1 latency ({ref['latency_ms_p95_b1']:.2f} ms): at this budget the larger "
                     "teacher offers no student to compare.")
        return lines
    w = doc["models"][v["winner"]]
    parts = []
    for s, label in (("test", "in domain (test)"), ("shifted", "on the shifted domain")):
        d = v[s]
        gain = -100 * d["accuracy_drop"]
        lo, hi = -100 * d["accuracy_drop_ci_high"], -100 * d["accuracy_drop_ci_low"]
        parts.append(f"{gain:+.2f} points {label} (95% interval [{lo:+.2f}, {hi:+.2f}], McNemar p = {d['mcnemar_p']:.3g})")
    better = [v[s]["accuracy_drop_ci_high"] < 0 for s in ("test", "shifted")]
    worse = [v[s]["accuracy_drop_ci_low"] > 0 for s in ("test", "shifted")]
    answer = ("Yes" if all(better) else "No" if any(worse) or not any(better) else "Partly")
    lines.append(f"**{answer}.** At equal batch-1 latency (p95 within {100 * v['tolerance']:.0f}%: "
                 f"{w['latency_ms_p95_b1']:.2f} vs {ref['latency_ms_p95_b1']:.2f} ms), the larger teacher's best "
                 f"student on val, {v['winner']}, against {v['reference']}: " + "; ".join(parts) + ".")
    return lines


def save(name: str, doc: dict) -> int:
    """Write one result's JSON under bench/results and re-render the markdown."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(doc, indent=2) + "\n")
    render()
    return 0


def render() -> None:
    """``larger_teacher.md`` from whichever of the two JSON results exist."""
    lines = ["# A larger teacher: all-mpnet-base-v2 (110M) against MiniLM-L6 (22M)", ""]
    for name, fn in (("larger_teacher_compare.json", compare_markdown), ("larger_teacher_cost.json", cost_markdown)):
        if (RESULTS / name).is_file():
            lines += fn(json.loads((RESULTS / name).read_text())) + [""]
    if (RESULTS / "larger_teacher_frontier.md").is_file():
        lines += ["## The larger teacher's own frontier", "",
                  "`dvc repro frontier` in the project run with `params/mpnet.yaml`, against its own small-direct "
                  "baseline (MPNet-shaped, 3 layers x 768): [larger_teacher_frontier.md](larger_teacher_frontier.md).", ""]
    (RESULTS / "larger_teacher.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
