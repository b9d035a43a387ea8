"""Megatron-style tensor parallelism for the Tele-FLM model.

- :mod:`.layout`: the TP × PP × DP layout of a stage and the shape rules TP imposes
  (heads, kv heads, FFN units and vocab rows divide evenly), checked before any worker starts;
- :mod:`.layers`: column/row/vocab-parallel layers and a TP model built from growth.model's
  pieces (RoPE, RMSNorm, μP, MSG masks sliced with their shards);
- :mod:`.io`: each TP rank reads only its slices of a canonical checkpoint
  (safetensors ``get_slice``) and a TP model is gathered back to HF names tensor by tensor;
- :mod:`.engine`: the TP model under DeepSpeed ZeRO-0/1/2/3 (TP × DP groups as DeepSpeed's ``mpu``),
  an ``stages.engine.Engine`` that ``stages.trainer.build_engine`` picks for ``tensor_parallel > 1``;
- :mod:`.pipe`: TP inside DeepSpeed's pipeline (TP × PP × DP on ``PipeModelDataParallelTopology``,
  ZeRO-0/1), the engine ``build_tp`` hands out with ``deepspeed.pipeline``.
"""
