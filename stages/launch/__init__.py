"""The orchestrating process of a stage (``train-stage``): it never imports deepspeed.

    run         validate → dry run | another launcher | plan → lock → prepare → ranks
    plan        every check that reads files, before anything is written (StagePlan)
    prepare     data, growth into STAGE_DIR/init, the snapshot; then the ranks (train_planned)
    local       torchrun for this node's ranks (torchrun: the launcher module it runs)
    multinode   the nodes' meeting point and config check; dist_grow: growth on every rank
    slurm       launcher=slurm|print: a batch script or the per-node commands
    dry_run     growth plans and per-GPU memory (memory: the estimator), nothing trained
    resume      which fields a resume may change; lock: one train-stage per stage dir
"""
