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
# ORT words it two ways: "Please consider to run pre-processing before
# quantization..." (dynamic) and "Please consider pre-processing before
# quantization. See ..." (static).
def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    return not (msg.startswith("Please consider") and "pre-processing before quantization" in msg)


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


def _graph_names(graph, into: set[str]) -> set[str]:
    """Every node, value and initializer name of ``graph`` and its
    subgraphs (If/Loop/Scan bodies), added to ``into``."""
    into.update(t.name for t in graph.initializer)
    into.update(t.values.name for t in graph.sparse_initializer)
    into.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        into.add(node.name)
        into.update(node.input)
        into.update(node.output)
        for sub in _subgraphs(node):
            _graph_names(sub, into)
    return into


def _subgraphs(node) -> list:
    """The graphs a node's attributes hold (an If's branches, a Loop's body)."""
    from onnx import AttributeProto

    subs = []
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            subs.append(a.g)
        elif a.type == AttributeProto.GRAPHS:
            subs.extend(a.graphs)
    return subs


def quantize_embeddings_per_row(model) -> int:
    """Quantize ``model``'s embedding tables to int8 with one scale per table
    row, in place (an ``onnx.ModelProto``, opset 13 or later). A table is a
    2-D float32 initializer ``[rows, width]`` that a top-level Gather reads
    along axis 0 (in a transformer: the word, position and token-type
    tables, and any other table looked up that way, e.g. MPNet's relative
    attention bias). Each such lookup becomes a Gather from the table's int8
    copy, cast to float and multiplied by the looked-up rows' scales
    (symmetric: ``scale[r] = max |table[r]| / 127``; a row whose scale is
    0 in float32, all zeros or every value under about 1e-43, keeps scale
    1 and reads back as zeros). A table read by several lookups is quantized
    once. The fp32 table is removed when nothing else reads it; it is kept
    for any other reader (a node, a subgraph, a graph output). A table that
    is also a graph input (a value a caller may override) is not a constant
    and is left alone. Returns the number of tables quantized.

    Raises ValueError when the graph has no such table (lookups fused
    away, e.g. into EmbedLayerNormalization; float16 tables; tables that
    are all graph inputs, as an export with initializers as inputs leaves
    them), when a table holds NaN or infinity (naming the table and its
    first such rows), or when the default domain's opset is under 13 or
    missing (Unsqueeze takes its axes as an input from 13 on).

    Why: ONNX Runtime quantizes a Gather's table with one scale for the
    whole table (``GatherQuant``; ``per_channel`` does not reach it), so a
    token whose vector is small next to the table's largest keeps few of
    its 255 levels. Per row, every token keeps all of them, for 4 bytes a
    row more."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset < 13:
        raise ValueError(f"embedding_scales: row needs ONNX opset 13 or later; this graph has opset "
                         f"{opset if opset is not None else '(none for the default domain)'}")
    graph = model.graph
    inputs = {v.name for v in graph.input}
    tables = {t.name: t for t in graph.initializer if t.name not in inputs}
    taken = _graph_names(graph, set())

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    def lookup(node):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or not node.input:
            return None
        table = tables.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or len(table.dims) != 2 or 0 in table.dims or axis not in (0, -2)
                or table.data_type != TensorProto.FLOAT):
            return None
        return table

    quantized: dict[str, tuple[str, str]] = {}  # table -> (int8 table, row scales)
    added, nodes = [], []
    axes = None  # one [-1] for every lookup's Unsqueeze
    for node in graph.node:
        table = lookup(node)
        if table is None:
            nodes.append(node)
            continue
        if table.name not in quantized:
            weights = numpy_helper.to_array(table).astype(np.float32)
            bad = np.flatnonzero(~np.isfinite(weights).all(axis=1))
            if bad.size:
                raise ValueError(f"embedding_scales: row: table {table.name!r} holds NaN or infinity in "
                                 f"{bad.size} row(s) (first: {bad[:5].tolist()}); its fp32 model is broken there")
            scale = (np.abs(weights).max(axis=1) / 127.0).astype(np.float32)
            scale[scale == 0] = 1.0  # all zeros, or so small the scale underflows float32
            q = np.clip(np.rint(weights / scale[:, None]), -127, 127).astype(np.int8)
            quantized[table.name] = (fresh(f"{table.name}_int8_rows"), fresh(f"{table.name}_row_scale"))
            added += [numpy_helper.from_array(q, quantized[table.name][0]),
                      numpy_helper.from_array(scale, quantized[table.name][1])]
        int8, scales = quantized[table.name]
        ids, out = node.input[1], node.output[0]
        p = fresh(f"{node.name or table.name}_per_row")
        got, as_float, row_scale, column = (fresh(f"{p}_{x}") for x in ("int8", "float", "scale", "scale_column"))
        if axes is None:
            axes = fresh("per_row_unsqueeze_axes")
            added.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
        nodes += [helper.make_node("Gather", [int8, ids], [got], name=fresh(f"{p}_gather"), axis=0),
                  helper.make_node("Cast", [got], [as_float], name=fresh(f"{p}_cast"), to=TensorProto.FLOAT),
                  helper.make_node("Gather", [scales, ids], [row_scale], name=fresh(f"{p}_gather_scale"), axis=0),
                  helper.make_node("Unsqueeze", [row_scale, axes], [column], name=fresh(f"{p}_unsqueeze")),
                  helper.make_node("Mul", [as_float, column], [out], name=fresh(f"{p}_mul"))]
    if not quantized:
        raise ValueError("embedding_scales: row, but the graph has no embedding table to quantize per row (a 2-D "
                         "float32 initializer, not also a graph input, read by a Gather along axis 0); use "
                         "embedding_scales: tensor")
    del graph.node[:]
    graph.node.extend(nodes)
    # Whatever still reads a table after the rewrite keeps it.
    still = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    for node in graph.node:
        for sub in _subgraphs(node):
            still |= _graph_names(sub, set())
    kept = [t for t in graph.initializer if t.name not in quantized or t.name in still]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    return len(quantized)


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
    try:
        onnx.save(model, str(rows))
    except BaseException:
        rows.unlink(missing_ok=True)
        raise
    return rows, ops


@contextmanager
def _quantizing(src: Path, dst: Path, step: QuantizeStep):
    """Around one ORT quantizer call: yields ``(source, tmp, ops)``, the
    graph to quantize (``_embeddings_source``), the file beside ``dst`` to
    write, and the op types to quantize, with ORT's pre-processing hint
    dropped. On success ``tmp`` becomes ``dst``; either way no copy or
    ``tmp`` is left behind."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    source, ops = _embeddings_source(src, dst, step)
    try:
        with _quiet_preprocess_hint():
            yield source, tmp, ops
        tmp.replace(dst)
    finally:
        if source != Path(src):
            source.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)  # only there when the quantizer or the rename failed


def quantize_dynamic_onnx(src: Path, dst: Path, step: QuantizeStep) -> Path:
    """Dynamic int8 of the ONNX graph ``src`` into ``dst`` (atomically:
    written beside it, then renamed): MatMul and Gemm weights per tensor or,
    with ``step.per_channel``, per output channel; the embedding tables
    (``step.quantize_embeddings``) per tensor by ORT or per row
    (``step.embedding_scales``). Returns ``dst``. Raises ValueError as
    ``quantize_embeddings_per_row`` does."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    # DefaultTensorType: shape inference cannot type the outputs of fused
    # contrib ops (SkipLayerNormalization, BiasGelu); they are all float.
    with _quantizing(src, dst, step) as (source, tmp, ops):
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8,
                         per_channel=step.per_channel, op_types_to_quantize=ops,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
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
    """Static int8 (QDQ) of the ONNX graph ``src`` into ``dst`` (atomically):
    activation ranges from ``calibration`` feeds (MinMax, symmetric);
    MatMul and Gemm weights per tensor or per output channel
    (``step.per_channel``); the embedding tables (``step.quantize_embeddings``)
    by ORT per tensor, or per row (``step.embedding_scales``: a copy of
    ``src`` beside ``dst``, removed after). Returns ``dst``. Raises
    ValueError as ``quantize_embeddings_per_row`` does."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    dst = Path(dst)
    with _quantizing(src, dst, step) as (source, tmp, ops):
        quantize_static(str(source), str(tmp), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        per_channel=step.per_channel, op_types_to_quantize=ops,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "DefaultTensorType": onnx.TensorProto.FLOAT})
    return dst
