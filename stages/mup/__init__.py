"""μP checks on the stage's own training path (docs/mup.md).

    proxy      a short in-process stage: the stage's model build, μP param groups, AdamW,
               LR schedule, clipping and corpus batches (stages.engines.common / stages.lr / stages.data)
    coord      the coordinate check: mean |x| and |Δx| per activation type vs width, with slopes
    reference  the same architecture under microsoft's ``mup`` package (MuReadout, MuAdamW)
    sweep      LR × width × seed sweeps, from scratch and after exact growth
    cli        ``mup-check``: the coordinate check as a console script
"""
