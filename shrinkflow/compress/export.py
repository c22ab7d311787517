"""Export a torch sequence classifier to ONNX (no pickle, loads in ORT)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

# The TorchScript exporter keeps process-global state (GLOBALS.in_onnx_export)
# and fails if two exports overlap, as they do when the compress sweep builds
# candidates on a thread pool. Exports are seconds long; serialising them
# costs little next to distillation, which still runs in parallel.
_EXPORT_LOCK = threading.Lock()


def _logits_only(model):
    """Wrap a HF model so the graph has plain tensor inputs and one output."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    return LogitsOnly(model)


def export_onnx(model, path: Path, opset: int = 17) -> Path:
    """Export with dynamic batch and sequence axes.

    The TorchScript exporter (dynamo=False) is used because it matches torch
    to ~3e-6 on BERT and needs no extra runtime dependencies.
    """
    import torch

    model.eval()
    wrapper = _logits_only(model)
    example = (torch.ones((2, 8), dtype=torch.long), torch.ones((2, 8), dtype=torch.long))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with _EXPORT_LOCK, torch.inference_mode(), warnings.catch_warnings():
        # Tracing warns where transformers reads a shape as a Python bool
        # (padding and causal-mask checks: constant for an encoder fed its
        # attention mask) and on aten::index with negative indices (none
        # here). What the graph computes is checked, not assumed: against
        # torch when it is fused (``fuse_transformer_graph``), and every
        # candidate's accuracy and teacher agreement by validate. So these
        # are noise in a user's run; nothing else is silenced.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            wrapper, example, str(tmp), input_names=["input_ids", "attention_mask"],
            output_names=["logits"], opset_version=opset, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                          "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}})
    tmp.replace(path)
    return path


def fuse_transformer_graph(path: Path, num_heads: int, hidden_size: int, check_feeds: list[dict],
                           atol: float = 1e-3) -> dict:
    """Rewrite ``path`` in place with ONNX Runtime's transformer fusions.

    ``onnxruntime.transformers.optimizer`` (as for BERT) fuses residual add +
    LayerNorm into SkipLayerNormalization and bias + GELU into BiasGelu:
    fewer, larger kernels per layer. opt_level=0 keeps the fusions graph-level
    only (no ORT-specific pre-optimisation tied to this CPU), so the file
    stays portable. Attention itself is not fused: transformers 5 exports
    attention through SDPA, which the fuser does not recognise, and an eager-
    attention export bakes the example's padding shape into the traced mask
    (logits off by ~0.2 on padded batches, measured), so it is not used.

    Refuses (raises, file untouched) if the fused graph's logits differ from
    the unfused one's by more than ``atol`` on ``check_feeds``. Returns the
    count of each fused operator.
    """
    import logging

    import numpy as np
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.fused")
    model = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                           opt_level=0)
    model.save_model_to_file(str(tmp))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        before = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        after = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
        worst = 0.0
        for feed in check_feeds:
            a = before.run(["logits"], feed)[0]
            b = after.run(["logits"], feed)[0]
            worst = max(worst, float(np.abs(a - b).max()))
        if worst > atol:
            raise RuntimeError(f"fused graph's logits differ by {worst:.3g} > {atol} from the unfused graph")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}
