"""Post-training int8 quantization with ONNX Runtime.

Why ONNX Runtime rather than torch: ``torch.ao.quantization.quantize_dynamic``
is deprecated, and ORT's int8 kernels are faster on CPU; ORT also quantizes
the embedding table (Gather), which dynamic torch quantization leaves fp32
although it is about half of MiniLM's weights.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from shrinkflow.config import QuantizeStep

# ORT's quantizers log this on the root logger for every model that has not
# been through ``onnxruntime.quantization.shape_inference.quant_pre_process``.
# shrinkflow does not run it: it would rewrite the exported (and, where the
# recipe asks, fused and checked) graph before quantization; validate's gates
# measure the quantized graph as built. The hint is dropped so it does not read as a fault.
_PREPROCESS_HINT = "Please consider to run pre-processing before quantization"


def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_PREPROCESS_HINT)


@contextmanager
def _quiet_preprocess_hint():
    """Drop ORT's pre-processing hint from the root logger for the duration
    (the filter is removed after, whatever happens)."""
    root = logging.getLogger()
    root.addFilter(_drop_preprocess_hint)
    try:
        yield
    finally:
        root.removeFilter(_drop_preprocess_hint)


def quantize_embeddings_per_row(model) -> int:
    """Quantize ``model``'s embedding tables to int8 with one scale per row,
    in place (an ``onnx.ModelProto``). An embedding lookup is a Gather along
    axis 0 from a 2-D float32 initializer ``[rows, width]`` (the word,
    position and token-type tables); each becomes a Gather from an int8 copy
    of the table, cast to float and multiplied by the looked-up rows' scales
    (symmetric: ``scale[r] = max |table[r]| / 127``, an all-zero row scale 1).
    Returns the number of tables quantized. Raises ValueError when the graph
    has none (a graph whose lookups were fused away, e.g. into
    EmbedLayerNormalization).

    Why: ONNX Runtime quantizes a Gather's table with one scale for the whole
    table (``GatherQuant``; ``per_channel`` does not reach it), so a token
    whose vector is small next to the table's largest keeps few of its 255
    levels. Per row, every token keeps all of them. The rows' scales add
    ``4 * rows`` bytes."""
    from collections import Counter

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    tables = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    nodes, added, dropped = [], [], set()
    for node in graph.node:
        table = tables.get(node.input[0]) if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(table.dims) != 2 or table.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        weights = numpy_helper.to_array(table).astype(np.float32)
        scale = np.abs(weights).max(axis=1) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(weights / scale[:, None]), -127, 127).astype(np.int8)
        name, ids, out = table.name, node.input[1], node.output[0]
        p = f"{node.name or name}_per_row"
        added += [numpy_helper.from_array(q, f"{name}_int8_rows"),
                  numpy_helper.from_array(scale.astype(np.float32), f"{name}_row_scale"),
                  numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}_axes")]
        nodes += [helper.make_node("Gather", [f"{name}_int8_rows", ids], [f"{p}_int8"], name=f"{p}_gather", axis=0),
                  helper.make_node("Cast", [f"{p}_int8"], [f"{p}_float"], name=f"{p}_cast", to=TensorProto.FLOAT),
                  helper.make_node("Gather", [f"{name}_row_scale", ids], [f"{p}_scale"], name=f"{p}_gather_scale",
                                   axis=0),
                  helper.make_node("Unsqueeze", [f"{p}_scale", f"{p}_axes"], [f"{p}_scale_1"], name=f"{p}_unsqueeze"),
                  helper.make_node("Mul", [f"{p}_float", f"{p}_scale_1"], [out], name=f"{p}_mul")]
        uses[name] -= 1
        if uses[name] == 0:
            dropped.add(name)
    if not added:
        raise ValueError("embedding_scales: row, but the graph has no embedding lookup (a Gather from a 2-D float "
                         "table) to quantize per row")
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    inputs = [i for i in graph.input if i.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
    return len(added) // 3


def _embeddings_source(src: Path, dst: Path, step: QuantizeStep) -> tuple[Path, list[str]]:
    """The graph ORT quantizes for ``step``, and the op types it quantizes:
    ``src`` itself, or (``embedding_scales: row``) a copy beside ``dst``
    with its embedding tables quantized per row (``quantize_embeddings_per_row``),
    Gather then left out of ORT's ops. The caller removes a copy."""
    import onnx

    per_row = step.quantize_embeddings and step.embedding_scales == "row"
    ops = ["MatMul", "Gemm"] + (["Gather"] if step.quantize_embeddings and not per_row else [])
    if not per_row:
        return Path(src), ops
    model = onnx.load(str(src))
    quantize_embeddings_per_row(model)
    rows = dst.with_name(f".{dst.name}.rows.onnx")
    onnx.save(model, str(rows))
    return rows, ops


def quantize_dynamic_onnx(src: Path, dst: Path, step: QuantizeStep) -> Path:
    """Dynamic int8 of the ONNX graph ``src`` into ``dst`` (atomically:
    written beside it, then renamed): MatMul and Gemm weights per tensor or,
    with ``step.per_channel``, per output channel; the embedding tables
    (``step.quantize_embeddings``) per tensor by ORT or per row
    (``step.embedding_scales``). Returns ``dst``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    source, ops = _embeddings_source(src, dst, step)
    # DefaultTensorType: shape inference cannot type the outputs of fused
    # contrib ops (SkipLayerNormalization, BiasGelu); they are all float.
    try:
        with _quiet_preprocess_hint():
            quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8,
                             per_channel=step.per_channel, op_types_to_quantize=ops,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        if source != Path(src):
            source.unlink(missing_ok=True)
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

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    source, ops = _embeddings_source(src, dst, step)
    try:
        with _quiet_preprocess_hint():
            quantize_static(str(source), str(tmp), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            per_channel=step.per_channel, op_types_to_quantize=ops,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        if source != Path(src):
            source.unlink(missing_ok=True)
    tmp.replace(dst)
    return dst
