"""Try student recipes: build each from the kept teacher, score it on val,
test and the shifted domain, and record its build time.

Used to choose the default student in params.yaml (docs/compression.md:
"Choosing the default student"). A step's keys left out take DistillStep's
defaults of the day (see bench/results/README.md). Recipes are given as JSON, {name: [step, ...]}:

    .venv/bin/python bench/students.py '{"l024-lr2e4": [{"method": "distill", "layers": [0, 2, 4],
        "learning_rate": 2e-4}, {"method": "vocab_prune", "min_count": 2}, {"method": "quantize"}]}'

Appends one JSON line per recipe to bench/results/students.jsonl. Must run
under ``if __name__ == "__main__"``: nothing here spawns, but the measuring
helpers elsewhere do.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from _common import RESULTS, ROOT, now_utc, splits



def main() -> None:

    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import Candidate
    from shrinkflow.paths import TEACHER
    from shrinkflow.predictors import load_predictor, predict_labels

    frames = splits("train", "val", "test", "shifted")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shrinkflow-students-") as tmp:
        for name, recipe in json.loads(sys.argv[1]).items():
            cand = Candidate.model_validate({"name": name, "recipe": recipe})
            t0 = time.perf_counter()
            out = apply_recipe(ROOT / TEACHER, cand, Path(tmp) / name, train_texts=frames["train"]["text"].tolist(),
                               train_labels=frames["train"]["label"].to_numpy(), threads=2, progress=False,
                               unlabelled_texts=[])
            row = {"name": name, "recipe": recipe, "build_s": round(time.perf_counter() - t0),
                   "measured_at": now_utc()}
            pred = load_predictor(out, threads=2)
            for s in ("val", "test", "shifted"):
                row[s] = round(float((predict_labels(pred, frames[s]["text"].tolist())
                                      == frames[s]["label"].to_numpy()).mean()), 4)
            with open(RESULTS / "students.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
