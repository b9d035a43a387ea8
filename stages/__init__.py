"""One training stage, in rooms that show its two kinds of process.

    schema, validate      the typed config Hydra composes into, and its one check
    layout, resolved      the TP × PP × DP layout; stage_config.json (what the ranks read)
    lr                    LR and MSG mask schedules
    train                 the Hydra entry point ``train-stage`` (thin: stages.launch.run)
    launch/               the orchestrating process: plan, prepare and grow, torchrun,
                          several nodes, SLURM, the dry run, resume rules, the lock
    rank/                 what every rank runs: the worker, the one training loop, export
    engines/              per rank, the only deepspeed importers: the Engine protocol and
                          its ZeRO, pipeline and tensor-parallel engines
    data/                 tokens: tokenizers, indexed datasets, one stream across stages

Rooms import downwards only (tests/unit/test_house.py): launch/ never imports rank/ or
deepspeed; engines/ knows neither launch/ nor rank/.
"""
