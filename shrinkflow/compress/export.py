"""Export a torch sequence classifier to ONNX (no pickle, loads in ORT)."""

from __future__ import annotations

import threading
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
    with _EXPORT_LOCK, torch.inference_mode():
        torch.onnx.export(
            wrapper, example, str(tmp), input_names=["input_ids", "attention_mask"],
            output_names=["logits"], opset_version=opset, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                          "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}})
    tmp.replace(path)
    return path
