"""Compression: recipes of steps applied to the kept teacher.

A candidate is an ordered recipe from params.yaml. Steps that rewrite the
torch model run first; the model is then exported to ONNX; ONNX-level steps
(int8 quantization) run last. ``apply_recipe`` is the single entry point, so
new methods (distillation, pruning) slot in as new step types.
"""

from shrinkflow.compress.recipe import apply_recipe

__all__ = ["apply_recipe"]
