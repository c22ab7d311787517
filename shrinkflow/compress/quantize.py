"""Post-training int8 quantization with ONNX Runtime.

Why ONNX Runtime rather than torch: ``torch.ao.quantization.quantize_dynamic``
is deprecated, and ORT's int8 kernels are faster on CPU; ORT also quantizes
the embedding table (Gather), which dynamic torch quantization leaves fp32
although it is about half of MiniLM's weights.
"""

from __future__ import annotations

from pathlib import Path

from shrinkflow.config import QuantizeStep


def quantize_dynamic_onnx(src: Path, dst: Path, step: QuantizeStep) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] + (["Gather"] if step.quantize_embeddings else [])
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                     per_channel=step.per_channel, op_types_to_quantize=ops)
    tmp.replace(dst)
    return dst
