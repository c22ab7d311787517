"""Predictors: one interface over torch-eager and ONNX Runtime models.

``load_predictor(dir)`` reads the model's manifest and returns an object with
``predict_logits(texts) -> np.ndarray[B, 2]``. Validation, benchmarks and
(later) serving all go through it, so what is measured is what is served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrinkflow.modeling import TOKENIZER, encode, load_tokenizer, load_torch_model, read_manifest


class TorchPredictor:
    def __init__(self, model_dir: Path, threads: int):
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        manifest = read_manifest(model_dir)
        self.tokenizer = load_tokenizer(Path(model_dir) / TOKENIZER, manifest["max_seq_len"])
        self.model = load_torch_model(model_dir)

    def predict_logits(self, texts: list[str]) -> np.ndarray:
        ids, mask = encode(self.tokenizer, texts)
        with self._torch.inference_mode():
            out = self.model(input_ids=self._torch.from_numpy(ids),
                             attention_mask=self._torch.from_numpy(mask))
        return out.logits.float().numpy()


class OrtPredictor:
    def __init__(self, model_dir: Path, threads: int, spin: bool = True):
        import onnxruntime as ort

        manifest = read_manifest(model_dir)
        self.tokenizer = load_tokenizer(Path(model_dir) / TOKENIZER, manifest["max_seq_len"])
        opts = ort.SessionOptions()
        # Pin threads like torch.set_num_threads, so latencies compare fairly.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # ORT's worker threads spin while waiting for work: the lowest latency
        # for one caller (validation), but on a shared 2-core server they burn
        # the CPU the HTTP loop and the log writer need. serve turns it off.
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}

    def predict_logits(self, texts: list[str]) -> np.ndarray:
        ids, mask = encode(self.tokenizer, texts)
        feed = {"input_ids": ids, "attention_mask": mask}
        return self.session.run(["logits"], {k: v for k, v in feed.items() if k in self._inputs})[0]


def load_predictor(model_dir: Path | str, threads: int = 2, spin: bool = True):
    fmt = read_manifest(Path(model_dir))["format"]
    if fmt == "torch":
        return TorchPredictor(Path(model_dir), threads)
    if fmt == "onnx":
        return OrtPredictor(Path(model_dir), threads, spin)
    raise ValueError(f"{model_dir}: unknown model format {fmt!r}")


def predict_labels(predictor, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Labels for many texts, batched by length so padding stays small."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = predictor.predict_logits([texts[i] for i in idx]).argmax(axis=1)
    return out
