"""Per rank, the only modules that import deepspeed: the engines behind one protocol.

    protocol     Engine: what the trainer calls (steps, eval, masks, gather, LR, Adam seed,
                 save/load, skip); Batch
    build        build_engine: the 2 × 2 choice, tensor parallel or not × pipeline or not
    common       process group, the DeepSpeed config dict, μP param groups, AdamW, the
                 checkpoint/LR/seed half of the protocol every engine shares
    zero         the plain model under ZeRO 0–3; pipeline: DeepSpeed's PipelineModule
    tensor_parallel/  Megatron-style TP layers, slice I/O, and its ZeRO and pipeline engines
    optim_state  Adam moments in and out of any ZeRO stage; ds_compat: DeepSpeed internals
"""
