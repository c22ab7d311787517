"""Quantization-aware warm re-distillation (``warm_start_quantization_aware``):
the student trains on its weights rounded to exactly the int8 grid ONNX
Runtime's dynamic quantization builds, the optimizer updating the float
weights (straight-through estimator). Tiny models."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkflow.config import Candidate, ParamsError, QuantizeStep, VocabPruneStep, parse_params
from tests.test_warm_start import STEP, STUDENT, distil, same_state, state


def _gather_matmul_graph(table, weight, gemm: bool):
    """A graph that reads ``table`` (rows, dim) by Gather and multiplies by
    ``weight`` (ONNX MatMul's (in, out), or Gemm's transposed)."""
    from onnx import TensorProto, helper, numpy_helper

    mm = (helper.make_node("Gemm", ["h", "Wt"], ["y"], transB=1) if gemm
          else helper.make_node("MatMul", ["h", "W"], ["y"]))
    inits = [numpy_helper.from_array(table, "E"),
             numpy_helper.from_array(weight.T.copy(), "Wt") if gemm else numpy_helper.from_array(weight, "W"),
             numpy_helper.from_array(np.array([0]), "s"), numpy_helper.from_array(np.array([table.shape[1]]), "t")]
    g = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["e"]),
                           helper.make_node("Flatten", ["e"], ["h0"], axis=1),
                           helper.make_node("Slice", ["h0", "s", "t"], ["h"]), mm], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, weight.shape[1]])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("per_channel, scales", [(False, "tensor"), (True, "tensor"), (False, "row"),
                                                 (True, "row")])
def test_the_fake_grid_is_the_one_the_quantize_step_ships(tmp_path, per_channel, scales, gemm):
    """Against the project's own quantize step (ONNX Runtime's dynamic
    int8, and the per-row tables) on a Gather -> MatMul/Gemm graph: the
    weight's grid (symmetric int8, per tensor or per output channel) and
    the table's (ORT's Gather: asymmetric uint8 with a zero point, a
    helper's finding; per row: symmetric int8) are exactly what is shipped."""
    import onnx
    import torch
    from onnx import numpy_helper

    from shrinkflow.compress.distill import int8_fake_quant, int8_targets
    from shrinkflow.compress.quantize import quantize_dynamic_onnx

    rng = np.random.default_rng(1)
    weight = (rng.normal(size=(16, 8)) * np.linspace(0.1, 3, 8)).astype(np.float32)   # (in, out), columns apart
    table = rng.normal(size=(12, 16)).astype(np.float32) + 0.3                       # off-centre: a zero point
    onnx.save(_gather_matmul_graph(table, weight, gemm), tmp_path / "a.onnx")
    quantize_dynamic_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx",
                          QuantizeStep(per_channel=per_channel, embedding_scales=scales))
    q = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "b.onnx").graph.initializer}
    k = "Wt_Transposed" if gemm else "W"
    shipped_w = (q[k + "_quantized"].astype(np.float32) - q[k + "_zero_point"].astype(np.float32).reshape(1, -1)) \
        * q[k + "_scale"].reshape(1, -1)
    # the torch Linear's weight is (out, in): the ONNX weight transposed
    linear = torch.nn.Linear(16, 8)
    embedding = torch.nn.Embedding(12, 16)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight.T.copy()))
        embedding.weight.copy_(torch.from_numpy(table))
    specs = {id(w): (per_row, asym) for w, per_row, asym in
             int8_targets(torch.nn.Sequential(embedding, linear), per_channel, scales)}
    fake_w = int8_fake_quant(linear.weight.detach(), *specs[id(linear.weight)]).numpy().T
    np.testing.assert_array_equal(fake_w, shipped_w)
    if scales == "row":
        shipped_e = q["E_int8_rows"].astype(np.float32) * q["E_row_scale"].reshape(-1, 1)
    else:
        assert q["E_quantized"].dtype == np.uint8 and int(q["E_zero_point"]) != 0
        shipped_e = (q["E_quantized"].astype(np.float32) - q["E_zero_point"].astype(np.float32)) * q["E_scale"]
    fake_e = int8_fake_quant(embedding.weight.detach(), *specs[id(embedding.weight)]).numpy()
    np.testing.assert_allclose(fake_e, shipped_e, rtol=0, atol=1e-6)
    assert not np.array_equal(fake_e, table)


def test_an_all_zero_tensor_or_row_is_left_as_it_is_and_tied_weights_are_rounded_once():
    import torch

    from shrinkflow.compress.distill import int8_fake_quant, int8_targets

    w = torch.randn(4, 6)
    w[2] = 0.0
    assert torch.equal(int8_fake_quant(w, True)[2], torch.zeros(6))
    for per_row, asym in ((False, False), (True, False), (False, True)):
        assert torch.equal(int8_fake_quant(torch.zeros(3, 5), per_row, asym), torch.zeros(3, 5))
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert len(int8_targets(tied, False, "tensor")) == 1


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
        rounded[0].weight.copy_(int8_fake_quant(rounded[0].weight, False, True))
        for i in (1, 3):
            rounded[i].weight.copy_(int8_fake_quant(rounded[i].weight, True))
    rounded(ids).sum().backward()

    q = QuantizedForward(int8_targets(model, per_channel=True, tables="tensor"))
    assert len(q.targets) == 3
    with q.rounded():
        model(ids).sum().backward()
    assert same_state(state(model), floats)            # the float weights are back, bit for bit
    with pytest.raises(RuntimeError):                  # however the step ends
        with q.rounded():
            raise RuntimeError("a forward that fails")
    assert same_state(state(model), floats)
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
