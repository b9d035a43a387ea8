"""Megatron-style tensor parallelism for the Tele-FLM model.

(The TP × PP × DP layout of a stage and the shape rules TP imposes — heads, kv heads, FFN
units and vocab rows divide evenly — are ``stages.layout``, checked before any worker starts.)

- :mod:`.layers`: column/row/vocab-parallel layers and a TP model built from growth.model's
  pieces (RoPE, RMSNorm, μP, MSG masks sliced with their shards);
- :mod:`.io`: each TP rank reads only its slices of a canonical checkpoint
  (safetensors ``get_slice``) and a TP model is gathered back to HF names tensor by tensor;
- :mod:`.zero`: the TP model under DeepSpeed ZeRO-0/1/2/3 (TP × DP groups as DeepSpeed's ``mpu``),
  an ``stages.engines.protocol.Engine`` that ``stages.engines.build.build_engine`` picks for ``tensor_parallel > 1``;
- :mod:`.pipeline`: TP inside DeepSpeed's pipeline (TP × PP × DP on ``PipeModelDataParallelTopology``,
  ZeRO-0/1), the engine ``build_engine`` picks with ``deepspeed.pipeline``.
"""
