"""Apply a candidate's recipe to the teacher and write the candidate dir."""

from __future__ import annotations

import shutil
from pathlib import Path

from shrinkflow.compress.export import export_onnx
from shrinkflow.compress.quantize import quantize_dynamic_onnx
from shrinkflow.config import Candidate
from shrinkflow.modeling import TOKENIZER, load_torch_model, read_manifest, write_manifest


def apply_recipe(teacher_dir: Path, candidate: Candidate, out_dir: Path, opset: int = 17) -> Path:
    """teacher -> [torch steps] -> ONNX -> [ONNX steps] -> ``out_dir``.

    Built in a sibling temp dir and renamed, so ``out_dir`` is either the
    finished candidate or absent.
    """
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    max_seq_len = read_manifest(teacher_dir)["max_seq_len"]
    work = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = load_torch_model(teacher_dir)
    # (torch-level steps such as distillation and pruning will run here)
    onnx_path = export_onnx(model, work / "model.onnx", opset=opset)
    for step in candidate.recipe:
        if step.method == "quantize":
            fp32 = onnx_path.with_name("model.fp32.onnx")
            onnx_path.replace(fp32)
            quantize_dynamic_onnx(fp32, onnx_path, step)
            fp32.unlink()
        else:  # pragma: no cover - the params schema admits no other method yet
            raise ValueError(f"unknown recipe step {step.method!r}")
    shutil.copyfile(teacher_dir / TOKENIZER, work / TOKENIZER)
    write_manifest(work, "onnx", max_seq_len,
                   recipe=[s.model_dump(mode="json") for s in candidate.recipe],
                   extra={"candidate": candidate.name})
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)
    return out_dir
