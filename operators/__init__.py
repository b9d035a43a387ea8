"""Exact (function-preserving) growth operators over named tensors.

Pure tensor math: ``(tensors, source config, target config, spec, seed) → tensors`` with
shape checks before any copy, and no files, processes or DeepSpeed. The streaming
executor (``growth.executor``) calls :meth:`GrowthPlan.grow_tensor` one tensor at a time;
every target tensor is computed from exactly one source tensor (or none, for a new
layer built from fresh init), so memory is bounded by the largest tensor.

Usage::

    spec = GrowthSpec.from_strategy("zero", positions="interleave", seed=0)
    plan = make_plan(src_config, target_config, spec)   # no weights read
    plan.config                      # grown ModelConfig (mask record, eps, μP, vocab)
    for op in plan.tensor_ops():     # name, src_name, src/dst shape, operator text
        t = plan.grow_tensor(op.name, reader.get)                 # weights
        m = plan.grow_tensor(op.name, moments.get, kind="exp_avg")  # Adam moments
    plan.provenance(name)            # uint8 map: PROVENANCE codes per element
    plan.event()                     # JSON record for growth.json; GrowthPlan.from_event
"""

from operators.mup import lr_groups, lr_multiplier
from operators.plan import PROVENANCE, GrowthPlan, TensorOp, grow_state_dict, make_plan
from operators.spec import GrowthError, GrowthSpec

__all__ = ["PROVENANCE", "GrowthError", "GrowthPlan", "GrowthSpec", "TensorOp", "grow_state_dict",
           "lr_groups", "lr_multiplier", "make_plan"]
