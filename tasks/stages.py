"""DVC stage commands: ``python -m tasks.stages <stage> [--params params.yaml]``.

Paths here must match dvc.yaml, which is the single truth for each stage's
deps, params and outs. Every stage validates params.yaml on entry.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

RAW = Path("data/raw/source.tar.gz")
PREPARED = Path("data/prepared")
SPLIT_FILES = ("train", "val", "test", "reference", "shifted")
TEACHER = Path("models/teacher")
CANDIDATES = Path("models/candidates")
METRICS_DATA = Path("metrics/data.json")
METRICS_TRAIN = Path("metrics/train.json")
METRICS_VALIDATE = Path("metrics/validate.json")
GATES_JSON = Path("reports/gates.json")
GATES_MD = Path("reports/gates.md")
DEPLOYMENT = Path("deploy/deployment.json")
SMALL_DIRECT = Path("models/small_direct")
METRICS_SMALL_DIRECT = Path("metrics/small_direct.json")
METRICS_FRONTIER = Path("metrics/frontier.json")
FRONTIER_MD = Path("reports/frontier.md")
FRONTIER_PNG = Path("reports/frontier.png")


def cache_dir() -> Path:
    return Path(os.environ.get("SHRINKFLOW_CACHE_DIR", Path.home() / ".cache" / "shrinkflow"))


def read_split(name: str):
    import pandas as pd

    path = PREPARED / f"{name}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the data stage first (dvc repro data)")
    return pd.read_parquet(path)


def save_model_atomically(model, tok, dest: Path, max_seq_len: int) -> None:
    """Write a torch model dir beside ``dest``, then swap it in: a crash never
    leaves a half-written model under the final name."""
    import shutil

    from shrinkflow.modeling import save_torch_model

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_torch_model(model, tok, tmp, max_seq_len)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def fetch(params) -> None:
    from shrinkflow.data import fetch_source

    path = fetch_source(params.data.source, RAW, cache_dir())
    print(f"fetch: {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 verified)")


def data(params) -> None:
    from shrinkflow.data import prepare
    from shrinkflow.io import atomic_write_bytes, write_json

    splits, stats = prepare(RAW, params.data)
    for name in SPLIT_FILES:
        atomic_write_bytes(PREPARED / f"{name}.parquet", splits[name].to_parquet(index=False))
    write_json(METRICS_DATA, stats)
    print("data: " + ", ".join(f"{k}={v}" for k, v in stats.items() if k.startswith("rows_")))


def train(params) -> None:
    from shrinkflow.io import write_json
    from shrinkflow.train import train_teacher

    model, tok, result = train_teacher(read_split("train"), read_split("val"), params.train)
    save_model_atomically(model, tok, TEACHER, params.train.max_seq_len)
    write_json(METRICS_TRAIN, result.__dict__)
    print(f"train: best val accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch}) "
          f"in {result.train_seconds:.0f}s")


def validate(params) -> None:
    from shrinkflow.evaluate import measure_isolated
    from shrinkflow.gates import evaluate_gates, select_candidate
    from shrinkflow.io import atomic_write_text, write_json
    from shrinkflow.report import lifecycle_markdown

    test, shifted_df = read_split("test"), read_split("shifted")
    texts, labels = test["text"].tolist(), test["label"].tolist()
    shifted = (shifted_df["text"].tolist(), shifted_df["label"].tolist())
    lat = params.validate_.latency
    print("validate: measuring teacher (fp32, torch eager)")
    teacher = measure_isolated(TEACHER, texts, labels, lat, shifted).to_dict()
    candidates = {}
    for cand in params.compress.candidates:
        print(f"validate: measuring {cand.name}")
        candidates[cand.name] = measure_isolated(CANDIDATES / cand.name, texts, labels, lat, shifted).to_dict()
    reports = {n: evaluate_gates(n, m, teacher, params.validate_.gates) for n, m in candidates.items()}
    sel = select_candidate(candidates, reports, params.validate_.objective)
    write_json(METRICS_VALIDATE, {"teacher": teacher, "candidates": candidates})
    write_json(GATES_JSON, {"selected": sel.chosen, "best_effort": sel.best_effort, "reason": sel.reason,
                            "candidates": {n: r.to_dict() for n, r in reports.items()}})
    atomic_write_text(GATES_MD, lifecycle_markdown(teacher, candidates, reports, sel.reason, None))
    print(f"validate: {sel.reason}")


def deploy(params) -> None:
    from shrinkflow.gates import GateReport
    from shrinkflow.io import read_json, write_json
    from shrinkflow.lineage import collect_lineage
    from shrinkflow.registry import PromotionRefused, Registry

    gates = read_json(GATES_JSON)
    metrics = read_json(METRICS_VALIDATE)
    chosen = gates["selected"]
    if chosen is None:
        raise PromotionRefused(f"refusing to deploy: {gates['reason']}")
    report = GateReport.from_dict(gates["candidates"][chosen])
    cand = next(c for c in params.compress.candidates if c.name == chosen)
    record = {
        "candidate": chosen,
        "recipe": [s.model_dump(mode="json") for s in cand.recipe],
        "metrics": metrics["candidates"][chosen],
        "teacher_metrics": metrics["teacher"],
        "selection": gates["reason"],
        "lineage": collect_lineage(Path.cwd(), params.digest(), data_out=str(PREPARED / "train.parquet"),
                                   teacher_out=str(TEACHER), unlabelled_dep=params.compress.unlabelled_path),
    }
    registry = Registry(params.deploy.registry_dir)
    promo = registry.promote(CANDIDATES / chosen, report, record)
    write_json(DEPLOYMENT, {"version": promo.version, "created": promo.created, "previous": promo.previous,
                            "candidate": chosen, "registry": str(registry.root),
                            "content_hash": registry.manifest(promo.version)["content_hash"]})
    print(f"deploy: {chosen} is production as {promo.version}"
          + ("" if promo.created else " (identical model already stored)"))


def small_direct(params) -> None:
    from shrinkflow.frontier import small_direct_model
    from shrinkflow.io import write_json
    from shrinkflow.modeling import TOKENIZER, load_tokenizer, load_torch_model
    from shrinkflow.train import seed_everything, train_classifier

    spec = params.frontier.small_direct
    tok = load_tokenizer(TEACHER / TOKENIZER, params.train.max_seq_len)
    seed_everything(spec.seed)
    model = small_direct_model(load_torch_model(TEACHER), spec)
    tp = params.train.model_copy(update={"epochs": spec.epochs, "learning_rate": spec.learning_rate,
                                         "seed": spec.seed})
    model, result = train_classifier(model, tok, read_split("train"), read_split("val"), tp, desc="small-direct")
    save_model_atomically(model, tok, SMALL_DIRECT, params.train.max_seq_len)
    write_json(METRICS_SMALL_DIRECT, result.__dict__)
    print(f"small_direct: best val accuracy {result.best_val_accuracy:.4f} in {result.train_seconds:.0f}s")


def frontier(params) -> None:
    import tempfile

    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import Candidate, QuantizeStep, VocabPruneStep
    from shrinkflow.evaluate import measure_isolated
    from shrinkflow.frontier import frontier_markdown, plot, robustness_row, verdict
    from shrinkflow.io import atomic_write_text, read_json, write_json
    from shrinkflow.modeling import TOKENIZER, load_tokenizer, load_torch_model
    from shrinkflow.runtime import load_predictor, predict_labels

    fp = params.frontier
    test, shifted_df, train = read_split("test"), read_split("shifted"), read_split("train")
    texts, labels = test["text"].tolist(), test["label"].to_numpy()
    shifted = (shifted_df["text"].tolist(), shifted_df["label"].tolist())
    lat = params.validate_.latency
    teacher_metrics = read_json(METRICS_VALIDATE)["teacher"]
    compressed = [c for c in params.compress.candidates if c.recipe]
    sd_name = "small-direct-vocab-int8"
    points: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="shrinkflow-frontier-") as tmp:
        tmp = Path(tmp)
        sd_dir = apply_recipe(SMALL_DIRECT, Candidate(name="sd", recipe=(VocabPruneStep(), QuantizeStep())),
                              tmp / "sd", train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                              threads=params.train.threads, progress=False)
        # Latency moves run to run on a shared machine: measure the baseline
        # and every compressed candidate here, side by side, in one run.
        for name, path in [(sd_name, sd_dir)] + [(c.name, CANDIDATES / c.name) for c in compressed]:
            print(f"frontier: measuring {name}")
            points[name] = measure_isolated(path, texts, labels.tolist(), lat, shifted).to_dict()
        robustness = {}
        for label, src in (("teacher (large)", TEACHER), ("small-direct", SMALL_DIRECT)):
            q = apply_recipe(src, Candidate(name="q", recipe=(QuantizeStep(),)), tmp / f"q-{src.name}",
                             progress=False)
            int8_acc = float((predict_labels(load_predictor(q, params.train.threads), texts) == labels).mean())
            tok = load_tokenizer(src / TOKENIZER, params.train.max_seq_len)
            robustness[label] = robustness_row(load_torch_model(src), tok, texts, labels,
                                               fp.robustness_sparsities, int8_acc)
    rows = verdict({n: m for n, m in points.items() if n != sd_name}, sd_name, points[sd_name],
                   fp.match_tolerance)
    plot({"teacher": teacher_metrics, **points}, {sd_name}, FRONTIER_PNG)
    atomic_write_text(FRONTIER_MD, frontier_markdown(teacher_metrics, points, {sd_name}, rows, robustness,
                                                     fp.small_direct, fp.match_tolerance))
    write_json(METRICS_FRONTIER, {"verdict": rows, "robustness": robustness, "points": points})
    for r in rows:
        print(f"frontier: {r}")


# compress is flows/compress.py: it fans candidates out on a Prefect task runner.
STAGES = {f.__name__: f for f in (fetch, data, train, validate, deploy, small_direct, frontier)}


def main(argv: list[str] | None = None) -> int:
    from shrinkflow.config import ParamsError, load_params
    from shrinkflow.data import DataContractError, DataError
    from shrinkflow.registry import PromotionRefused

    ap = argparse.ArgumentParser(prog="python -m tasks.stages")
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        STAGES[args.stage](params)
    except (DataError, DataContractError, PromotionRefused, FileNotFoundError) as exc:
        print(f"error: {args.stage}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
