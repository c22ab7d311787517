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
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] + (["Gather"] if step.quantize_embeddings else [])
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    # DefaultTensorType: shape inference cannot type the outputs of fused
    # contrib ops (SkipLayerNormalization, BiasGelu); they are all float.
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                     per_channel=step.per_channel, op_types_to_quantize=ops,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    tmp.replace(dst)
    return dst


class _Calibration:
    """Feeds tokenized calibration batches to ORT's static quantizer."""

    def __init__(self, batches: list[dict]):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - ORT calls it only for some methods
        pass


def quantize_static_onnx(src: Path, dst: Path, step: QuantizeStep, calibration: list[dict]) -> Path:
    """Static int8 (QDQ): activation ranges from ``calibration`` feeds (MinMax)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ops = ["MatMul", "Gemm"] + (["Gather"] if step.quantize_embeddings else [])
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    quantize_static(str(src), str(tmp), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=step.per_channel, op_types_to_quantize=ops,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "DefaultTensorType": onnx.TensorProto.FLOAT})
    tmp.replace(dst)
    return dst
