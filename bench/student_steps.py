"""Where a student's accuracy goes: each recipe step scored on its own.

Scores on val and test (1) the teacher with its vocabulary pruned both ways
(``unseen_tokens``: resegment / nearest, min_count 1 and 2), then (2) one
distilled student (DistillStep JSON, default: the params.yaml student's)
in fp32 torch, after vocabulary pruning both ways, exported to ONNX, and in
int8 (per-tensor and per-channel). Writes bench/results/student_steps.{json,md}.

    .venv/bin/python bench/student_steps.py ['{"layers": [0, 2, 4], "alpha_kl": 1.0, ...}']
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path
from _common import RESULTS, ROOT, default_candidate, now_utc, splits, teacher_and_tokenizer



def main() -> None:
    import torch

    from shrinkflow.compress.distill import distill
    from shrinkflow.compress.export import export_onnx
    from shrinkflow.compress.quantize import quantize_dynamic_onnx
    from shrinkflow.compress.texts import encode_unpadded as _encode_unpadded
    from shrinkflow.compress.vocab import kept_token_ids, nearest_kept, prune_embeddings, remap_tokenizer
    from shrinkflow.config import DistillStep, QuantizeStep, load_params
    from shrinkflow.arch import word_embeddings
    from shrinkflow.modeling import TOKENIZER, read_manifest, write_manifest
    from shrinkflow.paths import TEACHER
    from shrinkflow.predictors import load_predictor, predict_labels
    from shrinkflow.train import evaluate_accuracy

    torch.set_num_threads(2)
    fr = splits("train", "val", "test")
    teacher, tok = teacher_and_tokenizer()
    train = fr["train"]["text"].tolist()
    rows: list[dict] = []

    def record(model: str, step: str, scores: dict) -> None:
        rows.append({"model": model, "step": step, **scores})
        print(json.dumps(rows[-1]), flush=True)

    def torch_scores(model, tj) -> dict:
        return {s: round(evaluate_accuracy(model, [x[:64] for x in _encode_unpadded(tj, fr[s]["text"].tolist())],
                                           fr[s]["label"].to_numpy()), 4) for s in ("val", "test")}

    def pruned(model, min_count: int, how: str):
        kept = kept_token_ids(tok, train, min_count)
        near = nearest_kept(word_embeddings(model).weight, kept) if how == "nearest" else None
        return prune_embeddings(copy.deepcopy(model), kept), remap_tokenizer(tok, kept, near)

    record("teacher", "fp32", torch_scores(teacher, tok))
    for how in ("resegment", "nearest"):
        for mc in (1, 2):
            record("teacher", f"vocab {how} min_count {mc}", torch_scores(*pruned(teacher, mc, how)))
    if len(sys.argv) > 1:
        step = DistillStep.model_validate(json.loads(sys.argv[1]))
    else:
        cand = default_candidate(load_params(ROOT / "params.yaml"))
        step = cand.recipe[0]
    student = distill(copy.deepcopy(teacher), _encode_unpadded(tok, train), fr["train"]["label"].to_numpy(),
                      step, progress=False)
    record("student", "fp32", torch_scores(student, tok))
    record("student", "vocab resegment min_count 2", torch_scores(*pruned(student, 2, "resegment")))
    model, tj = pruned(student, 2, "nearest")
    record("student", "vocab nearest min_count 2", torch_scores(model, tj))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        export_onnx(model, d / "model.fp32.onnx", opset=17)
        (d / TOKENIZER).write_text(tj)
        write_manifest(d, "onnx", 64, labels=read_manifest(ROOT / TEACHER)["labels"])
        for name, q in [("onnx fp32", None), ("int8 per-tensor", QuantizeStep()),
                        ("int8 per-channel", QuantizeStep(per_channel=True))]:
            if q is None:
                shutil.copy(d / "model.fp32.onnx", d / "model.onnx")
            else:
                quantize_dynamic_onnx(d / "model.fp32.onnx", d / "model.onnx", q)
            p = load_predictor(d, threads=2)
            record("student", f"vocab nearest 2 + {name}",
                   {s: round(float((predict_labels(p, fr[s]["text"].tolist()) == fr[s]["label"].to_numpy()).mean()), 4)
                    for s in ("val", "test")})
    out = {"measured_at": now_utc(),
           "distill": step.model_dump(mode="json"), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "student_steps.json").write_text(json.dumps(out, indent=2) + "\n")
    t = {s: rows[0][s] for s in ("val", "test")}
    md = ["# Where the student's accuracy goes", "", f"Measured {out['measured_at']}; distill step: "
          f"`{json.dumps(out['distill'])}`. Drops are against the fp32 teacher, in points.", "",
          "| model | step | val | test | val drop | test drop |", "|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['step']} | {r['val']:.4f} | {r['test']:.4f} | {100 * (t['val'] - r['val']):+.2f} | "
           f"{100 * (t['test'] - r['test']):+.2f} |" for r in rows]
    (RESULTS / "student_steps.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
