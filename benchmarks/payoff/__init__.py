"""The growth-payoff benchmark (``benchmarks/growth_payoff.py`` is its command line), in rooms:

    design      the four arms and the presets (model shapes, batch, budgets) per device
    runner      plans and runs the train-stage processes, reusing finished stages
    analysis    loss curves along FLOPs, the crossover, the reading (pure)
    report      the printed tables and the plot
    procedure   coarse sweep → LR sweep → main grid
"""
