"""Quantization-aware warm re-distillation (``warm_start_quantization_aware``):
the student trains on its weights rounded to exactly the int8 grid ONNX
Runtime's dynamic quantization builds, the optimizer updating the float
weights (straight-through estimator). Tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkflow.config import Candidate, ParamsError, QuantizeStep, VocabPruneStep, parse_params
from tests.test_warm_start import STEP, STUDENT, distil, same_state, state


@pytest.mark.parametrize("per_row", [False, True])
def test_the_fake_int8_grid_is_onnxruntimes(per_row):
    """Per tensor (a MatMul's weight, a table under embedding_scales:
    tensor) and per row (per_channel's output channels, embedding_scales:
    row), against onnxruntime's own symmetric int8 quantize_data; an
    all-zero row stays zero."""
    import torch
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    from shrinkflow.compress.distill import int8_fake_quant

    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)) * 0.05
    w[2, 3], w[5] = 0.8, 0.0   # an outlier sets one scale; a zero row
    got = int8_fake_quant(w, per_row).numpy()
    rows = [w.numpy()[i] for i in range(len(w))] if per_row else [w.numpy().ravel()]
    want = []
    for r in rows:
        zero, scale, q = quantize_data(r, TensorProto.INT8, symmetric=True)
        want.append((q.astype(np.float32) - zero) * scale if scale > 0 else r)
    np.testing.assert_allclose(got.ravel(), np.concatenate(want).ravel(), rtol=0, atol=1e-7)
    assert not np.array_equal(got, w.numpy())          # it rounded
    assert np.all(got[5] == 0)


def test_a_quantized_forward_takes_the_gradient_at_the_rounded_weights_and_keeps_the_float_ones():
    import copy

    import torch

    from shrinkflow.compress.distill import QuantizedForward, int8_fake_quant, int8_targets

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    ids = torch.tensor([[1, 7, 9], [4, 4, 2]])
    floats = state(model)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        rounded[0].weight.copy_(int8_fake_quant(rounded[0].weight, False))
        for i in (1, 3):
            rounded[i].weight.copy_(int8_fake_quant(rounded[i].weight, True))
    rounded(ids).sum().backward()

    q = QuantizedForward(int8_targets(model, per_channel=True, tables="tensor"))
    assert len(q.targets) == 3
    q.swap_in()
    out = model(ids).sum()
    out.backward()
    q.swap_out()
    assert same_state(state(model), floats)            # the float weights are back, bit for bit
    for a, b in zip(model.parameters(), rounded.parameters()):
        assert torch.equal(a.grad, b.grad)             # the gradient at the rounded weights (straight through)
    assert not torch.equal(model[0].weight, rounded[0].weight)
    # tables None: they stay fp32, only the Linear layers round
    assert len(int8_targets(model, per_channel=False, tables=None)) == 2


def test_a_quantization_aware_warm_re_distillation_runs_every_step_on_the_recipes_int8(
        tmp_path, tiny_teacher_dir, small_splits, monkeypatch):
    """Each forward of the warm re-distillation sees the student's Linear
    weights on the per-tensor int8 grid (the recipe's QuantizeStep()); the
    student it ends with is float, and not the student trained without it.
    Without a quantize step to train against it refuses."""
    import torch

    from shrinkflow.compress.steps import int8_of

    distil(tiny_teacher_dir, small_splits, STEP, student_dir=tmp_path / "sidecar")
    window = [f"production sentence number {i}" for i in range(6)]
    plain = distil(tiny_teacher_dir, small_splits, STEP, window=window, warm=tmp_path / "sidecar")
    step = STEP.model_copy(update={"warm_start_quantization_aware": True})
    seen: list[bool] = []   # per forward of a Linear layer: were its weights on the int8 grid?
    import shrinkflow.compress.distill as distill_module

    original = distill_module.kd_train

    def watching(student, *args, **kwargs):
        def on_grid(module, _):
            w = module.weight.detach()
            scale = w.abs().max() / 127.0
            seen.append(bool(torch.allclose(w / scale, torch.round(w / scale), atol=1e-3)))
        hooks = [m.register_forward_pre_hook(on_grid) for m in student.modules() if isinstance(m, torch.nn.Linear)]
        try:
            return original(student, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(distill_module, "kd_train", watching)   # the real training, watched
    aware = distil(tiny_teacher_dir, small_splits, step, window=window, warm=tmp_path / "sidecar",
                   int8=int8_of(STUDENT.recipe))
    aware_seen = list(seen)
    seen.clear()
    distil(tiny_teacher_dir, small_splits, STEP, window=window, warm=tmp_path / "sidecar")
    monkeypatch.undo()
    assert aware_seen and all(aware_seen)              # every forward on the grid
    assert seen and not any(seen)                      # without it, float weights
    assert not same_state(state(aware.model), state(plain.model))
    w = aware.model.classifier.weight.detach() if hasattr(aware.model, "classifier") else None
    if w is not None:
        assert not torch.allclose(w / (w.abs().max() / 127), torch.round(w / (w.abs().max() / 127)), atol=1e-3)
    with pytest.raises(ValueError, match="no quantize step"):
        distil(tiny_teacher_dir, small_splits, step, window=window, warm=tmp_path / "sidecar")
    # a cold distillation ignores it, as every warm_start param
    cold = distil(tiny_teacher_dir, small_splits, step)
    assert same_state(state(cold.model), state(distil(tiny_teacher_dir, small_splits, STEP).model))


def test_int8_of_reads_the_quantize_step_and_a_recipe_without_one_is_refused():
    from shrinkflow.compress.steps import int8_of

    assert int8_of(STUDENT.recipe) == {"per_channel": False, "tables": "tensor"}
    assert int8_of((STEP, QuantizeStep(per_channel=True, quantize_embeddings=False))) == \
        {"per_channel": True, "tables": None}
    assert int8_of((STEP, QuantizeStep(embedding_scales="row"))) == {"per_channel": False, "tables": "row"}
    assert int8_of((STEP, VocabPruneStep())) is None
    aware = STEP.model_copy(update={"warm_start_quantization_aware": True})
    Candidate(name="ok", recipe=(aware, VocabPruneStep(), QuantizeStep()))
    with pytest.raises(ValueError, match="has no quantize step"):
        Candidate(name="bad", recipe=(aware, VocabPruneStep()))
    from tests.conftest import PROJECT_ROOT
    import yaml

    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    doc["compress"]["candidates"] = [{"name": "bad", "recipe": [{"method": "distill", "layers": [0],
                                                                  "warm_start_quantization_aware": True}]}]
    with pytest.raises(ParamsError, match="has no quantize step"):
        parse_params(doc)
