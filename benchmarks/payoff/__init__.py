"""The growth-payoff benchmark (``benchmarks/growth_payoff.py``), in rooms: the design
(arms, presets), the runner of train-stage processes, the pure analysis, the report and plot,
and the procedure that ties them (coarse sweep → LR sweep → main grid)."""
